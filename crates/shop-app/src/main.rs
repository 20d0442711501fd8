//! `shop-app`: serves the customers API on `LISTEN` (default 127.0.0.1:3000) over the
//! database of `DATABASE_URL`, migrating it first.

use anyhow::Context;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let url = std::env::var("DATABASE_URL").context("set DATABASE_URL")?;
    let pool = sqlx::PgPool::connect(&url)
        .await
        .context("failed to connect to DATABASE_URL")?;
    let app = shop_app::app(pool).await.context("failed to migrate")?;
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:3000".into());
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("failed to listen on {listen}"))?;
    axum::serve(listener, app).await?;
    Ok(())
}
