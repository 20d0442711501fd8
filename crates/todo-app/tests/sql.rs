//! SQL-level tests: the schema, the search_path every connection gets, fixtures, and the
//! completion transaction's atomicity.

mod common;

use axum::http::StatusCode;
use common::{call, create_todo, create_user};
use pgharness::{TestDb, test_db};
use rstest::rstest;

#[rstest]
#[tokio::test]
async fn migrations_create_the_tables_in_the_tests_own_schema(#[future] test_db: TestDb) {
    let db = test_db.await;
    let rows = db
        .client()
        .query(
            "SELECT table_name::text FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1",
            &[&db.schema()],
        )
        .await
        .unwrap();
    let tables: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(tables, ["todo_events", "todos", "users"]);
    let in_public: i64 = db
        .client()
        .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public' AND table_name = 'users'", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(in_public, 0, "nothing may leak into public");
}

#[rstest]
#[tokio::test]
async fn every_connection_lands_in_the_schema(#[future] test_db: TestDb) {
    let db = test_db.await;
    let expected = format!("{},public", db.schema());
    let from_client: String = db
        .client()
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    let pooled = db.pool().get().await.unwrap();
    let from_pool: String = pooled
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    let fresh = db.connect().await.unwrap();
    let from_fresh: String = fresh
        .query_one("SHOW search_path", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        [from_client, from_pool, from_fresh],
        [expected.clone(), expected.clone(), expected]
    );
}

#[rstest]
#[tokio::test]
async fn the_connection_string_works_for_another_client(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    create_user(&app, "other@example.com").await;
    // A client configured only from the string, as sqlx or psql would be.
    let config: tokio_postgres::Config = db.connection_string().parse().unwrap();
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let email: String = client
        .query_one("SELECT email FROM users", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(email, "other@example.com");
}

#[rstest]
#[tokio::test]
async fn psql_reaches_the_schema_with_no_password_on_its_command_line(#[future] test_db: TestDb) {
    let db = test_db.await;
    db.client()
        .execute("INSERT INTO users (email, name) VALUES ('p@q.r', 'P')", &[])
        .await
        .unwrap();
    // The password goes in the environment, which only its owner can read; a command line
    // is readable by every local user in /proc.
    let output = std::process::Command::new("psql")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(db.libpq_env())
        .args([
            "-XAtc",
            "SELECT current_schema() || ' ' || count(*) FROM users",
        ])
        .output()
        .expect("psql is installed (see .ci/run)");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        format!("{} 1", db.schema())
    );
}

#[tokio::test]
async fn fixtures_load_in_order() {
    let db = TestDb::builder()
        .fixtures(["users", "todos"])
        .build()
        .await
        .unwrap();
    let row = db
        .client()
        .query_one(
            "SELECT (SELECT count(*) FROM users), (SELECT count(*) FROM todos WHERE done)",
            &[],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (2, 1));
}

#[rstest]
#[tokio::test]
async fn a_fixture_can_be_loaded_later(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    db.load_fixture("users").await.unwrap();
    let (status, body) = call(
        &app,
        "POST",
        "/users",
        serde_json::json!({"email": "ada@example.com", "name": "A"}).into(),
    )
    .await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
}

#[rstest]
#[tokio::test]
async fn a_missing_fixture_is_named(#[future] test_db: TestDb) {
    let db = test_db.await;
    let error = db
        .load_fixture("no_such_fixture")
        .await
        .unwrap_err()
        .to_string();
    assert!(error.contains("no fixture `no_such_fixture`"), "{error}");
}

#[rstest]
#[tokio::test]
async fn completion_is_all_or_nothing(#[future] test_db: TestDb) {
    let db = test_db.await;
    let app = todo_app::router(db.pool().clone());
    let user = create_user(&app, "atomic@example.com").await;
    let todo = create_todo(&app, user, "half done").await;
    // Break the last step of the transaction, in this test's schema only.
    db.client()
        .batch_execute("DROP TABLE todo_events")
        .await
        .unwrap();
    let (status, _) = call(&app, "POST", &format!("/todos/{todo}/complete"), None).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
    let row = db
        .client()
        .query_one(
            "SELECT done, (SELECT completed_count FROM users) FROM todos WHERE id = $1",
            &[&todo],
        )
        .await
        .unwrap();
    assert_eq!((row.get::<_, bool>(0), row.get::<_, i32>(1)), (false, 0));
}

#[tokio::test]
async fn a_broken_migration_names_file_and_line() {
    let dir = std::env::temp_dir().join(format!("todo-app-bad-migrations-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("0001_ok.sql"), "CREATE TABLE a (id int);\n").unwrap();
    std::fs::write(
        dir.join("0002_bad.sql"),
        "-- a comment\nCREATE TABLE b (id int);\nCREATE TABEL c (id int);\n",
    )
    .unwrap();
    let error = TestDb::builder()
        .migrations(&dir)
        .build()
        .await
        .unwrap_err()
        .to_string();
    std::fs::remove_dir_all(&dir).unwrap();
    assert!(error.contains("migration"), "{error}");
    assert!(error.contains("0002_bad.sql:3"), "{error}");
    assert!(error.contains("syntax error"), "{error}");
}
