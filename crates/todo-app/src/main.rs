//! Runs the todo app: reads `DATABASE_URL` (and optionally `PORT`, `MIGRATIONS`), applies
//! the migrations, serves on 127.0.0.1.

use std::str::FromStr;

use anyhow::Context;
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let url =
        std::env::var("DATABASE_URL").context("set DATABASE_URL=postgres://user@host:port/db")?;
    let config = tokio_postgres::Config::from_str(&url)
        .context("DATABASE_URL is not a valid Postgres URL")?;
    let migrations = std::env::var("MIGRATIONS").unwrap_or_else(|_| "sql".into());
    let (mut client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .context("failed to connect")?;
    tokio::spawn(connection);
    let applied = todo_app::migrate(&mut client, std::path::Path::new(&migrations)).await?;
    tracing::info!(applied, "migrations applied");
    let manager = Manager::from_config(
        config,
        tokio_postgres::NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    let pool = Pool::builder(manager)
        .max_size(16)
        .build()
        .context("failed to build the pool")?;
    let port: u16 = std::env::var("PORT")
        .ok()
        .and_then(|p| p.parse().ok())
        .unwrap_or(3000);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .with_context(|| format!("failed to bind 127.0.0.1:{port}"))?;
    tracing::info!(port, "listening");
    axum::serve(listener, todo_app::router(pool))
        .await
        .context("server failed")
}
