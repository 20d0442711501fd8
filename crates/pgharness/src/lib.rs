//! pgharness gives every integration test its own migrated Postgres schema, on a local
//! server (a Docker container, or the Postgres binaries) or an existing one, with the same
//! test code everywhere.
//!
//! ```ignore
//! // Parameters are filled by type: `TestDb`, `tokio_postgres::Client`,
//! // `deadpool_postgres::Pool`, or any type implementing `pgharness::Inject`.
//! #[pgharness::test(fixtures("users"))]
//! async fn lists_users(pool: deadpool_postgres::Pool) -> Result<(), MyError> {
//!     let app = todo_app::router(pool);
//!     // … drive the app …
//!     Ok(())
//! }
//! ```
//!
//! or, with rstest:
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
//! for tools such as `cargo pgharness` (`pgharness-runner`) that start servers, reap schemas and size test groups.
#![warn(missing_docs)]

mod auth_relay;
pub mod backend;
pub mod budget;
mod code_migrations;
mod connect;
mod driver;
mod error;
pub mod events;
#[cfg(feature = "rstest")]
mod fixture;
mod inject;
mod layout;
pub mod ledger;
mod lend;
mod naming;
mod parting;
pub mod pool;
mod scram;
mod script;
mod server;
mod settings;
mod testdb;
mod workspace;

pub use error::Error;
#[cfg(feature = "rstest")]
pub use fixture::test_db;
#[doc(hidden)]
pub use inject::__macro;
pub use inject::{Closers, Inject, Outcome};
pub use layout::Layout;
/// `#[pgharness::test]`: an `async fn` test whose parameters are filled from its own
/// migrated schema, by type ([`TestDb`], [`tokio_postgres::Client`],
/// [`deadpool_postgres::Pool`], anything implementing [`Inject`]). Arguments as
/// `#[sqlx::test]` spells them: `fixtures("a", "b")`, `fixtures(path = "dir",
/// scripts("a"))`, `migrations = "dir"` (relative to the crate), `migrations = false`. It
/// returns `()` or `Result<(), E: Debug>`; a test that panics or returns `Err` keeps its
/// schema (under the default `keep = on-failure`).
pub use pgharness_macros::test;
pub use server::{Server, TESTS_ROLE, libpq_env};
pub use settings::{
    BackendKind, InvalidDuration, KeepPolicy, RdsSettings, SETTING_NAMES, SecretUrl, Settings,
    Teardown, parse_duration, redact_url,
};
pub use testdb::{ConnectParams, TestDb, TestDbBuilder};

/// Re-exported so that tests need no direct dependency to use the client and pool types.
pub use deadpool_postgres;
/// The sqlx that `#[pgharness::test]` injects (`sqlx` feature): its `PgPool` is the one
/// your app must use.
#[cfg(feature = "sqlx")]
pub use sqlx;
/// The sqlx 0.9 that `#[pgharness::test]` injects (`sqlx09` feature).
#[cfg(feature = "sqlx09")]
pub use sqlx09;
/// Re-exported so that tests need no direct dependency to use the client types.
pub use tokio_postgres;
