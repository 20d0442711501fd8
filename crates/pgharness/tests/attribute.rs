//! `#[pgharness::test]`: parameters filled by type from the test's own schema, `#[sqlx::test]`'s
//! arguments, and the outcome (a returned `Err` keeps the schema, as a panic does).

mod common;

use pgharness::{TestDb, deadpool_postgres, tokio_postgres};

async fn current_schema(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT current_schema()::text", &[])
        .await
        .unwrap()
        .get(0)
}

#[pgharness::test(
    migrations = "tests/attribute/sql",
    fixtures(path = "attribute/fixtures", scripts("items"))
)]
async fn every_parameter_is_the_same_schema_migrated_and_seeded(
    db: TestDb,
    client: tokio_postgres::Client,
    pool: deadpool_postgres::Pool,
) {
    let schema = db.schema().to_owned();
    assert_eq!(current_schema(&client).await, schema);
    let pooled = pool.get().await.unwrap();
    assert_eq!(current_schema(&pooled).await, schema);
    let names: Vec<String> = client
        .query("SELECT name FROM items ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(names, ["first", "second"]);
    // The client is the test's own connection, separate from the database's.
    let ours: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let its: i32 = db
        .client()
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    assert_ne!(ours, its);
}

#[pgharness::test(migrations = false)]
async fn without_migrations_the_schema_is_empty_and_ok_passes(
    client: tokio_postgres::Client,
) -> Result<(), tokio_postgres::Error> {
    let tables: i64 = client
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(tables, 0);
    Ok(())
}

#[pgharness::test(
    migrations = "tests/attribute/sql",
    fixtures("attribute/fixtures/items.sql")
)]
async fn a_test_db_parameter_is_the_database_itself(
    db: TestDb,
) -> Result<(), Box<dyn std::error::Error>> {
    // A fixture named by its path from this file.
    let count: i64 = db
        .client()
        .query_one("SELECT count(*) FROM items", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(count, 2);
    db.client().batch_execute("DELETE FROM items").await?;
    Ok(())
}

/// The configured settings for a run of its own, torn down inline (the outcome is in the
/// ledger when the database is dropped).
fn run_settings(run: &str) -> pgharness::Settings {
    let mut settings = pgharness::Settings::load().unwrap();
    settings.run_id = Some(run.to_owned());
    settings.teardown = pgharness::Teardown::Inline;
    settings
}

#[tokio::test]
async fn a_test_that_returns_err_keeps_its_schema_and_fails() {
    let server = common::configured_server().await;
    let run = format!("it-attr-err-{}", uuid::Uuid::new_v4());
    let settings = run_settings(&run);
    let db = TestDb::builder()
        .settings(settings)
        .without_migrations()
        .build()
        .await
        .unwrap();
    let outcome: Result<(), String> = Err("the app said no".into());
    let failed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        pgharness::__macro::finish(db, outcome)
    }))
    .expect_err("a returned Err fails the test");
    let message = failed.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(message.contains("the app said no"), "{message}");
    let client = common::runner(&server).await;
    let schema = common::schema_of_run(&client, &run).await;
    assert_eq!(
        common::ledger_status(&client, &schema).await.as_deref(),
        Some("kept")
    );
    // And an Ok one recycles it.
    let run = format!("it-attr-ok-{}", uuid::Uuid::new_v4());
    let settings = run_settings(&run);
    let db = TestDb::builder()
        .settings(settings)
        .without_migrations()
        .build()
        .await
        .unwrap();
    pgharness::__macro::finish(db, Ok::<(), String>(()));
    let status: Option<String> = client
        .query_opt(
            &format!(
                "SELECT status FROM {}.ledger WHERE run_id = $1",
                common::admin_ns()
            ),
            &[&run],
        )
        .await
        .unwrap()
        .map(|row| row.get(0));
    assert_ne!(status.as_deref(), Some("kept"));
}

#[pgharness::test(
    migrations = "tests/attribute/sql",
    fixtures(path = "attribute/fixtures", scripts("items"))
)]
async fn a_sqlx_pool_and_connection_are_in_the_test_s_schema(
    db: TestDb,
    pool: pgharness::sqlx::PgPool,
    mut connection: pgharness::sqlx::PgConnection,
) -> Result<(), pgharness::sqlx::Error> {
    let (schema,): (String,) = pgharness::sqlx::query_as("SELECT current_schema()::text")
        .fetch_one(&pool)
        .await?;
    assert_eq!(schema, db.schema());
    let (count,): (i64,) = pgharness::sqlx::query_as("SELECT count(*) FROM items")
        .fetch_one(&mut connection)
        .await?;
    assert_eq!(count, 2);
    Ok(())
}

