//! The ledger: one row per test schema with its status and phase timings, in the schema of
//! the role that uses it ([`Namespace`], `pgharness_<role>.ledger`). It is what the reaper
//! trusts (it drops nothing that is not in it, and only schemas the role owns) and what the
//! run summary reads.
//!
//! Nothing of it is shared between roles: on a server where several roles run tests (a
//! shared dev cluster, a local run as the admin then an RDS run as the IAM user), each role
//! has its own ledger, acquire log and functions, owned by it and granted to nobody. So no
//! role can write another's rows, replace the functions another calls, or have another's
//! reaper drop its schemas; a schema of the role's name that another role made first is
//! refused by name before anything in it is read or called ([`guard_sql`]).
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

/// Status of a ledger row: `ready` (in the pool), `active` (a test owns it), `passed`
/// (its test passed; the janitor recycles it), `kept`, `dropped`. The SQL of `ledger.sql`
/// sets the others.
pub(crate) mod status {
    pub(crate) const DROPPED: &str = "dropped";
}

/// The ledger's tables and the schema pool's functions (`ledger.sql`), with `__NS__` for the
/// role's schema.
const LEDGER_SQL: &str = include_str!("ledger.sql");

/// The schema of one role's pgharness objects: `pgharness_<role>` for a role name of
/// lowercase letters, digits and `_` (up to 40 bytes), else `pgharness_<16 hex digits of
/// the name's SHA-256>`. Always a plain identifier, never quoted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace(String);

impl Namespace {
    /// The namespace of the database role `user`.
    pub fn for_user(user: &str) -> Namespace {
        let plain = !user.is_empty()
            && user.len() <= 40
            && user
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if plain {
            Namespace(format!("pgharness_{user}"))
        } else {
            use sha2::Digest;
            let digest = sha2::Sha256::digest(user.as_bytes());
            Namespace(format!("pgharness_{}", &hex::encode(digest)[..16]))
        }
    }

    /// The namespace of the role a connection configuration logs in as.
    pub fn of(config: &tokio_postgres::Config) -> Namespace {
        Namespace::for_user(config.get_user().unwrap_or("postgres"))
    }

    /// The schema's name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The version marker of `ledger.sql` (a function named after it). Statements that need
/// this version call it, so that an older installation fails them with 42883 and
/// [`is_missing_ledger`] sends the caller to [`bootstrap`].
pub(crate) fn version_probe(ns: &Namespace) -> String {
    format!("{ns}.version_11()")
}

/// What a failed guard says (see [`guard_sql`]), to be found in the error.
const FOREIGN_MARK: &str = "pgharness: the schema belongs to another role";

/// A statement that fails when the role's namespace exists but another role owns it, and
/// does nothing otherwise; sent first in a batch, it keeps the rest of the batch from
/// reading or calling anything in a schema someone else made. It calls nothing of ours:
/// only the catalogs, and a cast of a text that is not a number (an error carrying the
/// mark; `current_user` in it keeps the planner from folding it ahead of the check).
pub(crate) fn guard_sql(ns: &Namespace) -> String {
    format!(
        "SELECT 1 WHERE CASE WHEN coalesce((SELECT n.nspowner = r.oid FROM pg_catalog.pg_namespace n, pg_catalog.pg_roles r
  WHERE n.nspname = '{ns}' AND r.rolname = current_user), true) THEN false
  ELSE ('{FOREIGN_MARK}: ' || current_user)::int > 0 END;"
    )
}

/// The error for a namespace another role made, if `error` is the guard's.
pub(crate) fn foreign_namespace(error: &tokio_postgres::Error, ns: &Namespace) -> Option<Error> {
    let db = error.as_db_error()?;
    db.message().contains(FOREIGN_MARK).then(|| foreign(ns))
}

fn foreign(ns: &Namespace) -> Error {
    Error::Backend {
        backend: "server",
        message: format!(
            "the schema {ns}, where pgharness keeps this role's ledger and functions, was made by another role: pgharness will not read it or run anything in it. Ask its owner to drop it (or drop it as an administrator), or log in as another role"
        ),
    }
}

