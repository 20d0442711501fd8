//! pgharness gives every integration test its own migrated Postgres schema, on a local
//! server (a Docker container, or the Postgres binaries) or an existing one, with the same
//! test code everywhere.
//!
//! ```ignore
//! use pgharness::{TestDb, test_db};
//! use rstest::rstest;
//!
//! #[rstest]
//! #[tokio::test]
//! async fn completes_a_todo(#[future] test_db: TestDb) {
//!     let db = test_db.await;
//!     let app = todo_app::router(db.pool().clone());
//!     // … drive the app, assert on db.client() …
//! }
//! ```
//!
//! The modules a test needs are re-exported here; `backend`, `ledger` and `budget` are
//! for tools such as `cargo xtask` that start servers, reap schemas and size test groups.
#![warn(missing_docs)]

pub mod backend;
pub mod budget;
mod connect;
mod driver;
mod error;
pub mod events;
mod fixture;
pub mod ledger;
mod naming;
pub mod pool;
mod script;
mod server;
mod settings;
mod testdb;
mod workspace;

pub use error::Error;
pub use fixture::test_db;
pub use server::{Server, TESTS_ROLE, libpq_env};
pub use settings::{
    BackendKind, InvalidDuration, KeepPolicy, RdsSettings, SETTING_NAMES, SecretUrl, Settings,
    Teardown, parse_duration, redact_url,
};
pub use testdb::{TestDb, TestDbBuilder};

/// Re-exported so that tests need no direct dependency to use the client and pool types.
pub use deadpool_postgres;
/// Re-exported so that tests need no direct dependency to use the client types.
pub use tokio_postgres;
