//! The crate's one error type.

/// A cause kept for `source()`.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What went wrong, with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing or wrong (region, target, ports).
    #[error("{0}")]
    Config(String),
    /// The SSM API refused (`code` is AWS's error code).
    #[error("{operation} failed: {code}: {message}{}", hint(.code))]
    Api {
        /// StartSession, ResumeSession, TerminateSession.
        operation: &'static str,
        /// `TargetNotConnected`, `AccessDeniedException`, …
        code: String,
        /// AWS's message.
        message: String,
    },
    /// No AWS credentials could be found or refreshed.
    #[error(
        "{operation} failed: no AWS credentials ({}); set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run `aws sso login`",
        describe(.source.as_deref())
    )]
    NoCredentials {
        /// The call that needed them.
        operation: &'static str,
        /// The SDK's error, when there is one.
        #[source]
        source: Option<BoxError>,
    },
    /// The SSM endpoint did not answer (network, endpoint, region, timeout).
    #[error(
        "{operation} failed: the SSM endpoint did not answer ({}); check AWS_ENDPOINT_URL_SSM, the region and the network",
        describe(Some(.source.as_ref()))
    )]
    Unreachable {
        /// The call.
        operation: &'static str,
        /// The SDK's error.
        #[source]
        source: BoxError,
    },
    /// A call or a wait got no answer in time (the SSM API, the websocket, the handshake).
    #[error("{waiting_for} did not answer within {}; check the network (VPN, proxy, firewall) and AWS_ENDPOINT_URL_SSM", humanize(*.after))]
    TimedOut {
        /// What was waited for.
        waiting_for: String,
        /// How long.
        after: std::time::Duration,
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
        _ => "",
    }
}

/// `15 s`, `2 min`, `150 ms`.
pub(crate) fn humanize(after: std::time::Duration) -> String {
    let ms = after.as_millis();
    if ms < 1000 {
        format!("{ms} ms")
    } else if ms.is_multiple_of(60_000) {
        format!("{} min", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{} s", ms / 1000)
    } else {
        format!("{:.1} s", after.as_secs_f64())
    }
}

/// An error and its sources, outermost first.
pub(crate) fn chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| e.source())
}

/// An SDK error with its causes: the SDK's own Display ("dispatch failure") says too little.
fn describe(error: Option<&(dyn std::error::Error + Send + Sync + 'static)>) -> String {
    let Some(error) = error else {
        return "no credential provider".into();
    };
    chain(error)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

impl Error {
    /// The AWS error code, if the API refused.
    pub fn api_code(&self) -> Option<&str> {
        match self {
            Error::Api { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Whether the SSM endpoint did not answer (worth retrying).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, Error::Unreachable { .. })
    }

    /// Whether a call or a wait timed out.
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::TimedOut { .. })
    }

    /// Whether no AWS credentials could be found.
    pub fn is_no_credentials(&self) -> bool {
        matches!(self, Error::NoCredentials { .. })
    }
}