/// Whether a failed statement failed because the ledger (or this version of it) is not
/// installed yet: then [`bootstrap`] and try again.
pub(crate) fn is_missing_ledger(error: &tokio_postgres::Error) -> bool {
    use tokio_postgres::error::SqlState;
    error.code().is_some_and(|code| {
        [
            SqlState::UNDEFINED_FUNCTION,
            SqlState::UNDEFINED_TABLE,
            SqlState::INVALID_SCHEMA_NAME,
        ]
        .contains(code)
    })
}

/// Installs (or upgrades) the role's ledger and the pool's functions in its namespace,
/// once per server and role; safe to run concurrently. Costs nothing when they are there
/// already except one query. A namespace another role made is an error naming it.
pub async fn bootstrap(client: &Client, ns: &Namespace) -> Result<(), Error> {
    let fail = |e| Error::postgres("failed to install pgharness' ledger", e);
    client.batch_execute("BEGIN").await.map_err(fail)?;
    let result = async {
        client
            .execute(
                "SELECT pg_advisory_xact_lock($1, 0)",
                &[&BOOTSTRAP_LOCK_SPACE],
            )
            .await?;
        client.batch_execute(&guard_sql(ns)).await?;
        let installed: bool = client
            .query_one(
                "SELECT to_regprocedure($1) IS NOT NULL",
                &[&version_probe(ns)],
            )
            .await?
            .get(0);
        if !installed {
            client
                .batch_execute(&LEDGER_SQL.replace("__NS__", ns.as_str()))
                .await?;
        }
        client.batch_execute("COMMIT").await
    }
    .await;
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result.map_err(|e| foreign_namespace(&e, ns).unwrap_or_else(|| fail(e)))
}

/// Checks, before anything in it is read or called, that the role's namespace is its own
/// (or does not exist yet); returns whether it exists with this version installed.
pub async fn check_namespace(client: &Client, ns: &Namespace) -> Result<bool, Error> {
    client.batch_execute(&guard_sql(ns)).await.map_err(|e| {
        foreign_namespace(&e, ns)
            .unwrap_or_else(|| Error::postgres("failed to look for the ledger", e))
    })?;
    let installed: bool = client
        .query_one(
            "SELECT to_regprocedure($1) IS NOT NULL",
            &[&version_probe(ns)],
        )
        .await
        .map_err(|e| Error::postgres("failed to look for the ledger", e))?
        .get(0);
    Ok(installed)
}

/// What a test says about itself when it claims or creates a schema.
pub(crate) struct Claimant<'a> {
    pub(crate) ns: &'a Namespace,
    /// Schemas after the test's own on its search_path (`extra_search_path`).
    pub(crate) extra_search_path: &'a [String],
    pub(crate) hash: &'a str,
    pub(crate) source: &'a str,
    pub(crate) run_id: &'a str,
    pub(crate) test_name: &'a str,
    pub(crate) attempt: u32,
    pub(crate) host: &'a str,
    pub(crate) connect_ms: f64,
}

/// Only the claimant's own schemas: one made by another role (a local run as the admin, then
/// an RDS run as the IAM user, on one server) holds tables the claimant may not touch.
const OWNED_BY_CURRENT_USER: &str = "(SELECT nspowner FROM pg_catalog.pg_namespace WHERE nspname = schema_name) \
     = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)";

