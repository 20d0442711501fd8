//! What happens to a schema after its test: returned to the pool when it passes, kept
//! (with a working psql command) when it fails, reaped when its process was killed, never
//! while it lives.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{child_binary, configured_server, ledger_status, own_migrations, schema_exists};
use pgharness::ledger::{self, ReapScope};
use pgharness::{Teardown, TestDb};

fn unique_run(label: &str) -> String {
    format!("it-{label}-{}", uuid::Uuid::new_v4())
}

#[tokio::test]
async fn a_failing_test_keeps_its_schema_and_prints_a_psql_command_that_works() {
    let server = configured_server().await;
    let run = unique_run("fail");
    let output = Command::new(child_binary())
        .arg("fail")
        .env("PGHARNESS_RUN_ID", &run)
        .output()
        .expect("the child runs");
    assert!(!output.status.success(), "the child must fail");
    let stderr = String::from_utf8_lossy(&output.stderr);
    // The printed line, run exactly as printed (by a shell, as a person pastes it).
    let command = stderr
        .lines()
        .map(str::trim)
        .find(|line| line.contains("psql "))
        .unwrap_or_else(|| panic!("no psql command in:\n{stderr}"));
    let psql = Command::new("sh")
        .arg("-c")
        .arg(format!("{command} -XAtc 'SELECT note FROM marker'"))
        .env_remove("PGPASSWORD")
        .output()
        .expect("psql runs");
    assert!(
        psql.status.success(),
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&psql.stdout).trim(), "kept");

    let client = common::runner(&server).await;
    let schema = common::schema_of_run(&client, &run).await;
    assert_eq!(
        ledger_status(&client, &schema).await.as_deref(),
        Some("kept")
    );
    // Kept schemas survive a reap inside their TTL, and go after it.
    let scope = |ttl| ReapScope::Stale {
        ttl,
        run_grace: Duration::ZERO,
    };
    ledger::reap(
        &client,
        &common::admin_ns(),
        &scope(Duration::from_secs(3600)),
    )
    .await
    .unwrap();
    assert!(schema_exists(&client, &schema).await);
    let report = ledger::reap(&client, &common::admin_ns(), &scope(Duration::ZERO))
        .await
        .unwrap();
    assert!(report.dropped.contains(&schema), "{report:?}");
    assert!(!schema_exists(&client, &schema).await);
}

