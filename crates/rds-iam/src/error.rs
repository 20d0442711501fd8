//! The crate's one error type.

use tokio_postgres::error::SqlState;

/// What went wrong; messages read after "failed to …" and name the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing or wrong.
    #[error("setting `{name}`: {problem}; {fix}")]
    Config {
        /// The setting.
        name: &'static str,
        /// What is wrong.
        problem: String,
        /// How to fix it.
        fix: String,
    },
    /// No AWS credentials could be found or refreshed.
    #[error(
        "no AWS credentials: {0}; set AWS_PROFILE or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, or run `aws sso login`"
    )]
    Credentials(String),
    /// Signing a token failed.
    #[error("failed to sign an IAM auth token: {0}")]
    Token(String),
    /// The CA bundle, the TLS setup or the handshake failed. The message names the cause
    /// and the fix; `source()` keeps the underlying error (rustls, PEM, I/O) for callers
    /// that inspect it.
    #[error("TLS: {message}")]
    Tls {
        /// What failed and what to do.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
    },
    /// The socket could not be opened or broke.
    #[error("{action}: {error}")]
    Io {
        /// What we were doing.
        action: String,
        /// The cause (in the message, so not also a `source()`: printed once under `{:#}`;
        /// [`Error::inner`] gives it).
        error: std::io::Error,
    },
    /// The server refused us.
    #[error("{action}: {}", describe_db(.error))]
    Postgres {
        /// What we were doing.
        action: String,
        /// The driver's error (in the message, so not also a `source()`; [`Error::inner`]
        /// gives it).
        error: tokio_postgres::Error,
    },
    /// The server answered with an error during a raw handshake (proxy, wake-up).
    #[error("the server refused the connection: {severity} {}: {message}", .code.code())]
    Refused {
        /// `FATAL`, `ERROR`.
        severity: String,
        /// SQLSTATE.
        code: SqlState,
        /// The server's message.
        message: String,
    },
    /// The database did not become available within the wake-up deadline.
    #[error(
        "the database did not accept connections within {waited:?} (last: {last}); if it is an Aurora Serverless cluster that pauses, raise the wake deadline"
    )]
    WakeTimeout {
        /// How long we waited.
        waited: std::time::Duration,
        /// The last failure.
        last: String,
    },
    /// Nothing answered at the endpoint, and its name does not resolve.
    #[error(
        "nothing answered at {host}:{port}, and {host} does not resolve: is `[rds] host` (PGHARNESS_RDS_HOST) the cluster's endpoint, spelt right? (it looks like <cluster>.cluster-<id>.<region>.rds.amazonaws.com)"
    )]
    UnknownHost {
        /// The endpoint's name.
        host: String,
        /// Its port.
        port: u16,
    },
    /// Every session of the budget stayed in use for as long as a client may wait.
    #[error(
        "too many connections: waited {waited:?} for {asked} session(s), and all of the {sessions} upstream sessions of the cluster's budget (max_sessions) stayed in use; raise the budget (`[rds] max_sessions`, PGHARNESS_RDS_MAX_SESSIONS) within the cluster's max_connections, or run fewer tests at once"
    )]
    BudgetExhausted {
        /// The budget's sessions (all proxies sharing it together).
        sessions: u32,
        /// The sessions the client asked for together (its test's, see `leases`).
        asked: u32,
        /// How long the client waited.
        waited: std::time::Duration,
    },
    /// A test asked for more sessions than the budget could give it without waiting while it
    /// holds some (which could deadlock), or for more than the whole budget.
    #[error(
        "too many connections: this test holds {holding} upstream session(s) and asks for {asked}, and the {sessions} sessions of the cluster's budget (max_sessions) are all in use; a test that holds sessions never waits for more (that deadlocks when every test does), so it is refused now: give tests fewer connections (PGHARNESS_POOL_SIZE), run fewer tests at once, or raise `[rds] max_sessions`"
    )]
    OverBudget {
        /// Sessions the test would hold with this one.
        asked: u32,
        /// Sessions it holds.
        holding: u32,
        /// The budget's sessions.
        sessions: u32,
    },
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
}

