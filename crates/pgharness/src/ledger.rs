//! The ledger `pgharness.ledger`: one row per test schema with its owner, status and phase
//! timings. It is what the reaper trusts (it drops nothing that is not in it) and what the
//! run summary reads.
//!
//! Liveness is decided by Postgres advisory locks, not by pids: a test holds a
//! session-level lock on its schema's key for as long as its control connection lives, so
//! a killed process releases it the moment its socket closes, on any host.

use std::time::Duration;

use tokio_postgres::Client;

use crate::error::Error;
use crate::script::quote_literal;

/// Advisory-lock namespace (first key) for schema owners.
pub(crate) const SCHEMA_LOCK_SPACE: i32 = 0x7067_6800;
/// Advisory-lock namespace for runs (held by `cargo xtask test` for the whole run).
pub(crate) const RUN_LOCK_SPACE: i32 = 0x7067_6801;
/// Advisory-lock namespace for creating the ledger itself.
const BOOTSTRAP_LOCK_SPACE: i32 = 0x7067_6802;

/// Status of a ledger row.
pub(crate) mod status {
    pub(crate) const ACTIVE: &str = "active";
    pub(crate) const PASSED: &str = "passed";
    pub(crate) const KEPT: &str = "kept";
    pub(crate) const DROPPED: &str = "dropped";
}

/// SQL that creates the ledger when it is missing, safe to run concurrently. Part of the
/// first batch of every test, so it costs no extra round trip.
pub(crate) fn ensure_sql() -> String {
    format!(
        "DO $pgh$ BEGIN
  IF to_regclass('pgharness.ledger') IS NULL THEN
    PERFORM pg_advisory_xact_lock({BOOTSTRAP_LOCK_SPACE}, 0);
    CREATE SCHEMA IF NOT EXISTS pgharness;
    CREATE TABLE IF NOT EXISTS pgharness.ledger (
      schema_name text PRIMARY KEY,
      run_id text NOT NULL,
      test_name text NOT NULL,
      attempt integer NOT NULL,
      host text NOT NULL,
      pid integer NOT NULL,
      lock_key integer NOT NULL,
      migrations_hash text NOT NULL,
      status text NOT NULL,
      created_at timestamptz NOT NULL DEFAULT now(),
      ended_at timestamptz,
      connect_ms double precision,
      create_ms double precision,
      migrate_ms double precision,
      fixtures_ms double precision,
      acquire_ms double precision,
      drop_ms double precision
    );
    CREATE INDEX IF NOT EXISTS ledger_run ON pgharness.ledger (run_id);
    -- Any role that may create schemas may use the ledger (test databases only).
    GRANT USAGE ON SCHEMA pgharness TO PUBLIC;
    GRANT SELECT, INSERT, UPDATE, DELETE ON pgharness.ledger TO PUBLIC;
  END IF;
END $pgh$;"
    )
}

/// Milliseconds between two `set_config` marks made with `mark()`.
pub(crate) fn elapsed_ms(from: &str, to: &str) -> String {
    format!(
        "1000 * extract(epoch from (current_setting('pgharness.{to}')::timestamptz - current_setting('pgharness.{from}')::timestamptz))"
    )
}

/// Milliseconds from a `mark()` until now.
pub(crate) fn ms_since(from: &str) -> String {
    format!(
        "1000 * extract(epoch from (clock_timestamp() - current_setting('pgharness.{from}')::timestamptz))"
    )
}

/// Records the current time under `pgharness.<name>` for this transaction.
pub(crate) fn mark(name: &str) -> String {
    format!("SELECT set_config('pgharness.{name}', clock_timestamp()::text, true);")
}

/// What one run did, read from the ledger.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSummary {
    /// Distinct tests that asked for a database.
    pub tests: u64,
    /// Schemas created by the run.
    pub created: u64,
    /// Schemas dropped (by their test or the janitor).
    pub dropped: u64,
    /// Schemas kept for debugging (failed tests, or keep = always).
    pub kept: u64,
    /// Schemas still waiting to be dropped, or whose test did not finish.
    pub pending: u64,
    /// Median time from asking for a database to having it, in milliseconds.
    pub acquire_p50_ms: Option<f64>,
    /// 95th percentile of the same.
    pub acquire_p95_ms: Option<f64>,
    /// Median time to drop a schema, in milliseconds.
    pub drop_p50_ms: Option<f64>,
    /// Names of kept schemas, with their tests.
    pub kept_schemas: Vec<(String, String)>,
}