#[tokio::test]
async fn a_killed_test_is_reaped_and_a_live_one_never_is() {
    let server = configured_server().await;
    // A role of its own: a reap with no TTL and no grace takes everything stale of its
    // role, which on the shared one would include other tests' kept schemas.
    let admin = common::admin(&server).await;
    let role = common::Role::create(&admin, "kill", &server).await;
    let client = role.client().await;
    let ns = pgharness::ledger::Namespace::of(&role.url().parse().unwrap());
    let run = unique_run("kill");
    let mut child = Command::new(child_binary())
        .arg("hold")
        .env("PGHARNESS_BACKEND", "url")
        .env("PGHARNESS_URL", role.url())
        .env("PGHARNESS_RUN_ID", &run)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the child runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let schema = line.trim().to_owned();
    assert!(schema.starts_with("p_"), "{schema:?}");

    let scope = ReapScope::Stale {
        ttl: Duration::ZERO,
        run_grace: Duration::ZERO,
    };
    let report = ledger::reap(&client, &ns, &scope).await.unwrap();
    assert!(
        !report.dropped.contains(&schema),
        "a live test's schema was reaped"
    );
    assert!(schema_exists(&client, &schema).await);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    child.wait().unwrap();
    // The server notices the closed socket and releases the owner lock.
    let mut dropped = false;
    for _ in 0..50 {
        let report = ledger::reap(&client, &ns, &scope).await.unwrap();
        if report.dropped.contains(&schema) {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dropped, "the killed test's schema was not reaped");
    assert!(!schema_exists(&client, &schema).await);
    let status: Option<String> = client
        .query_opt(
            &format!("SELECT status FROM {ns}.ledger WHERE schema_name = $1"),
            &[&schema],
        )
        .await
        .unwrap()
        .map(|row| row.get(0));
    assert_eq!(status.as_deref(), Some("dropped"));
    drop(client);
    role.drop_all(&admin).await;
}

/// The next test of the migration set in `dir` gets `schema` back, empty and with fresh
/// sequences (its migrations make `notes` with a `bigserial` id).
async fn gets_it_back_fresh(settings: pgharness::Settings, dir: &std::path::Path, schema: &str) {
    let db = TestDb::builder()
        .settings(settings)
        .migrations(dir)
        .build()
        .await
        .unwrap();
    // A recycled schema comes back under a new name.
    let now = common::current_name(db.client(), schema).await;
    assert_eq!(Some(db.schema()), now.as_deref());
    let row = db
        .client()
        .query_one("SELECT count(*), nextval('notes_id_seq') FROM notes", &[])
        .await
        .unwrap();
    assert_eq!((row.get::<_, i64>(0), row.get::<_, i64>(1)), (0, 1));
}

#[tokio::test]
async fn a_passing_test_returns_its_schema_to_the_pool_inline() {
    let server = configured_server().await;
    let client = common::runner(&server).await;
    let mut settings = pgharness::Settings::load().unwrap();
    settings.teardown = Teardown::Inline;
    // A migration set of this test's own, so that no other test claims its schema.
    let dir = own_migrations(
        "inline",
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text);",
    );
    let db = TestDb::builder()
        .settings(settings.clone())
        .migrations(&dir)
        .build()
        .await
        .unwrap();
    let schema = db.schema().to_owned();
    db.client()
        .batch_execute("INSERT INTO notes (body) VALUES ('a'), ('b')")
        .await
        .unwrap();
    drop(db);
    assert_eq!(
        ledger_status(&client, &schema).await.as_deref(),
        Some("ready")
    );
    let renamed = common::current_name(&client, &schema).await.unwrap();
    assert!(
        !schema_exists(&client, &schema).await,
        "recycled under its old name"
    );
    assert!(schema_exists(&client, &renamed).await);
    gets_it_back_fresh(settings, &dir, &schema).await;
}

#[tokio::test]
async fn a_passing_test_that_changed_the_structure_has_its_schema_dropped() {
    let server = configured_server().await;
    let client = common::runner(&server).await;
    let mut settings = pgharness::Settings::load().unwrap();
    settings.teardown = Teardown::Inline;
    let dir = own_migrations(
        "ddl",
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text);",
    );
    let db = TestDb::builder()
        .settings(settings)
        .migrations(&dir)
        .build()
        .await
        .unwrap();
    let schema = db.schema().to_owned();
    db.client()
        .batch_execute("ALTER TABLE notes ADD COLUMN extra int")
        .await
        .unwrap();
    drop(db);
    assert!(!schema_exists(&client, &schema).await);
    assert_eq!(
        ledger_status(&client, &schema).await.as_deref(),
        Some("dropped")
    );
}

