//! The todo app driven over HTTP (in process, through `oneshot`), each test in its own schema.

mod common;

use axum::http::StatusCode;
use common::{call, create_todo, create_user};
use pgharness::{TestDb, test_db};
use rstest::rstest;
use serde_json::json;

#[rstest]
#[tokio::test]
async fn health_answers_ok(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    assert_eq!(call(&app, "GET", "/health", None).await.0, StatusCode::OK);
}

#[rstest]
#[tokio::test]
async fn creates_a_user(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let (status, body) = call(
        &app,
        "POST",
        "/users",
        Some(json!({"email": " Ada@Example.com ", "name": "Ada"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(body["email"], "ada@example.com");
    let stored: String = db
        .client()
        .query_one("SELECT email FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(stored, "ada@example.com");
}

#[rstest]
#[tokio::test]
async fn a_taken_email_is_a_conflict(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    create_user(&app, "grace@example.com").await;
    let (status, body) = call(
        &app,
        "POST",
        "/users",
        Some(json!({"email": "GRACE@example.com", "name": "G"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"], "that email is already taken");
}

#[rstest]
#[tokio::test]
async fn an_email_without_at_is_rejected(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let (status, _) = call(
        &app,
        "POST",
        "/users",
        Some(json!({"email": "nobody", "name": "N"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let count: i64 = db
        .client()
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 0);
}

#[rstest]
#[tokio::test]
async fn a_blank_name_violates_the_check(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let (status, body) = call(
        &app,
        "POST",
        "/users",
        Some(json!({"email": "a@b.c", "name": "   "})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(body["error"], "violates users_name_check");
}

#[rstest]
#[tokio::test]
async fn malformed_json_is_refused(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let (status, _) = call(&app, "POST", "/users", Some(json!({"email": 42}))).await;
    assert!(status.is_client_error(), "{status}");
}

#[rstest]
#[tokio::test]
async fn a_missing_user_is_not_found(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    assert_eq!(
        call(&app, "GET", "/users/4242", None).await.0,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        call(&app, "GET", "/users/4242/todos", None).await.0,
        StatusCode::NOT_FOUND
    );
}

#[rstest]
#[tokio::test]
async fn creates_and_lists_todos_in_order(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let user = create_user(&app, "lin@example.com").await;
    for title in ["first", "second", "third"] {
        create_todo(&app, user, title).await;
    }
    let (status, body) = call(&app, "GET", &format!("/users/{user}/todos"), None).await;
    assert_eq!(status, StatusCode::OK);
    let titles: Vec<&str> = body
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["title"].as_str().unwrap())
        .collect();
    assert_eq!(titles, ["first", "second", "third"]);
}

#[rstest]
#[tokio::test]
async fn a_todo_for_a_missing_user_is_not_found(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let (status, _) = call(&app, "POST", "/users/99/todos", Some(json!({"title": "x"}))).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

#[rstest]
#[tokio::test]
async fn a_duplicate_title_for_the_same_user_is_a_conflict(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let ada = create_user(&app, "ada@example.com").await;
    let alan = create_user(&app, "alan@example.com").await;
    create_todo(&app, ada, "tea").await;
    create_todo(&app, alan, "tea").await; // another user may use the same title
    let (status, body) = call(
        &app,
        "POST",
        &format!("/users/{ada}/todos"),
        Some(json!({"title": "tea"})),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"], "that title is already taken");
}

#[rstest]
#[tokio::test]
async fn completes_a_todo_across_three_tables(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let user = create_user(&app, "kay@example.com").await;
    let todo = create_todo(&app, user, "ship it").await;
    let (status, body) = call(&app, "POST", &format!("/todos/{todo}/complete"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["done"], true);
    let row = db
        .client()
        .query_one(
            "SELECT (SELECT completed_count FROM users WHERE id = $1),
                    (SELECT count(*) FROM todo_events WHERE todo_id = $2 AND kind = 'completed'),
                    (SELECT completed_at IS NOT NULL FROM todos WHERE id = $2)",
            &[&user, &todo],
        )
        .await
        .unwrap();
    assert_eq!(
        (
            row.get::<_, i32>(0),
            row.get::<_, i64>(1),
            row.get::<_, bool>(2)
        ),
        (1, 1, true)
    );
}

#[rstest]
#[tokio::test]
async fn completing_twice_is_a_conflict(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let user = create_user(&app, "x@example.com").await;
    let todo = create_todo(&app, user, "once").await;
    assert_eq!(
        call(&app, "POST", &format!("/todos/{todo}/complete"), None)
            .await
            .0,
        StatusCode::OK
    );
    assert_eq!(
        call(&app, "POST", &format!("/todos/{todo}/complete"), None)
            .await
            .0,
        StatusCode::CONFLICT
    );
    assert_eq!(
        call(&app, "POST", "/todos/777/complete", None).await.0,
        StatusCode::NOT_FOUND
    );
    let events: i64 = db
        .client()
        .query_one("SELECT count(*) FROM todo_events", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(events, 1);
}

#[rstest]
#[tokio::test]
async fn filters_todos_by_done(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let user = create_user(&app, "f@example.com").await;
    let a = create_todo(&app, user, "a").await;
    create_todo(&app, user, "b").await;
    call(&app, "POST", &format!("/todos/{a}/complete"), None).await;
    let (_, done) = call(&app, "GET", &format!("/users/{user}/todos?done=true"), None).await;
    let (_, open) = call(
        &app,
        "GET",
        &format!("/users/{user}/todos?done=false"),
        None,
    )
    .await;
    assert_eq!(done.as_array().unwrap().len(), 1);
    assert_eq!(done[0]["title"], "a");
    assert_eq!(open[0]["title"], "b");
}

#[rstest]
#[tokio::test]
async fn deletes_a_todo(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let user = create_user(&app, "d@example.com").await;
    let todo = create_todo(&app, user, "gone soon").await;
    assert_eq!(
        call(&app, "DELETE", &format!("/todos/{todo}"), None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        call(&app, "DELETE", &format!("/todos/{todo}"), None)
            .await
            .0,
        StatusCode::NOT_FOUND
    );
}

#[rstest]
#[tokio::test]
async fn the_user_summary_counts_open_and_completed(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let user = create_user(&app, "s@example.com").await;
    let first = create_todo(&app, user, "1").await;
    create_todo(&app, user, "2").await;
    create_todo(&app, user, "3").await;
    call(&app, "POST", &format!("/todos/{first}/complete"), None).await;
    let (status, body) = call(&app, "GET", &format!("/users/{user}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        (body["open"].as_i64(), body["completed"].as_i64()),
        (Some(2), Some(1))
    );
}

#[rstest]
#[tokio::test]
async fn deleting_a_user_deletes_their_todos(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let user = create_user(&app, "c@example.com").await;
    let todo = create_todo(&app, user, "t").await;
    call(&app, "POST", &format!("/todos/{todo}/complete"), None).await;
    assert_eq!(
        call(&app, "DELETE", &format!("/users/{user}"), None)
            .await
            .0,
        StatusCode::NO_CONTENT
    );
    let left: i64 = db
        .client()
        .query_one(
            "SELECT (SELECT count(*) FROM todos) + (SELECT count(*) FROM todo_events)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(left, 0);
}