/// Reads the summary of one run. A server that has no ledger yet has an empty summary.
pub async fn run_summary(client: &Client, run_id: &str) -> Result<RunSummary, Error> {
    let exists = client
        .query_one("SELECT to_regclass('pgharness.ledger') IS NOT NULL", &[])
        .await
        .map_err(|e| Error::postgres("failed to look for the ledger", e))?;
    if !exists.get::<_, bool>(0) {
        return Ok(RunSummary::default());
    }
    let row = client
        .query_one(
            "SELECT count(DISTINCT test_name),
                    count(*),
                    count(*) FILTER (WHERE status = 'dropped'),
                    count(*) FILTER (WHERE status = 'kept'),
                    count(*) FILTER (WHERE status IN ('active', 'passed')),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY acquire_ms),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY acquire_ms),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY drop_ms)
               FROM pgharness.ledger WHERE run_id = $1",
            &[&run_id],
        )
        .await
        .map_err(|e| Error::postgres("failed to read the run summary", e))?;
    let kept = client
        .query(
            "SELECT schema_name, test_name FROM pgharness.ledger
              WHERE run_id = $1 AND status = 'kept' ORDER BY created_at",
            &[&run_id],
        )
        .await
        .map_err(|e| Error::postgres("failed to read kept schemas", e))?;
    let count = |i: usize| row.get::<_, i64>(i) as u64;
    Ok(RunSummary {
        tests: count(0),
        created: count(1),
        dropped: count(2),
        kept: count(3),
        pending: count(4),
        acquire_p50_ms: row.get(5),
        acquire_p95_ms: row.get(6),
        drop_p50_ms: row.get(7),
        kept_schemas: kept.iter().map(|r| (r.get(0), r.get(1))).collect(),
    })
}

/// Which schemas a reap may drop.
#[derive(Clone, Debug)]
pub enum ReapScope {
    /// The janitor of a live run: only that run's `passed` schemas whose test has ended.
    FinishedInRun(String),
    /// Everything of runs that are over: `passed` schemas at once, kept and abandoned
    /// (test killed) schemas once older than the TTL. Never a live run's schemas.
    Stale {
        /// How long kept and abandoned schemas are left for debugging.
        ttl: Duration,
        /// A run none of whose tests holds a lock still counts as live for this long after
        /// its last schema was created or ended (the gap between two tests of a plain
        /// `cargo nextest run`, which has no run lock). `cargo xtask reap` uses 30 s.
        run_grace: Duration,
    },
}

/// What a reap did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReapReport {
    /// Schemas dropped, in order.
    pub dropped: Vec<String>,
    /// Schemas that were eligible but whose owner came back (lock taken) and were left.
    pub skipped: u64,
}

