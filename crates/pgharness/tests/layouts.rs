//! Migrations in the layouts of sqlx, diesel and refinery: applied as the tool applies them (a file's
//! own `BEGIN`/`COMMIT` included, `down` files never), with the tool's history table filled
//! so that the tool's own migrator finds the schema up to date.

mod common;

use std::path::{Path, PathBuf};

use pgharness::{Layout, Settings, Teardown, TestDb};

fn dir_with(label: &str, files: &[(&str, &str)]) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("pgharness-layout-{label}-{}", uuid::Uuid::new_v4()));
    for (name, text) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }
    dir
}

/// Schemas of the sqlx-layout migration set in `dir`, in the pool or not.
async fn schemas_of(dir: &Path) -> i64 {
    let hash = pgharness::pool::migrations_hash(dir, Layout::Sqlx).unwrap();
    let server = common::configured_server().await;
    let admin = common::admin(&server).await;
    admin
        .query_one(
            "SELECT count(*) FROM pg_namespace WHERE nspname LIKE $1",
            &[&format!("p\\_{}%", &hash[..12])],
        )
        .await
        .unwrap()
        .get(0)
}

fn settings(layout: Layout, run: &str) -> Settings {
    let mut settings = Settings::load().unwrap();
    settings.migrations_layout = layout;
    settings.teardown = Teardown::Inline;
    settings.run_id = Some(run.to_owned());
    settings
}

const SQLX: &[(&str, &str)] = &[
    (
        "20240101000000_create_users.sql",
        "BEGIN;\nCREATE TABLE users (id bigserial PRIMARY KEY, email text NOT NULL UNIQUE, admin boolean NOT NULL DEFAULT false);\nCOMMIT;\n",
    ),
    (
        "20240102000000_seed_admin.up.sql",
        "-- the admin every deployment has\nINSERT INTO users (email, admin) VALUES ('admin@example.com', true);\n",
    ),
    ("20240102000000_seed_admin.down.sql", "DROP TABLE users;\n"),
    (
        "20240103000000_touch.sql",
        "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$\nBEGIN\n  RETURN NEW;\nEND\n$$;\nSTART TRANSACTION;\nCREATE TABLE notes (body text);\nEND;\n",
    ),
    ("README.md", "not a migration"),
];