#[tokio::test]
async fn the_sqlx_pool_is_closed_before_the_schema_is_recycled() {
    let server = common::configured_server().await;
    let run = format!("it-attr-sqlx-{}", uuid::Uuid::new_v4());
    let settings = run_settings(&run);
    let db = TestDb::builder()
        .settings(settings)
        .migrations(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/attribute/sql"))
        .build()
        .await
        .unwrap();
    let schema = db.schema().to_owned();
    let mut closers = pgharness::Closers::default();
    let pool = <pgharness::sqlx::PgPool as pgharness::Inject>::inject(&db, &mut closers).await;
    // Two connections held at once, as an app's workers would.
    let (a, b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
    drop((a, b));
    assert_eq!(pool.size(), 2);
    closers.close().await;
    assert!(pool.is_closed());
    pgharness::__macro::finish(db, ());
    let client = common::runner(&server).await;
    assert_eq!(
        common::ledger_status(&client, &schema).await.as_deref(),
        Some("ready"),
        "the schema was recycled, with no sqlx connection left to wait for"
    );
}

/// An embedded sqlx migrator, as `sqlx::migrate!()` makes one (built at run time here: the
/// tests do not build sqlx's macros). Its first migration wraps itself in a transaction,
/// its second seeds a row, and it has a down migration that must never run.
static MIGRATOR: std::sync::LazyLock<pgharness::sqlx::migrate::Migrator> = std::sync::LazyLock::new(
    || {
        use pgharness::sqlx::migrate::{Migration, MigrationType, Migrator};
        let migration = |version, description: &'static str, kind, sql: &'static str| {
            Migration::new(version, description.into(), kind, sql.into(), false)
        };
        Migrator {
            migrations: vec![
                migration(
                    20240101000000,
                    "accounts",
                    MigrationType::ReversibleUp,
                    "BEGIN;\nCREATE TABLE accounts (id bigserial PRIMARY KEY, name text NOT NULL);\nCOMMIT;\n",
                ),
                migration(
                    20240101000000,
                    "accounts",
                    MigrationType::ReversibleDown,
                    "DROP TABLE accounts;\n",
                ),
                migration(
                    20240102000000,
                    "house account",
                    MigrationType::Simple,
                    "INSERT INTO accounts (name) VALUES ('house');\n",
                ),
            ]
            .into(),
            ..Migrator::DEFAULT
        }
    },
);

#[pgharness::test(migrator = "MIGRATOR")]
async fn an_embedded_sqlx_migrator_builds_the_schema_and_finds_it_up_to_date(
    pool: pgharness::sqlx::PgPool,
) {
    let names: Vec<String> = pgharness::sqlx::query_scalar("SELECT name FROM accounts")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(names, ["house"]);
    // The app's own start-up migration: nothing to apply (it would fail on the existing
    // table), no checksum mismatch, and the history as sqlx wrote it.
    MIGRATOR.run(&pool).await.unwrap();
    let versions: Vec<i64> =
        pgharness::sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(versions, [20240101000000, 20240102000000]);
}

/// Migrations written as a function of the app's: run on the connection string into the new
/// schema, once per pool schema.
async fn migrate(url: String) -> Result<(), tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    client
        .batch_execute("CREATE TABLE coded (id int PRIMARY KEY); INSERT INTO coded VALUES (1);")
        .await
}

async fn coded_rows(db: &TestDb) -> i64 {
    db.client()
        .query_one("SELECT count(*) FROM coded", &[])
        .await
        .unwrap()
        .get(0)
}

#[pgharness::test(migrate_with = "migrate")]
async fn a_migration_function_builds_the_schema(db: TestDb) {
    assert_eq!(coded_rows(db).await, 1);
}

#[pgharness::test(migrate_with = "migrate", migrations_version = "1")]
async fn a_versioned_migration_function_is_pooled_by_its_version(db: TestDb) {
    let source: String = db
        .client()
        .query_one(
            &format!(
                "SELECT source FROM {}.ledger WHERE schema_name = current_schema()",
                common::admin_ns()
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        source.contains("migrate_with") && source.contains("migrate"),
        "{source}"
    );
    assert_eq!(coded_rows(db).await, 1);
}
