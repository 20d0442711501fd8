//! The crate's error: which part of the path failed, with the part's own error as source
//! (never repeated in the message: callers print chains with `{:#}`).

/// Why the RDS proxy could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is missing or wrong, or the env file could not be written.
    #[error(transparent)]
    Settings(#[from] pgharness::Error),
    /// The SSM session could not be opened.
    #[error("failed to open the SSM tunnel")]
    Tunnel(#[source] ssm_tunnel::Error),
    /// Credentials, TLS, or the IAM login failed.
    #[error(transparent)]
    Rds(#[from] rds_iam::Error),
    /// The local listener could not be bound.
    #[error("failed to listen on 127.0.0.1")]
    Listen(#[source] std::io::Error),
}