/// One statement that claims a ready schema for the claimant: marks its ledger row
/// active for the test, takes its owner lock and sets the session's
/// `search_path`. Its one row holds the schema's name; no row on a miss. With
/// `or_raise_on_miss` a miss is an error (`PH001`) instead, so that statements sent after
/// it in the same round trip (fixtures) never run outside the test's schema.
///
/// A plain statement rather than a function: plpgsql would be compiled afresh in every
/// test's new session. The lock and `search_path` are in the final `SELECT` over the
/// data-modifying CTE's one row, so they happen exactly once, and only for a claimed row.
pub(crate) fn claim_sql(who: &Claimant<'_>, or_raise_on_miss: bool) -> String {
    let ns = who.ns;
    let miss = if or_raise_on_miss {
        format!("\nUNION ALL SELECT {ns}.miss(), NULL WHERE NOT EXISTS (SELECT 1 FROM claimed)")
    } else {
        String::new()
    };
    format!(
        "{guard}
WITH picked AS (
  SELECT schema_name FROM {ns}.ledger
   WHERE status = 'ready' AND migrations_hash = {hash} AND {probe} IS NOT NULL
     AND {OWNED_BY_CURRENT_USER}
   LIMIT 1 FOR UPDATE SKIP LOCKED
), claimed AS (
  UPDATE {ns}.ledger l
     SET status = 'active', source = {source}, run_id = {run}, test_name = {test},
         attempt = {attempt}, host = {host}, pid = {pid}, ended_at = NULL,
         claimed_at = clock_timestamp(), uses = uses + 1
    FROM picked WHERE l.schema_name = picked.schema_name
  RETURNING l.schema_name, l.lock_key
)

SELECT schema_name || left(pg_advisory_lock({SCHEMA_LOCK_SPACE}, lock_key)::text, 0)
       || left(set_config('search_path', path, false), 0), path
  FROM (SELECT schema_name, lock_key, {path} AS path FROM claimed) c{miss};",
        path = search_path_sql("schema_name", who.extra_search_path),
        guard = guard_sql(ns),
        probe = version_probe(ns),
        hash = quote_literal(who.hash),
        source = quote_literal(who.source),
        run = quote_literal(who.run_id),
        test = quote_literal(who.test_name),
        attempt = who.attempt,
        host = quote_literal(who.host),
        pid = std::process::id(),
    )
}

/// The `search_path` of a test's schema, as SQL over the expression `schema`: the schema,
/// then `public` only while it holds no table, view or other relation (extensions' functions
/// and types live there; another role's `public.orders` must never answer for an `orders`
/// the test lacks), then the `extra_search_path` schemas. Relations of `public` are found
/// through `pg_depend`'s index on their namespace: `pg_class` has none on it, and a scan of
/// it grows with every pooled schema.
pub(crate) fn search_path_sql(schema: &str, extra: &[String]) -> String {
    let extra: String = extra.iter().map(|name| format!(",{name}")).collect();
    format!(
        "quote_ident({schema}) || CASE WHEN EXISTS (
    SELECT 1 FROM pg_catalog.pg_depend d JOIN pg_catalog.pg_class c ON c.oid = d.objid
     WHERE d.refclassid = 'pg_catalog.pg_namespace'::pg_catalog.regclass
       AND d.refobjid = pg_catalog.to_regnamespace('public')
       AND d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass
       AND c.relkind IN ('r', 'p', 'v', 'm', 'f')) THEN '' ELSE ',public' END || '{extra}'"
    )
}

/// The SQLSTATE of `pgharness.miss()`.
pub(crate) const MISS_SQLSTATE: &str = "PH001";

/// Records a schema just created and migrated in the caller's transaction: for the
/// claimant's test (active), or for the pool (`None`: ready at once). Captures the
/// schema's fresh state, so it runs after the migrations and before any fixture.
/// `create_ms` and `migrate_ms` are SQL expressions.
pub(crate) fn register_sql(
    schema: &str,
    lock_key: i32,
    who: &Claimant<'_>,
    for_test: bool,
    create_ms: &str,
    migrate_ms: &str,
) -> String {
    let acquire = if for_test { "true" } else { "false" };
    format!(
        "SELECT {}.register({}, {}, {}, {}, {}, {}, {}, {}, {lock_key}, {acquire}, {}, {create_ms}, {migrate_ms});",
        who.ns,
        quote_literal(schema),
        quote_literal(who.hash),
        quote_literal(who.source),
        quote_literal(who.run_id),
        quote_literal(who.test_name),
        who.attempt,
        quote_literal(who.host),
        std::process::id(),
        who.connect_ms,
    )
}

/// Adds time spent loading fixtures to this session's tally, which the teardown logs.
pub(crate) fn fixtures_sql(ms: &str) -> String {
    format!(
        "SELECT set_config('pgharness.fixtures_ms', (coalesce(nullif(current_setting('pgharness.fixtures_ms', true), '')::float8, 0) + {ms})::text, false);"
    )
}