#[tokio::test]
async fn deferred_teardown_leaves_the_reset_to_the_janitor() {
    let server = configured_server().await;
    let client = common::runner(&server).await;
    let mut settings = pgharness::Settings::load().unwrap();
    settings.teardown = Teardown::Deferred;
    let run = unique_run("deferred");
    settings.run_id = Some(run.clone());
    let dir = own_migrations("deferred", "CREATE TABLE notes (id bigserial PRIMARY KEY);");
    let db = TestDb::builder()
        .settings(settings)
        .migrations(&dir)
        .build()
        .await
        .unwrap();
    let schema = db.schema().to_owned();
    db.client()
        .batch_execute("INSERT INTO notes DEFAULT VALUES")
        .await
        .unwrap();
    drop(db);
    // Sent without waiting: the sync point is the server having applied it.
    assert!(
        ledger::settle(&client, &common::admin_ns(), &run, Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert_eq!(
        ledger_status(&client, &schema).await.as_deref(),
        Some("passed")
    );
    let report = ledger::reap(&client, &common::admin_ns(), &ReapScope::FinishedInRun(run))
        .await
        .unwrap();
    assert_eq!(report.recycled, std::slice::from_ref(&schema));
    assert_eq!(
        ledger_status(&client, &schema).await.as_deref(),
        Some("ready")
    );
    let schema = common::current_name(&client, &schema).await.unwrap();
    let rows: i64 = client
        .query_one(&format!("SELECT count(*) FROM \"{schema}\".notes"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 0);
}

#[tokio::test]
async fn the_acquire_log_records_each_acquire_with_its_phase_timings() {
    let server = configured_server().await;
    let client = common::runner(&server).await;
    let mut settings = pgharness::Settings::load().unwrap();
    settings.teardown = Teardown::Inline;
    // A name that SQL quoting must carry intact: a quote and a backslash.
    let test_name = format!("timings_it's_a\\b_{}", uuid::Uuid::new_v4().simple());
    let dir = own_migrations("timings", "CREATE TABLE notes (id bigserial PRIMARY KEY);");
    for _ in 0..2 {
        let db = TestDb::builder()
            .settings(settings.clone())
            .migrations(&dir)
            .fixtures_dir(env!("CARGO_MANIFEST_DIR"))
            .test_name(&test_name)
            .build()
            .await
            .unwrap();
        drop(db);
    }
    let rows = client
        .query(
            &format!(
                "SELECT path, connect_ms, claim_ms, create_ms, migrate_ms, acquire_ms, outcome
                   FROM {}.acquires WHERE test_name = $1 ORDER BY at",
                common::admin_ns()
            ),
            &[&test_name],
        )
        .await
        .unwrap();
    let paths: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    // Its own migration set: the first finds none ready, the second gets the first's back.
    assert_eq!(paths, ["created", "claimed"]);
    for row in &rows {
        for phase in [1, 2, 5] {
            let ms: f64 = row.get(phase);
            assert!(ms > 0.0, "phase {phase}: {ms}");
        }
        assert_eq!(row.get::<_, Option<String>>(6).as_deref(), Some("recycled"));
    }
    assert!(
        rows[0].get::<_, Option<f64>>(3).is_some() && rows[0].get::<_, Option<f64>>(4).is_some()
    );
    assert!(
        rows[1].get::<_, Option<f64>>(3).is_none(),
        "a claimed schema was not created"
    );
}

/// The default teardown is sent and not waited for: `drop` returns while the reset cannot
/// run yet (another session holds a lock on the test's table: a teardown that waited would
/// wait out the lock, then fail), and the server recycles the schema once it can, after
/// the test.
#[tokio::test]
async fn a_detached_teardown_returns_at_once_and_the_server_recycles_the_schema_after() {
    let server = configured_server().await;
    let mut locker = common::runner(&server).await;
    let watcher = common::runner(&server).await;
    let mut settings = pgharness::Settings::load().unwrap();
    settings.teardown = Teardown::Detached;
    let dir = own_migrations(
        "detached",
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text);",
    );
    let db = TestDb::builder()
        .settings(settings.clone())
        .migrations(&dir)
        .build()
        .await
        .unwrap();
    let schema = db.schema().to_owned();
    db.client()
        .batch_execute("INSERT INTO notes (body) VALUES ('a'), ('b')")
        .await
        .unwrap();
    let lock = locker.transaction().await.unwrap();
    lock.batch_execute(&format!(
        "LOCK TABLE \"{schema}\".notes IN ACCESS EXCLUSIVE MODE"
    ))
    .await
    .unwrap();
    drop(db);
    // The sync point: `drop` has returned, and the reset is waiting for the lock.
    let waiting = async {
        for _ in 0..500 {
            let row = watcher
                .query_one(
                    "SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                      WHERE NOT l.granted AND c.relname = 'notes'
                        AND c.relnamespace = to_regnamespace(quote_ident($1))",
                    &[&schema],
                )
                .await
                .unwrap();
            if row.get::<_, i64>(0) > 0 {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    };
    assert!(waiting.await, "the server never ran the reset");
    assert_eq!(
        ledger_status(&watcher, &schema).await.as_deref(),
        Some("active"),
        "recycled under a lock"
    );
    lock.rollback().await.unwrap();
    let mut status = None;
    for _ in 0..500 {
        status = ledger_status(&watcher, &schema).await;
        if status.as_deref() != Some("active") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status.as_deref(), Some("ready"));
    gets_it_back_fresh(settings, &dir, &schema).await;
}

/// A detached teardown that fails on the server, after its test, is recorded in the acquire
/// log and named by the run summary (what `cargo pgharness test` prints).
#[tokio::test]
async fn a_failed_detached_teardown_is_named_by_the_run_summary() {
    let server = configured_server().await;
    let admin = common::admin(&server).await;
    let role = common::Role::create(&admin, "detached", &server).await;
    let run = unique_run("broken-detached");
    let output = Command::new(child_binary())
        .arg("broken-teardown")
        .env("PGHARNESS_BACKEND", "url")
        .env("PGHARNESS_URL", role.url())
        .env("PGHARNESS_RUN_ID", &run)
        .env("PGHARNESS_TEARDOWN", "detached")
        .env_remove("RUST_LOG")
        .output()
        .expect("the child runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let client = role.client().await;
    let ns = pgharness::ledger::Namespace::of(&role.url().parse().unwrap());
    let mut summary = Default::default();
    for _ in 0..500 {
        summary = ledger::run_summary(&client, &ns, &run).await.unwrap();
        if !summary.teardown_failures.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let failures = &summary.teardown_failures;
    assert_eq!(failures.len(), 1, "{summary:?}");
    assert_eq!(failures[0].0, "selftest_broken-teardown");
    assert!(
        failures[0].1.starts_with("failed: 42883") && failures[0].1.contains("finish"),
        "{failures:?}"
    );
    drop(client);
    role.drop_all(&admin).await;
}

/// A teardown that fails says so on stderr, where the test's output is, even in a project
/// that installs no tracing subscriber (the child installs none): when the test waits for
/// it (`teardown = inline`).
#[tokio::test]
async fn a_failed_teardown_is_said_on_stderr_without_a_tracing_subscriber() {
    let server = configured_server().await;
    let admin = common::admin(&server).await;
    // A role of its own: the child breaks that role's ledger, nobody else's.
    let role = common::Role::create(&admin, "teardown", &server).await;
    let output = Command::new(child_binary())
        .arg("broken-teardown")
        .env("PGHARNESS_BACKEND", "url")
        .env("PGHARNESS_URL", role.url())
        .env("PGHARNESS_RUN_ID", unique_run("broken-teardown"))
        .env("PGHARNESS_TEARDOWN", "inline")
        .env_remove("RUST_LOG")
        .output()
        .expect("the child runs");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("the teardown of test `selftest_broken-teardown` failed")
            && stderr.contains("cargo pgharness reap"),
        "{stderr}"
    );
    role.drop_all(&admin).await;
}

/// A test that leaves a transaction open on its client still has its schema recycled by the
/// detached teardown (its rows, committed by the teardown's own COMMIT, then deleted).
#[tokio::test]
async fn a_detached_teardown_recycles_a_schema_whose_client_left_a_transaction_open() {
    let server = configured_server().await;
    let watcher = common::runner(&server).await;
    let mut settings = pgharness::Settings::load().unwrap();
    settings.teardown = Teardown::Detached;
    let run = unique_run("open-transaction");
    settings.run_id = Some(run.clone());
    let dir = own_migrations(
        "open-transaction",
        "CREATE TABLE notes (id bigserial PRIMARY KEY, body text);",
    );
    let db = TestDb::builder()
        .settings(settings.clone())
        .migrations(&dir)
        .build()
        .await
        .unwrap();
    let schema = db.schema().to_owned();
    db.client()
        .batch_execute("BEGIN; INSERT INTO notes (body) VALUES ('left open');")
        .await
        .unwrap();
    drop(db);
    assert!(
        ledger::settle(&watcher, &common::admin_ns(), &run, Duration::from_secs(10))
            .await
            .unwrap()
    );
    assert_eq!(
        ledger_status(&watcher, &schema).await.as_deref(),
        Some("ready")
    );
    gets_it_back_fresh(settings, &dir, &schema).await;
}
