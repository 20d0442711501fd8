//! A test that gets an sqlx pool or connection and no `TestDb` is lent the control session
//! for its first sqlx connection (`lend`): no second backend starts, sqlx's settings hold,
//! and the session comes home for the teardown, whatever the test left on it.

mod common;

use std::time::Duration;

use common::{configured_server, ledger_status, own_migrations};
use pgharness::sqlx::{self, PgPool};
use pgharness::{Closers, Inject, Teardown, TestDb};

/// Whether the configured backend lends sessions: through the RDS proxy a new connection is
/// a lease of a session the proxy holds open, and nothing is lent (CI's emulated RDS leg
/// does not run pgharness's own integration tests).
fn lent_here() -> bool {
    pgharness::Settings::load().unwrap().backend != pgharness::BackendKind::Rds
}

/// Whether this session holds an advisory lock: the control session holds its schema's
/// owner lock; a new connection holds none.
async fn holds_the_owner_lock(connection: &mut sqlx::PgConnection) -> bool {
    let (locks,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted",
    )
    .fetch_one(connection)
    .await
    .unwrap();
    locks > 0
}

#[pgharness::test(
    migrations = "tests/attribute/sql",
    fixtures(path = "attribute/fixtures", scripts("items"))
)]
async fn a_test_s_first_sqlx_connection_is_its_control_session(
    pool: PgPool,
) -> Result<(), sqlx::Error> {
    let mut first = pool.acquire().await?;
    if lent_here() {
        assert!(holds_the_owner_lock(&mut first).await, "a second backend");
    }
    // What sqlx asked for at its login holds on the lent session (`TimeZone=UTC`: the UTC
    // zone, under whichever of its names the server already had).
    let (offset, style, schema, name): (f64, String, String, String) = sqlx::query_as(
        "SELECT extract(timezone from now())::float8, current_setting('DateStyle'),
                current_schema()::text, current_setting('application_name')",
    )
    .fetch_one(&mut *first)
    .await?;
    assert_eq!((offset, style.as_str()), (0.0, "ISO, MDY"));
    assert_eq!(schema, name, "in the test's schema, named after it");
    let (items,): (i64,) = sqlx::query_as("SELECT count(*) FROM items")
        .fetch_one(&mut *first)
        .await?;
    assert_eq!(items, 2);
    // A second connection at the same time is a backend of its own, in the same schema.
    let mut second = pool.acquire().await?;
    assert!(!holds_the_owner_lock(&mut second).await);
    let (other,): (String,) = sqlx::query_as("SELECT current_schema()::text")
        .fetch_one(&mut *second)
        .await?;
    assert_eq!(other, schema);
    Ok(())
}

fn settings(run: &str, teardown: Teardown) -> pgharness::Settings {
    let mut settings = pgharness::Settings::load().unwrap();
    settings.run_id = Some(run.to_owned());
    settings.teardown = teardown;
    settings
}

async fn database(label: &str, teardown: Teardown) -> (TestDb, String) {
    let run = format!("it-lend-{label}-{}", uuid::Uuid::new_v4());
    let dir = own_migrations(
        &format!("lend-{label}"),
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text);",
    );
    let db = TestDb::builder()
        .settings(settings(&run, teardown))
        .migrations(&dir)
        .build()
        .await
        .unwrap();
    (db, run)
}

/// With `teardown = inline` the teardown waits on the control session's own client: the
/// session came home from sqlx, and the client works again.
#[tokio::test]
async fn a_lent_session_comes_home_for_an_inline_teardown() {
    let server = configured_server().await;
    let watcher = common::runner(&server).await;
    let (db, _) = database("inline", Teardown::Inline).await;
    let schema = db.schema().to_owned();
    let mut closers = Closers::lending();
    let pool = PgPool::inject(&db, &mut closers).await;
    let (a, mut b) = (pool.acquire().await.unwrap(), pool.acquire().await.unwrap());
    sqlx::query("INSERT INTO notes (body) VALUES ('x')")
        .execute(&mut *b)
        .await
        .unwrap();
    drop((a, b));
    closers.close().await;
    pgharness::__macro::finish(db, ());
    assert_eq!(
        ledger_status(&watcher, &schema).await.as_deref(),
        Some("ready"),
        "recycled inline, on the session sqlx gave back"
    );
}