#[tokio::test]
async fn a_sqlx_layout_is_applied_as_sqlx_does_and_sqlx_finds_it_up_to_date() {
    let dir = dir_with("sqlx", SQLX);
    let run = format!("it-layout-sqlx-{}", uuid::Uuid::new_v4());
    let db = TestDb::builder()
        .settings(settings(Layout::Sqlx, &run))
        .migrations(&dir)
        .build()
        .await
        .expect("the sqlx migrations apply, their own transactions included");
    let admins: i64 = db
        .client()
        .query_one("SELECT count(*) FROM users WHERE admin", &[])
        .await
        .expect("the down file never ran")
        .get(0);
    assert_eq!(admins, 1);
    let history: Vec<(i64, String, bool)> = db
        .client()
        .query(
            "SELECT version, description, success FROM _sqlx_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1), row.get(2)))
        .collect();
    assert_eq!(
        history,
        [
            (20240101000000, "create users".to_owned(), true),
            (20240102000000, "seed admin".to_owned(), true),
            (20240103000000, "touch".to_owned(), true),
        ]
    );
    // sqlx's own migrator, on a pool of the test's schema: nothing to do, no error (a
    // checksum that differed from sqlx's would be `VersionMismatch`; a missing history,
    // `relation "users" already exists`).
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect_with(db.sqlx_connect_options())
        .await
        .unwrap();
    let migrator = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
    migrator
        .run(&pool)
        .await
        .expect("sqlx finds the schema up to date");
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(rows, 3);
    pool.close().await;
    // A test that adds users and changes the seeded admin leaves a schema that is recycled,
    // its seed rows put back (not dropped because a seed table changed).
    db.client()
        .batch_execute(
            "INSERT INTO users (email) VALUES ('new@example.com');
             UPDATE users SET email = 'changed@example.com' WHERE admin;",
        )
        .await
        .unwrap();
    let schema = db.schema().to_owned();
    drop(db);
    let server = common::configured_server().await;
    let client = common::runner(&server).await;
    assert_eq!(
        common::ledger_status(&client, &schema).await.as_deref(),
        Some("ready")
    );
    // Recycled under a new name.
    let schema = common::current_name(&client, &schema).await.unwrap();
    let admin = common::admin(&server).await;
    let users: Vec<(String, bool)> = admin
        .query(
            &format!("SELECT email, admin FROM \"{schema}\".users ORDER BY id"),
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(users, [("admin@example.com".to_owned(), true)]);
}

#[tokio::test]
async fn a_failing_migration_after_a_file_s_own_commit_leaves_nothing_behind() {
    // A migration set of its own (the pool is keyed by content): what it leaves is its alone.
    let unique = format!("-- {}\n", uuid::Uuid::new_v4());
    let dir = dir_with(
        "sqlx-fail",
        &[
            (
                "1_ok.sql",
                "BEGIN;\nCREATE TABLE kept_by_mistake (id int);\nCOMMIT;\n",
            ),
            (
                "2_bad.sql",
                &format!(
                    "CREATE TABLE t (id int);\nINSERT INTO t VALUES ('not a number');\n{unique}"
                ),
            ),
        ],
    );
    let run = format!("it-layout-fail-{}", uuid::Uuid::new_v4());
    let error = TestDb::builder()
        .settings(settings(Layout::Sqlx, &run))
        .migrations(&dir)
        .build()
        .await
        .expect_err("the bad migration fails")
        .to_string();
    assert!(error.contains("2_bad.sql:2"), "{error}");
    assert_eq!(
        schemas_of(&dir).await,
        0,
        "a half-migrated schema was left behind"
    );
}

#[tokio::test]
async fn a_diesel_layout_is_detected_and_its_history_filled() {
    let dir = dir_with(
        "diesel",
        &[
            (
                "2024-01-01-000000_create_items/up.sql",
                "CREATE TABLE items (id serial PRIMARY KEY, name text NOT NULL);\n",
            ),
            (
                "2024-01-01-000000_create_items/down.sql",
                "DROP TABLE items;\n",
            ),
            (
                "2024-02-01-120000_add_price/up.sql",
                "ALTER TABLE items ADD COLUMN price int;\n",
            ),
            (
                "2024-02-01-120000_add_price/down.sql",
                "ALTER TABLE items DROP COLUMN price;\n",
            ),
        ],
    );
    let run = format!("it-layout-diesel-{}", uuid::Uuid::new_v4());
    let db = TestDb::builder()
        .settings(settings(Layout::Auto, &run))
        .migrations(&dir)
        .build()
        .await
        .unwrap();
    db.client()
        .execute("INSERT INTO items (name, price) VALUES ('a', 1)", &[])
        .await
        .expect("both up.sql ran, no down.sql");
    let versions: Vec<String> = db
        .client()
        .query(
            "SELECT version FROM __diesel_schema_migrations ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(versions, ["20240101000000", "20240201120000"]);
}

#[test]
fn a_misnamed_sqlx_migration_is_an_error_naming_it() {
    let dir = dir_with("sqlx-name", &[("first_users.sql", "SELECT 1;")]);
    let error = pgharness::pool::migrations_hash(Path::new(&dir), Layout::Sqlx)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("first_users.sql") && error.contains("<version>_<description>.sql"),
        "{error}"
    );
}

/// `-- no-transaction` runs the file as sqlx does: on its own, outside any transaction (a
/// `CREATE INDEX CONCURRENTLY` fails inside one), between the migrations before and after
/// it; sqlx's migrator then finds the schema up to date, and the pool recycles it.
#[tokio::test]
async fn a_no_transaction_migration_runs_outside_a_transaction_as_sqlx_runs_it() {
    let unique = format!("-- {}\n", uuid::Uuid::new_v4());
    let dir = dir_with(
        "sqlx-notx",
        &[
            (
                "1_users.sql",
                &format!("{unique}CREATE TABLE users (id bigserial PRIMARY KEY, email text);"),
            ),
            (
                "2_index.sql",
                "-- no-transaction\nCREATE INDEX CONCURRENTLY users_email ON users (email);",
            ),
            (
                "3_seed.sql",
                "INSERT INTO users (email) VALUES ('admin@example.com');",
            ),
        ],
    );
    let run = format!("it-layout-notx-{}", uuid::Uuid::new_v4());
    for round in 0..2 {
        let db = TestDb::builder()
            .settings(settings(Layout::Sqlx, &run))
            .migrations(&dir)
            .build()
            .await
            .expect("the migrations apply, the concurrent index outside a transaction");
        let row = db
            .client()
            .query_one(
                "SELECT (SELECT count(*) FROM users),
                        (SELECT count(*) FROM pg_indexes WHERE indexname = 'users_email'
                            AND schemaname = current_schema()),
                        current_setting('search_path')",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            (row.get::<_, i64>(0), row.get::<_, i64>(1)),
            (1, 1),
            "round {round}"
        );
        let pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(1)
            .connect_with(db.sqlx_connect_options())
            .await
            .unwrap();
        let migrator = sqlx::migrate::Migrator::new(dir.as_path()).await.unwrap();
        migrator
            .run(&pool)
            .await
            .expect("sqlx finds the schema up to date");
        pool.close().await;
        db.client()
            .batch_execute("INSERT INTO users (email) VALUES ('b@example.com')")
            .await
            .unwrap();
    }
}

/// A failure in or after a `-- no-transaction` migration leaves nothing behind: the schema
/// the first part committed is dropped, and the error names the file and line.
#[tokio::test]
async fn a_failure_after_a_no_transaction_migration_leaves_nothing_behind() {
    let unique = format!("-- {}\n", uuid::Uuid::new_v4());
    let dir = dir_with(
        "sqlx-notx-fail",
        &[
            (
                "1_users.sql",
                &format!("{unique}CREATE TABLE users (id bigserial PRIMARY KEY, email text);"),
            ),
            (
                "2_index.sql",
                "-- no-transaction\nCREATE INDEX CONCURRENTLY users_email ON users (email);",
            ),
            (
                "3_bad.sql",
                "SELECT 1;\nINSERT INTO users (id) VALUES ('x');",
            ),
        ],
    );
    let run = format!("it-layout-notx-fail-{}", uuid::Uuid::new_v4());
    let error = TestDb::builder()
        .settings(settings(Layout::Sqlx, &run))
        .migrations(&dir)
        .build()
        .await
        .expect_err("the bad migration fails")
        .to_string();
    assert!(error.contains("3_bad.sql:2"), "{error}");
    assert_eq!(
        schemas_of(&dir).await,
        0,
        "a half-migrated schema was left behind"
    );
}

mod refinery_migrations {
    refinery::embed_migrations!("tests/layouts/refinery");
}

#[tokio::test]
async fn a_refinery_layout_gets_refinery_s_history_and_refinery_finds_it_up_to_date() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/layouts/refinery");
    let run = format!("it-layout-refinery-{}", uuid::Uuid::new_v4());
    // `auto` recognises the layout by its names.
    let db = TestDb::builder()
        .settings(settings(Layout::Auto, &run))
        .migrations(&dir)
        .build()
        .await
        .expect("the refinery migrations apply");
    let history: Vec<(i32, String)> = db
        .client()
        .query(
            "SELECT version, name FROM refinery_schema_history ORDER BY version",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    assert_eq!(
        history,
        [(1, "create_users".to_owned()), (2, "seed_admin".to_owned())]
    );
    // refinery's own runner on the test's schema: a checksum unlike refinery's would be a
    // divergent version, a missing history `relation "users" already exists`.
    let mut client = db.connect().await.unwrap();
    let report = refinery_migrations::migrations::runner()
        .run_async(&mut client)
        .await
        .expect("refinery finds the schema up to date");
    assert!(
        report.applied_migrations().is_empty(),
        "{:?}",
        report.applied_migrations()
    );
    let admins: i64 = client
        .query_one("SELECT count(*) FROM users WHERE admin", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(admins, 1);
}
