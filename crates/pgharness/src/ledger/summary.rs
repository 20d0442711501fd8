//! The run summary: what one run did, read from the ledger and the acquire log.

use tokio_postgres::Client;

use super::*;
use crate::error::Error;

/// What one run did, read from the ledger and the acquire log.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunSummary {
    /// Distinct tests that asked for a database.
    pub tests: u64,
    /// Acquires served by a ready schema from the pool (hits).
    pub claimed: u64,
    /// Acquires that found none ready and created their schema (misses).
    pub created: u64,
    /// Schemas reset and returned to the pool after their test passed.
    pub recycled: u64,
    /// Schemas dropped after their test (their structure changed, or they could not be reset).
    pub dropped: u64,
    /// Schemas kept for debugging (failed tests, or keep = always).
    pub kept: u64,
    /// Acquires whose schema is not yet recycled or dropped, or whose test did not finish.
    pub pending: u64,
    /// Schemas whose teardown never came (a killed process, a teardown the server never
    /// ran), found and finished by a later teardown's sweep, the janitor or the reaper.
    pub lost: u64,
    /// Median time from asking for a database to having it, in milliseconds.
    pub acquire_p50_ms: Option<f64>,
    /// 95th percentile of the same.
    pub acquire_p95_ms: Option<f64>,
    /// Median acquire of tests served from the pool.
    pub claimed_p50_ms: Option<f64>,
    /// 95th percentile of the same.
    pub claimed_p95_ms: Option<f64>,
    /// Median acquire of tests that created their schema.
    pub created_p50_ms: Option<f64>,
    /// 95th percentile of the same.
    pub created_p95_ms: Option<f64>,
    /// Median time to reset a schema for the pool, in milliseconds.
    pub reset_p50_ms: Option<f64>,
    /// Kept schemas, with their tests.
    pub kept_schemas: Vec<(String, String)>,
    /// Teardowns that failed on the server after their test had moved on (a detached or
    /// deferred teardown): the test, and the outcome with the error (`failed: <SQLSTATE>
    /// <message>`). Their schemas are left for a sweep, the janitor or the reaper.
    pub teardown_failures: Vec<(String, String)>,
}

/// Reads the summary of one run. A server that has no ledger yet has an empty summary.
pub async fn run_summary(
    client: &Client,
    ns: &Namespace,
    run_id: &str,
) -> Result<RunSummary, Error> {
    if !check_namespace(client, ns).await? {
        return Ok(RunSummary::default());
    }
    let row = client
        .query_one(
            &format!("SELECT count(DISTINCT test_name),
                    count(*) FILTER (WHERE path = 'claimed'),
                    count(*) FILTER (WHERE path = 'lost'),
                    count(*) FILTER (WHERE path = 'created'),
                    count(*) FILTER (WHERE outcome = 'recycled'),
                    count(*) FILTER (WHERE outcome LIKE 'dropped%'),
                    count(*) FILTER (WHERE outcome = 'kept'),
                    count(*) FILTER (WHERE outcome IS NULL)
                      + (SELECT count(*) FROM {ns}.ledger l
                          WHERE l.run_id = $1 AND l.status = 'active'
                            AND NOT EXISTS (SELECT 1 FROM {ns}.acquires x WHERE x.schema_name = l.schema_name AND x.outcome IS NULL)),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY acquire_ms),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY acquire_ms),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY acquire_ms) FILTER (WHERE path = 'claimed'),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY acquire_ms) FILTER (WHERE path = 'claimed'),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY acquire_ms) FILTER (WHERE path = 'created'),
                    percentile_cont(0.95) WITHIN GROUP (ORDER BY acquire_ms) FILTER (WHERE path = 'created'),
                    percentile_cont(0.5) WITHIN GROUP (ORDER BY reset_ms) FILTER (WHERE outcome = 'recycled')
               FROM {ns}.acquires WHERE run_id = $1"),
            &[&run_id],
        )
        .await
        .map_err(|e| Error::postgres("failed to read the run summary", e))?;
    let kept = client
        .query(
            &format!(
                "SELECT schema_name, test_name FROM {ns}.acquires
                  WHERE run_id = $1 AND outcome = 'kept' ORDER BY at"
            ),
            &[&run_id],
        )
        .await
        .map_err(|e| Error::postgres("failed to read kept schemas", e))?;
    let failures = client
        .query(
            &format!(
                "SELECT test_name, outcome FROM {ns}.acquires
                  WHERE run_id = $1 AND outcome LIKE 'failed:%' ORDER BY at"
            ),
            &[&run_id],
        )
        .await
        .map_err(|e| Error::postgres("failed to read failed teardowns", e))?;
    let count = |i: usize| row.get::<_, i64>(i) as u64;
    Ok(RunSummary {
        tests: count(0),
        claimed: count(1),
        lost: count(2),
        created: count(3),
        recycled: count(4),
        dropped: count(5),
        kept: count(6),
        pending: count(7),
        acquire_p50_ms: row.get(8),
        acquire_p95_ms: row.get(9),
        claimed_p50_ms: row.get(10),
        claimed_p95_ms: row.get(11),
        created_p50_ms: row.get(12),
        created_p95_ms: row.get(13),
        reset_p50_ms: row.get(14),
        kept_schemas: kept.iter().map(|r| (r.get(0), r.get(1))).collect(),
        teardown_failures: failures.iter().map(|r| (r.get(0), r.get(1))).collect(),
    })
}
