//! sqlx 0.9 on `#[pgharness::test]` (pgharness's `sqlx09` feature): its `PgPool` and
//! `PgConnection` injected, and an embedded 0.9 `Migrator` with a history table of its own
//! name building the schema, which the migrator then finds up to date.

use std::sync::LazyLock;

use pgharness::sqlx09 as sqlx;
use sqlx::SqlSafeStr;
use sqlx::migrate::{Migration, MigrationType, Migrator};

/// Two migrations, the second seeding a row, recorded in `_app_migrations` (sqlx 0.9 lets
/// an app name its history table).
static MIGRATOR: LazyLock<Migrator> = LazyLock::new(|| {
    let migration = |version, description: &'static str, sql: &'static str| {
        Migration::new(
            version,
            description.into(),
            MigrationType::Simple,
            sql.into_sql_str(),
            false,
        )
    };
    let mut migrator = Migrator {
        migrations: vec![
            migration(1, "tags", "CREATE TABLE tags (name text PRIMARY KEY);"),
            migration(2, "seed", "INSERT INTO tags VALUES ('inbox');"),
        ]
        .into(),
        ..Migrator::DEFAULT
    };
    migrator.dangerous_set_table_name("_app_migrations");
    migrator
});

#[pgharness::test(migrator = "MIGRATOR")]
async fn a_sqlx_0_9_migrator_builds_the_schema_and_finds_it_up_to_date(pool: sqlx::PgPool) {
    let names: Vec<String> = sqlx::query_scalar("SELECT name FROM tags")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(names, ["inbox"]);
    MIGRATOR.run(&pool).await.expect("nothing to apply");
    let versions: Vec<i64> =
        sqlx::query_scalar("SELECT version FROM _app_migrations ORDER BY version")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(versions, [1, 2]);
    let default_table: Option<String> =
        sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        default_table, None,
        "the history is in the migrator's own table"
    );
}

#[pgharness::test(migrations = "migrations")]
async fn a_sqlx_0_9_connection_is_in_the_test_s_schema(mut conn: sqlx::PgConnection) {
    let (count,): (i64,) = sqlx::query_as("SELECT count(*) FROM notes")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(count, 1, "the seed migration's note");
}