/// Drops the schemas `scope` allows. Each drop first takes the schema's owner lock, so a
/// schema whose test is alive is never touched, even in a race.
pub async fn reap(client: &Client, scope: &ReapScope) -> Result<ReapReport, Error> {
    let exists = client
        .query_one("SELECT to_regclass('pgharness.ledger') IS NOT NULL", &[])
        .await
        .map_err(|e| Error::postgres("failed to look for the ledger", e))?;
    if !exists.get::<_, bool>(0) {
        return Ok(ReapReport::default());
    }
    // Advisory locks held in this database, as (space, key).
    let held = "SELECT classid::bigint AS space, objid::bigint AS key FROM pg_locks
                 WHERE locktype = 'advisory' AND granted AND objsubid = 2
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    let owner_gone = format!(
        "NOT EXISTS (SELECT 1 FROM held WHERE held.space = {SCHEMA_LOCK_SPACE} AND held.key = l.lock_key)"
    );
    let query = match scope {
        ReapScope::FinishedInRun(run_id) => format!(
            "WITH held AS ({held})
             SELECT schema_name, lock_key FROM pgharness.ledger l
              WHERE run_id = {} AND status = 'passed' AND {owner_gone}
              ORDER BY created_at",
            quote_literal(run_id)
        ),
        ReapScope::Stale { ttl, run_grace } => format!(
            "WITH held AS ({held}),
             live_runs AS (
               SELECT run_id FROM pgharness.ledger l
                GROUP BY run_id
               HAVING bool_or(EXISTS (SELECT 1 FROM held WHERE held.space = {SCHEMA_LOCK_SPACE} AND held.key = l.lock_key))
                   OR bool_or(EXISTS (SELECT 1 FROM held WHERE held.space = {RUN_LOCK_SPACE}
                                        AND held.key = ('x' || substr(md5(l.run_id), 1, 8))::bit(32)::int & 2147483647))
                   OR max(coalesce(ended_at, created_at)) > now() - make_interval(secs => {})
             )
             SELECT schema_name, lock_key FROM pgharness.ledger l
              WHERE status IN ('active', 'passed', 'kept')
                AND run_id NOT IN (SELECT run_id FROM live_runs)
                AND {owner_gone}
                AND (status = 'passed' OR coalesce(ended_at, created_at) < now() - make_interval(secs => {}))
              ORDER BY created_at",
            run_grace.as_secs_f64(),
            ttl.as_secs_f64()
        ),
    };
    let candidates = client
        .query(&query, &[])
        .await
        .map_err(|e| Error::postgres("failed to find schemas to reap", e))?;
    let mut report = ReapReport::default();
    for row in candidates {
        let schema: String = row.get(0);
        let key: i32 = row.get(1);
        let taken: bool = client
            .query_one(
                "SELECT pg_try_advisory_lock($1, $2)",
                &[&SCHEMA_LOCK_SPACE, &key],
            )
            .await
            .map_err(|e| Error::postgres("failed to take a schema lock", e))?
            .get(0);
        if !taken {
            report.skipped += 1;
            continue;
        }
        let result = drop_schema(client, &schema).await;
        client
            .query_one(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&SCHEMA_LOCK_SPACE, &key],
            )
            .await
            .map_err(|e| Error::postgres("failed to release a schema lock", e))?;
        result?;
        report.dropped.push(schema);
    }
    // History older than a week goes.
    client
        .execute(
            "DELETE FROM pgharness.ledger WHERE status = 'dropped' AND ended_at < now() - interval '7 days'",
            &[],
        )
        .await
        .map_err(|e| Error::postgres("failed to trim the ledger", e))?;
    Ok(report)
}

/// Drops one schema and records it; the SQL of a test's own teardown too.
pub(crate) fn drop_sql(schema: &str) -> String {
    let ident = crate::script::quote_ident(schema);
    let literal = quote_literal(schema);
    format!(
        "BEGIN;
{}
DROP SCHEMA IF EXISTS {ident} CASCADE;
UPDATE pgharness.ledger SET status = '{}', ended_at = coalesce(ended_at, now()),
       drop_ms = {}
 WHERE schema_name = {literal};
COMMIT;",
        mark("d0"),
        status::DROPPED,
        ms_since("d0")
    )
}

async fn drop_schema(client: &Client, schema: &str) -> Result<(), Error> {
    client
        .batch_execute(&drop_sql(schema))
        .await
        .map_err(|e| Error::postgres(format!("failed to drop schema {schema}"), e))
}

/// Takes the run lock that marks a run as live for every other reaper. Held until the
/// client's connection closes.
pub async fn hold_run_lock(client: &Client, run_id: &str) -> Result<(), Error> {
    client
        .query_one(
            "SELECT pg_advisory_lock($1, ('x' || substr(md5($2), 1, 8))::bit(32)::int & 2147483647)",
            &[&RUN_LOCK_SPACE, &run_id],
        )
        .await
        .map_err(|e| Error::postgres("failed to take the run lock", e))?;
    Ok(())
}
