//! The runner's one error type: which step of the run failed, with its cause in the
//! message (printed once under `{:#}`) and a fix where one is known.

/// Why a step of the run failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Settings, the server, the ledger or the schema pool (the harness' own error).
    #[error(transparent)]
    Harness(#[from] pgharness::Error),
    /// The RDS proxy could not start (its part and cause as source).
    #[cfg(feature = "rds")]
    #[error(transparent)]
    Proxy(#[from] pgharness_rds::Error),
    /// A file or process of the run: what the runner was doing, and why it failed.
    #[error("{action}: {error}")]
    Io {
        /// What the runner was doing ("failed to write …").
        action: String,
        /// The cause (in the message, so not also a `source()`).
        error: std::io::Error,
    },
    /// A query of the runner's own connection failed.
    #[error("{action}: {error}")]
    Postgres {
        /// What the runner was doing.
        action: String,
        /// The driver's error (in the message, so not also a `source()`).
        error: tokio_postgres::Error,
    },
    /// A program the run needs (cargo-nextest, debootstrap, docker, fake-aws) failed.
    #[error("{program}: {problem}")]
    Program {
        /// The program or step.
        program: String,
        /// What went wrong, with a fix where one is known.
        problem: String,
    },
    /// The background RDS proxy or the emulator did not come up.
    #[error("{0}")]
    Rds(String),
    /// Interrupted (Ctrl-C, SIGTERM) while waiting for `what`.
    #[error("interrupted {0}")]
    Interrupted(String),
}

/// What kind of step failed, for callers that branch on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The harness: settings, server, ledger, pool.
    Harness,
    /// Files and processes.
    Io,
    /// The runner's own queries.
    Postgres,
    /// An external program.
    Program,
    /// The RDS proxy or the emulator.
    Rds,
    /// Interrupted.
    Interrupted,
}

impl Error {
    /// What kind of step failed.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Harness(_) => ErrorKind::Harness,
            #[cfg(feature = "rds")]
            Error::Proxy(_) => ErrorKind::Rds,
            Error::Io { .. } => ErrorKind::Io,
            Error::Postgres { .. } => ErrorKind::Postgres,
            Error::Program { .. } => ErrorKind::Program,
            Error::Rds(_) => ErrorKind::Rds,
            Error::Interrupted(_) => ErrorKind::Interrupted,
        }
    }

    pub(crate) fn program(program: impl Into<String>, problem: impl Into<String>) -> Error {
        Error::Program {
            program: program.into(),
            problem: problem.into(),
        }
    }
}

/// The runner's result.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Names the step an io or driver error happened in.
pub(crate) trait Action<T> {
    fn action(self, action: impl FnOnce() -> String) -> Result<T>;
}

impl<T> Action<T> for std::result::Result<T, std::io::Error> {
    fn action(self, action: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|error| Error::Io {
            action: action(),
            error,
        })
    }
}

impl<T> Action<T> for std::result::Result<T, tokio_postgres::Error> {
    fn action(self, action: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|error| Error::Postgres {
            action: action(),
            error,
        })
    }
}
