//! A diesel-async app's tests on `#[pgharness::test]`: the connection, or the deadpool or bb8
//! pool the app uses, injected by type, in a schema migrated from diesel's layout.

use diesel::prelude::*;
use diesel_async::pooled_connection::{bb8, deadpool};
use diesel_async::{AsyncPgConnection, RunQueryDsl};
use orm_suite::Note;
use orm_suite::schema::notes;

type Deadpool = deadpool::Pool<AsyncPgConnection>;
type Bb8 = bb8::Pool<AsyncPgConnection>;

#[pgharness::test(migrations = "migrations")]
async fn a_connection_sees_the_seed_and_writes_in_its_own_schema(mut conn: AsyncPgConnection) {
    let seeded: Vec<Note> = notes::table
        .select(Note::as_select())
        .load(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        seeded.len(),
        1,
        "the seed migration's note, and no other test's"
    );
    assert_eq!(seeded[0].body, "welcome");
    diesel::insert_into(notes::table)
        .values(notes::body.eq("buy milk"))
        .execute(&mut conn)
        .await
        .unwrap();
    diesel::update(notes::table.filter(notes::body.eq("welcome")))
        .set(notes::done.eq(true))
        .execute(&mut conn)
        .await
        .unwrap();
    let count: i64 = notes::table.count().get_result(&mut conn).await.unwrap();
    assert_eq!(count, 2);
}

#[pgharness::test(migrations = "migrations")]
async fn a_deadpool_pool_hands_out_connections_in_the_schema(pool: Deadpool) {
    let (mut a, mut b) = (pool.get().await.unwrap(), pool.get().await.unwrap());
    diesel::insert_into(notes::table)
        .values(notes::body.eq("from a"))
        .execute(&mut a)
        .await
        .unwrap();
    let bodies: Vec<String> = notes::table
        .select(notes::body)
        .order(notes::id)
        .load(&mut b)
        .await
        .unwrap();
    assert_eq!(bodies, ["welcome", "from a"]);
    // A constraint of the migration holds.
    let refused = diesel::insert_into(notes::table)
        .values(notes::body.eq(""))
        .execute(&mut b)
        .await;
    assert!(refused.is_err());
}

#[pgharness::test(migrations = "migrations")]
async fn a_bb8_pool_hands_out_connections_in_the_schema(pool: Bb8) -> Result<(), String> {
    let mut conn = pool.get().await.map_err(|e| e.to_string())?;
    diesel::delete(notes::table)
        .execute(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    let count: i64 = notes::table
        .count()
        .get_result(&mut *conn)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(count, 0);
    Ok(())
}

/// diesel's own migration harness, on the test's schema: its history table
/// (`__diesel_schema_migrations`) lists every migration, so nothing is pending and a run
/// applies nothing (it would fail on the existing table).
#[pgharness::test(migrations = "migrations")]
async fn diesel_s_own_migration_harness_finds_the_schema_up_to_date(conn: AsyncPgConnection) {
    use diesel_async::async_connection_wrapper::AsyncConnectionWrapper;
    use diesel_migrations::{EmbeddedMigrations, MigrationHarness, embed_migrations};
    const MIGRATIONS: EmbeddedMigrations = embed_migrations!("migrations");
    let pending = tokio::task::spawn_blocking(move || {
        let mut wrapper: AsyncConnectionWrapper<AsyncPgConnection> =
            AsyncConnectionWrapper::from(conn);
        let pending: Vec<String> = wrapper
            .pending_migrations(MIGRATIONS)
            .map_err(|e| e.to_string())?
            .iter()
            .map(|m| m.name().to_string())
            .collect();
        let applied = wrapper
            .run_pending_migrations(MIGRATIONS)
            .map_err(|e| e.to_string())?
            .len();
        Ok::<_, String>((pending, applied))
    })
    .await
    .unwrap();
    assert_eq!(pending, Ok((Vec::new(), 0)));
}
