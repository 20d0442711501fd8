//! What happens to a schema after its test: dropped when it passes, kept (with a working
//! psql command) when it fails, reaped when its process was killed, never while it lives.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{admin, child_binary, configured_server, ledger_status, schema_exists};
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
    let command = stderr
        .lines()
        .find_map(|line| line.trim().strip_prefix("psql '")?.strip_suffix('\''))
        .unwrap_or_else(|| panic!("no psql command in:\n{stderr}"));
    let psql = Command::new("psql")
        .arg(command)
        .args(["-XAtc", "SELECT note FROM marker"])
        .output()
        .expect("psql runs");
    assert!(
        psql.status.success(),
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&psql.stdout).trim(), "kept");

    let client = admin(&server).await;
    let schema: String = client
        .query_one(
            "SELECT schema_name FROM pgharness.ledger WHERE run_id = $1",
            &[&run],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        ledger_status(&client, &schema).await.as_deref(),
        Some("kept")
    );
    // Kept schemas survive a reap inside their TTL, and go after it.
    let scope = |ttl| ReapScope::Stale {
        ttl,
        run_grace: Duration::ZERO,
    };
    ledger::reap(&client, &scope(Duration::from_secs(3600)))
        .await
        .unwrap();
    assert!(schema_exists(&client, &schema).await);
    let report = ledger::reap(&client, &scope(Duration::ZERO)).await.unwrap();
    assert!(report.dropped.contains(&schema), "{report:?}");
    assert!(!schema_exists(&client, &schema).await);
}

#[tokio::test]
async fn a_killed_test_is_reaped_and_a_live_one_never_is() {
    let server = configured_server().await;
    let client = admin(&server).await;
    let run = unique_run("kill");
    let mut child = Command::new(child_binary())
        .arg("hold")
        .env("PGHARNESS_RUN_ID", &run)
        .stdout(Stdio::piped())
        .spawn()
        .expect("the child runs");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let schema = line.trim().to_owned();
    assert!(schema.starts_with("t_"), "{schema:?}");

    let scope = ReapScope::Stale {
        ttl: Duration::ZERO,
        run_grace: Duration::ZERO,
    };
    let report = ledger::reap(&client, &scope).await.unwrap();
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
        let report = ledger::reap(&client, &scope).await.unwrap();
        if report.dropped.contains(&schema) {
            dropped = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(dropped, "the killed test's schema was not reaped");
    assert!(!schema_exists(&client, &schema).await);
    assert_eq!(
        ledger_status(&client, &schema).await.as_deref(),
        Some("dropped")
    );
}

#[tokio::test]
async fn a_passing_test_drops_its_schema_inline() {
    let server = configured_server().await;
    let client = admin(&server).await;
    let mut settings = pgharness::Settings::load().unwrap();
    settings.teardown = Teardown::Inline;
    let db = TestDb::builder()
        .settings(settings)
        .without_migrations()
        .build()
        .await
        .unwrap();
    let schema = db.schema().to_owned();
    assert!(schema_exists(&client, &schema).await);
    drop(db);
    assert!(!schema_exists(&client, &schema).await);
    assert_eq!(
        ledger_status(&client, &schema).await.as_deref(),
        Some("dropped")
    );
}

#[tokio::test]
async fn deferred_teardown_leaves_the_drop_to_the_janitor() {
    let server = configured_server().await;
    let client = admin(&server).await;
    let mut settings = pgharness::Settings::load().unwrap();
    settings.teardown = Teardown::Deferred;
    let run = unique_run("deferred");
    settings.run_id = Some(run.clone());
    let db = TestDb::builder()
        .settings(settings)
        .without_migrations()
        .build()
        .await
        .unwrap();
    let schema = db.schema().to_owned();
    drop(db);
    assert!(schema_exists(&client, &schema).await);
    assert_eq!(
        ledger_status(&client, &schema).await.as_deref(),
        Some("passed")
    );
    let report = ledger::reap(&client, &ReapScope::FinishedInRun(run))
        .await
        .unwrap();
    assert_eq!(report.dropped, std::slice::from_ref(&schema));
    assert!(!schema_exists(&client, &schema).await);
}

#[tokio::test]
async fn the_ledger_records_phase_timings() {
    let db = TestDb::builder()
        .fixtures_dir(env!("CARGO_MANIFEST_DIR"))
        .without_migrations()
        .build()
        .await
        .unwrap();
    let row = db
        .client()
        .query_one(
            "SELECT connect_ms, create_ms, migrate_ms, fixtures_ms, host, pid FROM pgharness.ledger WHERE schema_name = $1",
            &[&db.schema()],
        )
        .await
        .unwrap();
    for phase in 0..4 {
        let ms: f64 = row.get(phase);
        assert!(ms >= 0.0, "phase {phase}: {ms}");
    }
    assert_eq!(row.get::<_, i32>(5) as u32, std::process::id());
    assert!(!row.get::<_, String>(4).is_empty());
}