/// How a test gives its schema back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Finish {
    /// Keep it for debugging (renamed to the test's name when that name is free).
    Keep,
    /// Passed; the run's janitor recycles it off the critical path.
    Pass,
    /// Passed; reset it now and return it to the pool (or drop it if it cannot be reset).
    Recycle,
}

/// One acquire as the teardown logs it.
pub(crate) struct AcquireLog<'a> {
    pub(crate) id: &'a str,
    pub(crate) run_id: &'a str,
    pub(crate) test_name: &'a str,
    /// `claimed` or `created`.
    pub(crate) path: &'static str,
    pub(crate) connect_ms: f64,
    /// The round trip that claimed (or created) the schema, fixtures included.
    pub(crate) claim_ms: f64,
    pub(crate) acquire_ms: f64,
}

/// Ends a test's use of its schema, logs its acquire and releases its owner lock, in one
/// round trip. Its one row says what happened (`kept:<name>`, `passed`, `recycled`,
/// `dropped:<why>`).
pub(crate) fn finish_sql(
    ns: &Namespace,
    schema: &str,
    log: &AcquireLog<'_>,
    finish: Finish,
    keep_name: &str,
    lock_key: i32,
) -> String {
    let mode = match finish {
        Finish::Keep => "keep",
        Finish::Pass => "pass",
        Finish::Recycle => "recycle",
    };
    // Without a janitor, teardowns recycle what earlier tests could not (still in use then).
    let sweep = if finish == Finish::Recycle {
        format!("\nSELECT {ns}.sweep(2);")
    } else {
        String::new()
    };
    let log = serde_json::json!({
        "id": log.id,
        "run": log.run_id,
        "test": log.test_name,
        "path": log.path,
        "connect_ms": log.connect_ms,
        "claim_ms": log.claim_ms,
        "acquire_ms": log.acquire_ms,
    });
    format!(
        "BEGIN;
SET LOCAL lock_timeout = '10s';
SELECT {ns}.finish({}, {}::jsonb, '{mode}', {});
COMMIT;
SELECT pg_advisory_unlock({SCHEMA_LOCK_SPACE}, {lock_key});{sweep}",
        quote_literal(schema),
        quote_literal(&log.to_string()),
        quote_literal(keep_name),
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
    let count = |i: usize| row.get::<_, i64>(i) as u64;
    Ok(RunSummary {
        tests: count(0),
        claimed: count(1),
        created: count(2),
        recycled: count(3),
        dropped: count(4),
        kept: count(5),
        pending: count(6),
        acquire_p50_ms: row.get(7),
        acquire_p95_ms: row.get(8),
        claimed_p50_ms: row.get(9),
        claimed_p95_ms: row.get(10),
        created_p50_ms: row.get(11),
        created_p95_ms: row.get(12),
        reset_p50_ms: row.get(13),
        kept_schemas: kept.iter().map(|r| (r.get(0), r.get(1))).collect(),
    })
}

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
        /// `cargo nextest run`, which has no run lock). `cargo xtask reap` uses 30 s.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ledger_sql_takes_owner_locks_in_the_schema_lock_space() {
        // `sweep` in ledger.sql writes the space as a literal.
        let literal = SCHEMA_LOCK_SPACE.to_string();
        assert!(LEDGER_SQL.contains(&format!("pg_try_advisory_xact_lock({literal},")));
    }

    #[test]
    fn ledger_sql_defines_its_version_marker() {
        let name = version_probe(&Namespace("__NS__".into()));
        let name = name.trim_end_matches("()");
        assert!(LEDGER_SQL.contains(&format!("FUNCTION {name}()")), "{name}");
    }

    #[test]
    fn a_role_s_namespace_is_a_plain_identifier() {
        assert_eq!(Namespace::for_user("iam_app").as_str(), "pgharness_iam_app");
        for user in ["App-User", "\"; DROP SCHEMA x; --", &"a".repeat(60)] {
            let ns = Namespace::for_user(user);
            assert!(ns.as_str().len() <= 63, "{ns}");
            assert!(
                ns.as_str()
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_'),
                "{ns}"
            );
        }
        assert_ne!(Namespace::for_user("Ab"), Namespace::for_user("ab_x"));
    }
}
