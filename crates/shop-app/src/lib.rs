//! A small customers API built the way most teams build on Postgres: axum, a sqlx `PgPool`
//! the app makes itself, `sqlx::migrate!` run at start-up, and the query macros checked at
//! compile time against `.sqlx/` (offline: `SQLX_OFFLINE=true` in `.cargo/config.toml`).
//! Its tests (`tests/api.rs`) are `#[pgharness::test]` functions that get a `PgPool` of
//! their own schema and hand it to the app, which migrates at start-up as in production.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

/// The app's migrations, embedded (`migrations/`, sqlx's reversible layout).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A customer as the API shows it.
#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Customer {
    /// Its id.
    pub id: i64,
    /// Its unique name.
    pub name: String,
}

/// What `POST /customers` takes.
#[derive(Debug, Deserialize, Serialize)]
pub struct NewCustomer {
    /// The name.
    pub name: String,
}

/// Migrates the database (a no-op when it is up to date) and builds the router.
pub async fn app(pool: PgPool) -> Result<Router, sqlx::migrate::MigrateError> {
    MIGRATOR.run(&pool).await?;
    Ok(Router::new()
        .route("/customers", get(list).post(create))
        .route("/customers/{id}", delete(remove))
        .with_state(pool))
}

type Failure = (StatusCode, String);

fn failure(error: sqlx::Error) -> Failure {
    match &error {
        sqlx::Error::Database(db) if db.is_unique_violation() => (
            StatusCode::CONFLICT,
            "a customer of that name exists".into(),
        ),
        sqlx::Error::Database(db) if db.is_check_violation() => (
            StatusCode::UNPROCESSABLE_ENTITY,
            "a customer needs a name".into(),
        ),
        _ => (StatusCode::INTERNAL_SERVER_ERROR, error.to_string()),
    }
}

async fn list(State(pool): State<PgPool>) -> Result<Json<Vec<Customer>>, Failure> {
    let customers = sqlx::query_as!(Customer, "SELECT id, name FROM customers ORDER BY id")
        .fetch_all(&pool)
        .await
        .map_err(failure)?;
    Ok(Json(customers))
}

async fn create(
    State(pool): State<PgPool>,
    Json(new): Json<NewCustomer>,
) -> Result<(StatusCode, Json<Customer>), Failure> {
    // A transaction the app owns: sqlx rolls it back if it is dropped unfinished.
    let mut tx = pool.begin().await.map_err(failure)?;
    let id = sqlx::query_scalar!(
        "INSERT INTO customers (name) VALUES ($1) RETURNING id",
        new.name
    )
    .fetch_one(&mut *tx)
    .await
    .map_err(failure)?;
    tx.commit().await.map_err(failure)?;
    Ok((StatusCode::CREATED, Json(Customer { id, name: new.name })))
}

async fn remove(State(pool): State<PgPool>, Path(id): Path<i64>) -> Result<StatusCode, Failure> {
    let deleted = sqlx::query!("DELETE FROM customers WHERE id = $1", id)
        .execute(&pool)
        .await
        .map_err(failure)?
        .rows_affected();
    Ok(if deleted == 1 {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    })
}
