//! The crate's one error type.

/// What went wrong, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing or wrong (region, target, ports).
    #[error("{0}")]
    Config(String),
    /// The SSM API refused or failed (`code` is the AWS error code when there is one).
    #[error("{operation} failed: {code}: {message}{}", hint(.code))]
    Api {
        /// StartSession, ResumeSession, TerminateSession.
        operation: &'static str,
        /// `TargetNotConnected`, `AccessDeniedException`, … or `Unreachable`.
        code: String,
        /// AWS's message.
        message: String,
    },
    /// The data channel websocket could not be opened or broke beyond repair.
    #[error("data channel: {0}")]
    Channel(String),
    /// The agent ended the session.
    #[error("the session ended: {0}")]
    SessionClosed(String),
    /// The local side (a port, a stream).
    #[error("{action}: {source}")]
    Io {
        /// What we were doing.
        action: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn hint(code: &str) -> &'static str {
    match code {
        "TargetNotConnected" => {
            " (is the SSM agent on the instance running and registered? check the instance id and region)"
        }
        "AccessDeniedException" => {
            " (the caller needs ssm:StartSession on the instance and the document)"
        }
        "InvalidDocument" => " (the document must be AWS-StartPortForwardingSessionToRemoteHost)",
        "Unreachable" => " (check AWS_ENDPOINT_URL_SSM, the region and the network)",
        "NoCredentials" => {
            " (set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run `aws sso login`)"
        }
        _ => "",
    }
}

impl Error {
    /// The AWS error code, if the API refused.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }
}
