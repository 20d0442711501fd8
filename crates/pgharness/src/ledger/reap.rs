//! Reaping: recycling or dropping the schemas a scope allows (each locked first, so a live
//! test's schema is never touched), and the run lock a runner holds.

use std::time::Duration;

use tokio_postgres::Client;

use super::*;
use crate::error::Error;
use crate::script::quote_literal;

/// Ready schemas unused for this long are dropped by a stale reap.
pub const POOL_IDLE_LIMIT: Duration = Duration::from_secs(24 * 3600);

/// Which schemas a reap may touch.
#[derive(Clone, Debug)]
pub enum ReapScope {
    /// The janitor of a live run: that run's `passed` schemas whose test has ended are
    /// reset and returned to the pool (or dropped when their structure changed).
    FinishedInRun(String),
    /// Everything of runs that are over: `passed` and abandoned (test killed) schemas are
    /// recycled or dropped, kept ones dropped once older than the TTL; ready schemas of
    /// the pool are dropped when a newer migration set of the same source replaced theirs,
    /// or when unused for [`POOL_IDLE_LIMIT`]. Never a live run's schemas.
    Stale {
        /// How long kept, abandoned and unused ready schemas are left.
        ttl: Duration,
        /// A run none of whose tests holds a lock still counts as live for this long after
        /// its last schema was created or ended (the gap between two tests of a plain
        /// `cargo nextest run`, which has no run lock). `cargo pgharness reap` uses 30 s.
        run_grace: Duration,
    },
}

/// What a reap did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReapReport {
    /// Schemas dropped, in order.
    pub dropped: Vec<String>,
    /// Schemas reset and returned to the pool.
    pub recycled: Vec<String>,
    /// Schemas that were eligible but whose owner came back (lock taken) and were left.
    pub skipped: u64,
}

