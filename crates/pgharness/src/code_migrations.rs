//! Migrations written in code (sea-orm's `MigratorTrait`, a function of the user's): run once
//! per pool schema, on a connection of their own to the new schema, between the transaction
//! that creates the schema and the one that records it (`pool::create`). The pool keys such
//! schemas by a key the user gives (a version, or what names the migrations), since code
//! cannot be hashed as a directory is. Without one, the key is the running test binary
//! itself (its size and modification time): a rebuild — a changed migration among other
//! things — starts a new pool, so a stale schema is never claimed; a version the user gives
//! (and changes with the migrations) lets the pool outlive rebuilds.
//!
//! Only a test process runs them (on a miss): a runner's warmer has no code to run, so a
//! code-migrated pool fills by recycling.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

type Run = dyn Fn(String) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync;

/// Migrations in code, and the key their schemas are pooled by.
#[derive(Clone)]
pub(crate) struct CodeMigrations {
    /// Names them in errors and in the ledger's `source` (the reaper tells a newer key of
    /// the same source by it).
    pub(crate) source: String,
    /// What the pool keys their schemas by, with `source`.
    pub(crate) key: String,
    run: Arc<Run>,
}

impl std::fmt::Debug for CodeMigrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CodeMigrations")
            .field("source", &self.source)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

impl CodeMigrations {
    pub(crate) fn new<F, Fut, E>(source: String, key: String, run: F) -> CodeMigrations
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let run = Arc::new(move |url: String| {
            let running = run(url);
            Box::pin(async move { running.await.map_err(|error| error.to_string()) })
                as Pin<Box<dyn Future<Output = Result<(), String>> + Send>>
        });
        let key = if key.is_empty() { this_build() } else { key };
        CodeMigrations { source, key, run }
    }

    /// Runs them on `url` (a connection string that lands in the new schema).
    pub(crate) async fn run(&self, url: String) -> Result<(), String> {
        (self.run)(url).await
    }
}

/// The key of a build: the running executable's size and modification time (`build:…`), or
/// a key of its own when they cannot be read (no pooling across processes then).
fn this_build() -> String {
    let identity = std::env::current_exe()
        .and_then(std::fs::metadata)
        .and_then(|meta| {
            let modified = meta
                .modified()?
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            Ok(format!("{}:{}", meta.len(), modified.as_nanos()))
        });
    match identity {
        Ok(identity) => format!("build:{identity}"),
        Err(_) => format!("process:{}", uuid::Uuid::new_v4()),
    }
}

/// sea-orm's migrator `M` (the `sea-orm` feature), keyed by its type, its migrations' names
/// and `version`: `MigratorTrait::up` on a sea-orm connection of its own (its history table
/// `seaql_migrations` filled by sea-orm itself).
#[cfg(feature = "sea-orm")]
pub(crate) fn sea_orm<M: sea_orm_migration::MigratorTrait>(version: &str) -> CodeMigrations {
    let names: Vec<String> = M::migrations()
        .iter()
        .map(|m| m.name().to_owned())
        .collect();
    // No version: keyed by the build (`this_build`), names and all.
    let key = if version.is_empty() {
        format!("{}:{}", this_build(), names.join(","))
    } else {
        format!("{version}:{}", names.join(","))
    };
    CodeMigrations::new(
        format!("sea-orm migrator {}", std::any::type_name::<M>()),
        key,
        |url: String| async move {
            let options: sqlx::postgres::PgConnectOptions =
                url.parse().map_err(|e: sqlx::Error| e.to_string())?;
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect_with(options)
                .await
                .map_err(|e| e.to_string())?;
            let db = sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(pool.clone());
            let result = M::up(&db, None).await.map_err(|e| e.to_string());
            crate::inject::close_sqlx_pool(&pool).await;
            result
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keyed(key: &str) -> String {
        CodeMigrations::new("test".into(), key.into(), |_url: String| async {
            Ok::<(), String>(())
        })
        .key
    }

    #[test]
    fn code_migrations_without_a_version_are_pooled_per_build_of_the_test_binary() {
        let exe = std::fs::metadata(std::env::current_exe().unwrap()).unwrap();
        let unversioned = keyed("");
        assert!(
            unversioned.starts_with(&format!("build:{}:", exe.len())),
            "{unversioned}"
        );
        assert_eq!(keyed(""), unversioned, "the same build, the same key");
        assert_eq!(keyed("3"), "3");
    }
}
