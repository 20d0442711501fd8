//! Proof that tests do not see each other: the same unique key and fresh sequences in
//! tests that run at the same time, and two databases inside one test.

mod common;

use common::create_user;
use pgharness::{TestDb, test_db};
use rstest::rstest;

// These two tests write the same unique email; when they run at the same time (nextest
// runs them in parallel processes), both pass only if each has its own table. The
// certain proof, with no timing involved, is `two_databases_in_one_test_…` below.
#[rstest]
#[tokio::test]
async fn same_unique_key_in_one_test(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    create_user(&app, "shared@example.com").await;
    let count: i64 = db
        .client()
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
}

#[rstest]
#[tokio::test]
async fn same_unique_key_in_another_test(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    create_user(&app, "shared@example.com").await;
    let count: i64 = db
        .client()
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 1);
}

#[rstest]
#[tokio::test]
async fn sequences_start_fresh(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    assert_eq!(create_user(&app, "first@example.com").await, 1);
    assert_eq!(create_user(&app, "second@example.com").await, 2);
}

#[rstest]
#[tokio::test]
async fn sequences_start_fresh_in_a_twin(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    assert_eq!(create_user(&app, "other@example.com").await, 1);
}

#[tokio::test]
async fn two_databases_in_one_test_write_the_same_key_concurrently() {
    let (a, b) = tokio::join!(TestDb::new(), TestDb::new());
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a.schema(), b.schema());
    let insert = "INSERT INTO users (email, name) VALUES ('same@example.com', 'S') RETURNING id";
    let (ra, rb) = tokio::join!(
        a.client().query_one(insert, &[]),
        b.client().query_one(insert, &[])
    );
    assert_eq!(
        (ra.unwrap().get::<_, i64>(0), rb.unwrap().get::<_, i64>(0)),
        (1, 1)
    );
    let seen_by_a: i64 = a
        .client()
        .query_one("SELECT count(*) FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(seen_by_a, 1);
}