/// Waits, up to `within`, until the teardowns a run's tests sent without waiting for them
/// (detached or deferred: `parting`) have been applied: no schema of the run is `active`
/// while its owner's session is still there. A run's last tests end moments before the
/// run does, and the server applies their teardowns just after; a killed test's schema
/// (active, its session gone) is not waited for. Returns whether it settled in time.
pub async fn settle(
    client: &Client,
    ns: &Namespace,
    run_id: &str,
    within: std::time::Duration,
) -> Result<bool, Error> {
    if !check_namespace(client, ns).await? {
        return Ok(true);
    }
    let query = format!(
        "SELECT count(*) FROM {ns}.ledger l
          WHERE run_id = $1 AND status = 'active' AND EXISTS (
            SELECT 1 FROM pg_locks k
             WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 2
               AND k.classid::bigint = {SCHEMA_LOCK_SPACE} AND k.objid::bigint = l.lock_key
               AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database()))"
    );
    let deadline = std::time::Instant::now() + within;
    loop {
        let in_flight: i64 = client
            .query_one(&query, &[&run_id])
            .await
            .map_err(|e| Error::postgres("failed to read the run's teardowns", e))?
            .get(0);
        if in_flight == 0 {
            return Ok(true);
        }
        if std::time::Instant::now() >= deadline {
            return Ok(false);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Recycles or drops the schemas `scope` allows. Each one is first locked (its owner
/// lock, or for a ready schema its ledger row), so a schema whose test is alive, or that a
/// test is claiming, is never touched, even in a race.
pub async fn reap(client: &Client, ns: &Namespace, scope: &ReapScope) -> Result<ReapReport, Error> {
    if !check_namespace(client, ns).await? {
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
             SELECT schema_name, lock_key, 'recycle' FROM {ns}.ledger l
              WHERE run_id = {} AND status = 'passed' AND {owner_gone} AND {OWNED_BY_CURRENT_USER}
              ORDER BY created_at",
            quote_literal(run_id)
        ),
        ReapScope::Stale { ttl, run_grace } => format!(
            "WITH held AS ({held}),
             live_runs AS (
               SELECT run_id FROM {ns}.ledger l
                WHERE status <> 'ready'
                GROUP BY run_id
               HAVING bool_or(EXISTS (SELECT 1 FROM held WHERE held.space = {SCHEMA_LOCK_SPACE} AND held.key = l.lock_key))
                   OR bool_or(EXISTS (SELECT 1 FROM held WHERE held.space = {RUN_LOCK_SPACE}
                                        AND held.key = {}))
                   OR max(coalesce(ended_at, claimed_at, created_at)) > now() - make_interval(secs => {grace})
             )
             SELECT schema_name, lock_key, CASE WHEN status = 'kept' THEN 'drop' ELSE 'recycle' END
               FROM {ns}.ledger l
              WHERE status IN ('active', 'passed', 'kept') AND {OWNED_BY_CURRENT_USER}
                AND run_id NOT IN (SELECT run_id FROM live_runs)
                AND {owner_gone}
                AND (status <> 'kept' OR coalesce(ended_at, created_at) < now() - make_interval(secs => {ttl}))
             UNION ALL
             SELECT schema_name, lock_key, 'discard' FROM {ns}.ledger l
              WHERE status = 'ready' AND {OWNED_BY_CURRENT_USER}
                AND (coalesce(ended_at, created_at) < now() - make_interval(secs => {idle})
                     OR EXISTS (SELECT 1 FROM {ns}.ledger newer
                                 WHERE newer.source = l.source AND newer.source <> ''
                                   AND newer.migrations_hash <> l.migrations_hash
                                   AND coalesce(newer.claimed_at, newer.created_at)
                                       > coalesce(l.claimed_at, l.created_at)))
             ORDER BY 1",
            run_lock_key_sql("l.run_id"),
            grace = run_grace.as_secs_f64(),
            ttl = ttl.as_secs_f64(),
            idle = POOL_IDLE_LIMIT.as_secs_f64()
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
        let action: String = row.get(2);
        if action == "discard" {
            let dropped: bool = client
                .query_one(&format!("SELECT {ns}.discard($1)"), &[&schema])
                .await
                .map_err(|e| Error::postgres(format!("failed to drop schema {schema}"), e))?
                .get(0);
            if dropped {
                report.dropped.push(schema);
            } else {
                report.skipped += 1;
            }
            continue;
        }
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
        let result = if action == "drop" {
            drop_schema(client, ns, &schema)
                .await
                .map(|()| Recycled::Dropped)
        } else {
            recycle_schema(client, ns, &schema).await
        };
        client
            .query_one(
                "SELECT pg_advisory_unlock($1, $2)",
                &[&SCHEMA_LOCK_SPACE, &key],
            )
            .await
            .map_err(|e| Error::postgres("failed to release a schema lock", e))?;
        match result? {
            Recycled::Yes => report.recycled.push(schema),
            Recycled::Dropped => report.dropped.push(schema),
            Recycled::Busy => report.skipped += 1,
        }
    }
    // History older than a week goes.
    client
        .batch_execute(&format!(
            "DELETE FROM {ns}.ledger WHERE status = 'dropped' AND ended_at < now() - interval '7 days';
             DELETE FROM {ns}.acquires WHERE at < now() - interval '7 days';"
        ))
        .await
        .map_err(|e| Error::postgres("failed to trim the ledger", e))?;
    Ok(report)
}

/// Resets a schema whose owner is gone and returns it to the pool, or drops it when it
/// cannot be reset. The caller holds its owner lock.
async fn recycle_schema(client: &Client, ns: &Namespace, schema: &str) -> Result<Recycled, Error> {
    let outcome: String = client
        .query_one(
            &format!("SELECT {ns}.finish($1, NULL, 'recycle', NULL)"),
            &[&schema],
        )
        .await
        .map_err(|e| Error::postgres(format!("failed to recycle schema {schema}"), e))?
        .get(0);
    Ok(match outcome.as_str() {
        "recycled" => Recycled::Yes,
        busy if busy.starts_with("passed") => Recycled::Busy,
        _ => Recycled::Dropped,
    })
}

/// What became of a schema given back to the pool.
enum Recycled {
    Yes,
    Dropped,
    /// A session of its test is still connected: left for a later pass.
    Busy,
}

/// The run lock's key of a run id, as SQL over the expression `run_id`.
fn run_lock_key_sql(run_id: &str) -> String {
    format!("('x' || substr(md5({run_id}), 1, 8))::bit(32)::int & 2147483647")
}

/// Drops one schema (if the role owns it) and records it; the SQL of a test's own teardown
/// too.
pub(crate) fn drop_sql(ns: &Namespace, schema: &str) -> String {
    let literal = quote_literal(schema);
    format!(
        "BEGIN;
{}
SELECT {ns}.discard_owned({literal});
UPDATE {ns}.ledger SET status = '{}', ended_at = coalesce(ended_at, now()),
       drop_ms = {}
 WHERE schema_name = {literal};
COMMIT;",
        mark("d0"),
        status::DROPPED,
        ms_since("d0")
    )
}

async fn drop_schema(client: &Client, ns: &Namespace, schema: &str) -> Result<(), Error> {
    client
        .batch_execute(&drop_sql(ns, schema))
        .await
        .map_err(|e| Error::postgres(format!("failed to drop schema {schema}"), e))
}

/// Takes the run lock that marks a run as live for every other reaper. Held until the
/// client's connection closes.
pub async fn hold_run_lock(client: &Client, run_id: &str) -> Result<(), Error> {
    client
        .query_one(
            &format!("SELECT pg_advisory_lock($1, {})", run_lock_key_sql("$2")),
            &[&RUN_LOCK_SPACE, &run_id],
        )
        .await
        .map_err(|e| Error::postgres("failed to take the run lock", e))?;
    Ok(())
}
