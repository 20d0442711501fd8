//! The example app pgharness is shown and tested with: a small REST service for users and
//! their todos, on axum and tokio-postgres (through a deadpool pool).
//!
//! `router(pool)` is the whole app; `main.rs` only reads the environment, migrates and
//! serves. Its migrations live in the workspace's `sql/` directory.

mod error;
mod routes;

pub use error::AppError;
pub use routes::{NewTodo, NewUser, Todo, User, UserSummary, router};

/// Applies `dir/*.sql` in name order, once each, recording them in `schema_migrations`.
pub async fn migrate(
    client: &mut tokio_postgres::Client,
    dir: &std::path::Path,
) -> anyhow::Result<usize> {
    use anyhow::Context;
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS schema_migrations (name text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())")
        .await
        .context("failed to create schema_migrations")?;
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("failed to list migrations in {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .collect();
    paths.sort();
    let mut applied = 0;
    for path in paths {
        let name = path
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let done = client
            .query_opt("SELECT 1 FROM schema_migrations WHERE name = $1", &[&name])
            .await?
            .is_some();
        if done {
            continue;
        }
        let sql = std::fs::read_to_string(&path)
            .with_context(|| format!("failed to read {}", path.display()))?;
        let tx = client.transaction().await?;
        tx.batch_execute(&sql)
            .await
            .with_context(|| format!("migration {name} failed"))?;
        tx.execute("INSERT INTO schema_migrations (name) VALUES ($1)", &[&name])
            .await?;
        tx.commit().await?;
        applied += 1;
    }
    Ok(applied)
}
