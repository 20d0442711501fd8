//! The one error type of pgharness: what failed, why, and what to do about it.

use std::path::PathBuf;
use std::time::Duration;

use tokio_postgres::error::SqlState;

/// Everything that can go wrong while finding a server or preparing a test database.
///
/// Messages read after "failed to …" and end with a fix where one is known.
/// No variant ever carries a password: URLs are stored redacted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting has a value pgharness cannot use.
    #[error("setting `{name}` (from {origin}) is invalid: {problem}; {fix}")]
    Setting {
        /// The setting's name as written in `pgharness.toml` or the environment.
        name: String,
        /// Where the value came from (`PGHARNESS_X`, `pgharness.toml`, …).
        origin: String,
        /// What is wrong with it.
        problem: String,
        /// How to fix it.
        fix: String,
    },
    /// No backend could provide a server; each entry says what was tried and how to fix it.
    #[error("no Postgres server is available for tests; tried:\n{}", format_attempts(.attempts))]
    NoBackend {
        /// `(backend, why it did not work and how to fix it)`.
        attempts: Vec<(String, String)>,
    },
    /// A backend could not start or join its server.
    #[error("{backend} backend: {message}")]
    Backend {
        /// The backend's name.
        backend: &'static str,
        /// What happened and what to do.
        message: String,
    },
    /// A file pgharness needs could not be read or written.
    #[error("{action} `{}`: {error}", .path.display())]
    Io {
        /// What pgharness was doing.
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The underlying error (in the message, so not also a `source()`: printed once
        /// under anyhow's `{:#}`).
        error: std::io::Error,
    },
    /// A statement or connection failed on the server.
    #[error("{action}: {}{}", pg_message(.error), hint_for(.error))]
    Postgres {
        /// What pgharness was doing.
        action: String,
        /// The driver's error (its message and causes are in this one's, so it is not also
        /// a `source()`; `as_db_error` gives the server's error).
        error: tokio_postgres::Error,
    },
    /// A migration or fixture file failed; `location` points into the file.
    #[error("{kind} `{location}` failed: {}", pg_message(.error))]
    Sql {
        /// "migration" or "fixture".
        kind: &'static str,
        /// `path:line` of the failing statement when the server reported a position.
        location: String,
        /// The driver's error (its message and causes are in this one's, so it is not also
        /// a `source()`; `as_db_error` gives the server's error).
        error: tokio_postgres::Error,
    },
    /// Migrations written in code failed (`TestDbBuilder::migrate_with`, a sea-orm
    /// migrator); the schema they ran in was dropped.
    #[error("migrations in code ({source_name}) failed: {message}")]
    CodeMigrations {
        /// Which migrations.
        source_name: String,
        /// Their error, as they said it.
        message: String,
    },
    /// The connection pool could not be built.
    #[error("failed to build the connection pool: {0}")]
    Pool(deadpool_postgres::BuildError),
    /// Waiting for something took longer than allowed.
    #[error("timed out after {waited:?} {what}; {fix}")]
    Timeout {
        /// What was being waited for.
        what: String,
        /// How long we waited.
        waited: Duration,
        /// What to do.
        fix: String,
    },
}

impl Error {
    /// What went wrong without the backend's name, for a list that names it already.
    pub(crate) fn reason(&self) -> String {
        match self {
            Error::Backend { message, .. } => message.clone(),
            other => other.to_string(),
        }
    }

    /// True when the server refused a connection because all slots were taken (53300).
    pub fn is_too_many_clients(&self) -> bool {
        match self {
            Error::Postgres { error, .. } | Error::Sql { error, .. } => {
                error.code() == Some(&SqlState::TOO_MANY_CONNECTIONS)
            }
            _ => false,
        }
    }

    /// The server's error, when the failure came from Postgres.
    pub fn as_db_error(&self) -> Option<&tokio_postgres::error::DbError> {
        match self {
            Error::Postgres { error, .. } | Error::Sql { error, .. } => error.as_db_error(),
            _ => None,
        }
    }

    pub(crate) fn postgres(action: impl Into<String>, error: tokio_postgres::Error) -> Self {
        Error::Postgres {
            action: action.into(),
            error,
        }
    }

    pub(crate) fn io(
        action: &'static str,
        path: impl Into<PathBuf>,
        error: std::io::Error,
    ) -> Self {
        Error::Io {
            action,
            path: path.into(),
            error,
        }
    }
}

fn format_attempts(attempts: &[(String, String)]) -> String {
    attempts
        .iter()
        .map(|(backend, why)| format!("  - {backend}: {why}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The server's own message when there is one (tokio-postgres' Display says only "db error").
pub(crate) fn pg_message(error: &tokio_postgres::Error) -> String {
    match error.as_db_error() {
        Some(db) => {
            let mut message = format!("{} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                message.push_str(&format!(" ({detail})"));
            }
            message
        }
        None => std::iter::successors(Some(error as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(": "),
    }
}

fn hint_for(error: &tokio_postgres::Error) -> &'static str {
    if error.code() == Some(&SqlState::TOO_MANY_CONNECTIONS) {
        "; the server has no connection slots left: run fewer tests at once \
         (`cargo pgharness test` sizes nextest's `@tool:pgharness:db` group from max_connections; \
         with plain nextest pass `--test-threads`), lower PGHARNESS_POOL_SIZE, or raise \
         PGHARNESS_MAX_CONNECTIONS for servers pgharness starts"
    } else {
        ""
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The error and its causes as anyhow's `{:#}` prints them.
    fn chain(error: &(dyn std::error::Error + 'static)) -> String {
        std::iter::successors(Some(error), |e| e.source())
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(": ")
    }

    #[test]
    fn each_cause_is_printed_once_in_a_chain() {
        let io = Error::io(
            "failed to read migration",
            "/w/sql/0001.sql",
            std::io::Error::new(std::io::ErrorKind::NotFound, "no such file (os error 2)"),
        );
        let text = chain(&io);
        assert_eq!(text.matches("no such file").count(), 1, "{text}");
        assert!(text.contains("/w/sql/0001.sql"), "{text}");
    }

    #[tokio::test]
    async fn a_refused_connection_names_its_cause_once() {
        // A port nobody listens on: tokio-postgres' error with an io error beneath.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = closed.local_addr().unwrap().port();
        drop(closed);
        let mut config = tokio_postgres::Config::new();
        config.host("127.0.0.1").port(port).user("u");
        let error = config.connect(tokio_postgres::NoTls).await.err().unwrap();
        let error = Error::postgres("failed to connect", error);
        let text = chain(&error);
        assert_eq!(text.matches("refused").count(), 1, "{text}");
    }
}
