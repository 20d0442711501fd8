//! The customers API through its router, each test with its own schema: `#[pgharness::test]`
//! hands each a `PgPool` of a schema migrated by the app's own embedded migrator (with
//! `_sqlx_migrations` filled, so the app's `migrate!().run()` at start-up is a no-op), and
//! the seeded house account there. Tests that change the seed row leave it to pgharness to
//! put back.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use http_body_util::BodyExt;
use pgharness::sqlx::PgPool;
use shop_app::{Customer, NewCustomer};
use tower::ServiceExt;

async fn call(
    pool: &PgPool,
    method: &str,
    uri: &str,
    body: Option<serde_json::Value>,
) -> (StatusCode, serde_json::Value) {
    let app = shop_app::app(pool.clone()).await.expect("the app starts");
    let request = Request::builder()
        .method(method)
        .uri(uri)
        .header("content-type", "application/json")
        .body(body.map_or_else(Body::empty, |b| Body::from(b.to_string())))
        .unwrap();
    let response = app.oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    (status, json)
}

fn customers(json: serde_json::Value) -> Vec<Customer> {
    serde_json::from_value(json).unwrap()
}

#[pgharness::test(migrator = "shop_app::MIGRATOR")]
async fn lists_the_seeded_house_account(pool: PgPool) {
    let (status, json) = call(&pool, "GET", "/customers", None).await;
    assert_eq!(status, StatusCode::OK);
    let names: Vec<String> = customers(json).into_iter().map(|c| c.name).collect();
    assert_eq!(names, ["house account"]);
}

#[pgharness::test(migrator = "shop_app::MIGRATOR")]
async fn creates_a_customer(pool: PgPool) -> Result<(), pgharness::sqlx::Error> {
    let new = NewCustomer { name: "ada".into() };
    let (status, json) = call(
        &pool,
        "POST",
        "/customers",
        Some(serde_json::to_value(new).unwrap()),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let created: Customer = serde_json::from_value(json).unwrap();
    let stored: String = pgharness::sqlx::query_scalar("SELECT name FROM customers WHERE id = $1")
        .bind(created.id)
        .fetch_one(&pool)
        .await?;
    assert_eq!(stored, "ada");
    Ok(())
}

#[pgharness::test(migrator = "shop_app::MIGRATOR")]
async fn a_duplicate_name_is_a_conflict_and_changes_nothing(pool: PgPool) {
    let body = serde_json::json!({ "name": "house account" });
    let (status, _) = call(&pool, "POST", "/customers", Some(body)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    let (status, _) = call(
        &pool,
        "POST",
        "/customers",
        Some(serde_json::json!({ "name": "" })),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let n: i64 = pgharness::sqlx::query_scalar("SELECT count(*) FROM customers")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
}

#[pgharness::test(migrator = "shop_app::MIGRATOR")]
async fn deleting_the_house_account_is_put_back_for_the_next_test(pool: PgPool) {
    let (_, json) = call(&pool, "GET", "/customers", None).await;
    let house = customers(json).remove(0);
    let (status, _) = call(&pool, "DELETE", &format!("/customers/{}", house.id), None).await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = call(&pool, "DELETE", &format!("/customers/{}", house.id), None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    // Renaming and deleting seed rows: the recycled schema gets the seed back.
    pgharness::sqlx::query("INSERT INTO customers (name) VALUES ('replacement')")
        .execute(&pool)
        .await
        .unwrap();
}

#[pgharness::test(migrator = "shop_app::MIGRATOR")]
async fn a_transaction_the_app_drops_unfinished_is_rolled_back(pool: PgPool) {
    // The app's own pattern: a transaction dropped without commit, while the test's
    // runtime is still running; teardown must not wait on it.
    let mut tx = pool.begin().await.unwrap();
    pgharness::sqlx::query("INSERT INTO customers (name) VALUES ('never')")
        .execute(&mut *tx)
        .await
        .unwrap();
    drop(tx);
    let n: i64 =
        pgharness::sqlx::query_scalar("SELECT count(*) FROM customers WHERE name = 'never'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(n, 0);
}