/// sqlx 0.8's `close()` can return while the pool's last connection, being released (its
/// ping under way), is put back among the idle ones: the closers close that one too, so the
/// session is home when they are done, not when the pool's last clone drops.
#[tokio::test]
async fn a_connection_still_being_released_when_the_test_ends_is_closed_too() {
    if !lent_here() {
        eprintln!("nothing is lent through the RDS proxy");
        return;
    }
    let server = configured_server().await;
    let watcher = common::runner(&server).await;
    let (db, _) = database("released", Teardown::Inline).await;
    let schema = db.schema().to_owned();
    let mut closers = Closers::lending();
    let pool = PgPool::inject(&db, &mut closers).await;
    sqlx::query("INSERT INTO notes (body) VALUES ('x')")
        .execute(&pool)
        .await
        .unwrap();
    // The connection's release runs as a task of its own: let it start (and ping).
    tokio::task::yield_now().await;
    closers.close().await;
    db.client()
        .simple_query("SELECT 1")
        .await
        .expect("the session is home once the closers are done");
    pgharness::__macro::finish(db, ());
    drop(pool);
    assert_eq!(
        ledger_status(&watcher, &schema).await.as_deref(),
        Some("ready"),
    );
}

/// A connection that leaves a transaction open has it rolled back when it leaves; the
/// `TestDb`'s own client, used while the session is lent, fails and says why; the detached
/// teardown still recycles the schema.
#[tokio::test]
async fn a_lent_connection_left_in_a_transaction_is_rolled_back_and_recycled() {
    if !lent_here() {
        eprintln!("nothing is lent through the RDS proxy");
        return;
    }
    let server = configured_server().await;
    let watcher = common::runner(&server).await;
    let (db, run) = database("open", Teardown::Detached).await;
    let schema = db.schema().to_owned();
    let mut closers = Closers::lending();
    let mut connection = sqlx::PgConnection::inject(&db, &mut closers).await;
    assert!(holds_the_owner_lock(&mut connection).await);
    sqlx::raw_sql("BEGIN; INSERT INTO notes (body) VALUES ('left open')")
        .execute(&mut connection)
        .await
        .unwrap();
    // The test's own client fails rather than wait (stderr says why), and none of its
    // bytes reached the lent session: sqlx's transaction goes on.
    let error = db.client().simple_query("SELECT 1").await.unwrap_err();
    assert!(error.is_closed(), "{error}");
    let (rows,): (i64,) = sqlx::query_as("SELECT count(*) FROM notes")
        .fetch_one(&mut connection)
        .await
        .unwrap();
    assert_eq!(rows, 1);
    drop(connection);
    closers.close().await;
    pgharness::__macro::finish(db, ());
    assert!(
        pgharness::ledger::settle(&watcher, &common::admin_ns(), &run, Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert_eq!(
        ledger_status(&watcher, &schema).await.as_deref(),
        Some("ready")
    );
    let schema = common::current_name(&watcher, &schema).await.unwrap();
    let rows: i64 = watcher
        .query_one(&format!("SELECT count(*) FROM \"{schema}\".notes"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        rows, 0,
        "the open transaction was rolled back, not committed"
    );
}

/// A lent connection the test kept in use past its end (a server that outlives it): the
/// teardown does not wait for it, and the schema is finished once it closes.
#[tokio::test]
async fn a_lent_connection_still_in_use_gets_the_teardown_when_it_closes() {
    if !lent_here() {
        eprintln!("nothing is lent through the RDS proxy");
        return;
    }
    let server = configured_server().await;
    let watcher = common::runner(&server).await;
    let (db, run) = database("kept", Teardown::Detached).await;
    let schema = db.schema().to_owned();
    let mut closers = Closers::lending();
    let pool = PgPool::inject(&db, &mut closers).await;
    let mut held = pool.acquire().await.unwrap();
    assert!(holds_the_owner_lock(&mut held).await);
    // The body "returns" without closing the pool: the connection is still out.
    drop(closers);
    pgharness::__macro::finish(db, ());
    assert_eq!(
        ledger_status(&watcher, &schema).await.as_deref(),
        Some("active"),
        "nothing was finished under a connection in use"
    );
    sqlx::query("INSERT INTO notes (body) VALUES ('late')")
        .execute(&mut *held)
        .await
        .unwrap();
    drop(held);
    pool.close().await;
    assert!(
        pgharness::ledger::settle(&watcher, &common::admin_ns(), &run, Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert_eq!(
        ledger_status(&watcher, &schema).await.as_deref(),
        Some("ready")
    );
}

/// `lend_session = false`: the pool's first connection is a backend of its own.
#[tokio::test]
async fn with_lend_session_off_the_first_connection_is_a_backend_of_its_own() {
    if !lent_here() {
        return;
    }
    let _server = configured_server().await;
    let run = format!("it-lend-off-{}", uuid::Uuid::new_v4());
    let mut settings = settings(&run, Teardown::Inline);
    settings.lend_session = false;
    let db = TestDb::builder()
        .settings(settings)
        .without_migrations()
        .build()
        .await
        .unwrap();
    let mut closers = Closers::lending();
    let pool = PgPool::inject(&db, &mut closers).await;
    let mut first = pool.acquire().await.unwrap();
    assert!(!holds_the_owner_lock(&mut first).await);
    drop(first);
    closers.close().await;
    // The control client was never held: it still answers.
    db.client().simple_query("SELECT 1").await.unwrap();
    pgharness::__macro::finish(db, ());
}