impl Error {
    pub(crate) fn config(
        name: &'static str,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Error {
        Error::Config {
            name,
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    pub(crate) fn tls(message: impl Into<String>) -> Error {
        Error::Tls {
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn tls_caused(
        message: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync + 'static>>,
    ) -> Error {
        Error::Tls {
            message: message.into(),
            source: Some(source.into()),
        }
    }

    pub(crate) fn io(action: impl Into<String>, error: std::io::Error) -> Error {
        Error::Io {
            action: action.into(),
            error,
        }
    }

    /// Whether the TLS handshake rejected the server's certificate (a name other than the
    /// endpoint's, an unknown CA, an expired certificate): a TLS or endpoint setting is
    /// wrong, not the login.
    pub fn is_certificate_rejected(&self) -> bool {
        rustls_in_chain(self).is_some_and(|e| matches!(e, rustls::Error::InvalidCertificate(_)))
    }

    /// Whether the server refused the login itself (28000 invalid authorization, 28P01
    /// password): an expired or rejected token, a missing `rds_iam` grant or IAM policy.
    pub fn is_login_refused(&self) -> bool {
        self.code().is_some_and(|code| {
            *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                || *code == SqlState::INVALID_PASSWORD
        })
    }

    /// Whether the server refused the IAM token itself (RDS: `28000 PAM authentication
    /// failed`; `28P01`): a fresh token may get in where the cached one did not. Not
    /// Aurora's `28000 no pg_hba.conf entry` while it resumes.
    pub fn is_token_refused(&self) -> bool {
        let message = match self {
            Error::Refused { message, .. } => message.as_str(),
            Error::Postgres { error, .. } => error.as_db_error().map_or("", |db| db.message()),
            _ => return false,
        };
        match self.code() {
            Some(code) if *code == SqlState::INVALID_PASSWORD => true,
            Some(code) if *code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION => {
                message.contains("PAM authentication failed")
            }
            _ => false,
        }
    }

    /// Whether TLS itself failed (a certificate, a handshake), anywhere in the chain.
    pub fn is_tls(&self) -> bool {
        matches!(self, Error::Tls { .. }) || rustls_in_chain(self).is_some()
    }

    /// The cause a variant carries in its message rather than as its `source()` (the
    /// socket's error, the driver's), for callers that inspect it.
    pub fn inner(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io { error, .. } => Some(error),
            Error::Postgres { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The SQLSTATE of a server refusal, if this is one.
    pub fn code(&self) -> Option<&SqlState> {
        match self {
            Error::Refused { code, .. } => Some(code),
            Error::Postgres { error, .. } => error.code(),
            _ => None,
        }
    }
}

/// An error and its sources, outermost first, with the causes this crate's errors carry in
/// their messages ([`Error::inner`]).
pub(crate) fn chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(error), |e| {
        e.source()
            .or_else(|| e.downcast_ref::<Error>().and_then(Error::inner))
    })
}

/// The rustls error in a chain, also where tokio-rustls wrapped it in an `io::Error` (whose
/// `source()` skips the wrapped error itself).
pub(crate) fn rustls_in_chain<'a>(
    error: &'a (dyn std::error::Error + 'static),
) -> Option<&'a rustls::Error> {
    chain(error).find_map(|error| {
        error.downcast_ref::<rustls::Error>().or_else(|| {
            error
                .downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        })
    })
}

/// An error and its causes on one line, `outer: inner: innermost`.
pub(crate) fn describe_chain(error: &(dyn std::error::Error + 'static)) -> String {
    chain(error)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": ")
}

fn describe_db(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => {
            let described = describe_chain(error);
            match rustls_in_chain(error) {
                Some(rustls::Error::InvalidCertificate(certificate)) => {
                    format!("{described}{}", certificate_fix(certificate))
                }
                _ => described,
            }
        }
    }
}

/// What to do about a certificate the client would not accept.
fn certificate_fix(error: &rustls::CertificateError) -> &'static str {
    match error {
        rustls::CertificateError::UnknownIssuer | rustls::CertificateError::BadSignature => {
            "; the CA bundle does not hold the cluster's CA: set `[rds] ca_bundle` (PGHARNESS_RDS_CA_BUNDLE) to the bundle of the cluster's region (or AWS's global bundle)"
        }
        rustls::CertificateError::NotValidForName
        | rustls::CertificateError::NotValidForNameContext { .. } => {
            "; the certificate is not for `[rds] host`: use the cluster's own endpoint name (`<cluster>.cluster-<id>.<region>.rds.amazonaws.com`), not an address or an alias"
        }
        rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
            "; the certificate has expired, or this machine's clock is wrong"
        }
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::Error;

    /// What anyhow's `{:#}` prints: each `source()` after the message.
    fn printed_with_sources(error: &(dyn std::error::Error + 'static)) -> String {
        std::iter::successors(Some(error), |e| e.source())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ")
    }

    #[test]
    fn a_cause_in_the_message_is_printed_once_and_still_inspected() {
        let refused = Error::io(
            "failed to dial the cluster",
            std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "connection refused"),
        );
        assert_eq!(
            printed_with_sources(&refused)
                .matches("connection refused")
                .count(),
            1
        );
        // The TLS checks still find a rustls error inside the socket's error.
        let rejected = Error::io(
            "TLS handshake with the cluster",
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
            ),
        );
        assert!(rejected.is_certificate_rejected());
        assert!(rejected.is_tls());
        assert!(!refused.is_tls());
    }
}
