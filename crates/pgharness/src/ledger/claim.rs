//! A test's statements on the ledger: claiming a ready schema (or registering a new one),
//! its `search_path`, fixtures, and finishing it with its acquire log.

use super::*;
use crate::script::quote_literal;

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

impl Finish {
    /// `finish`'s `p_mode` for it (`ledger.sql`).
    fn mode(self) -> &'static str {
        match self {
            Finish::Keep => "keep",
            Finish::Pass => "pass",
            Finish::Recycle => "recycle",
        }
    }
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

impl AcquireLog<'_> {
    /// The log as `finish` reads it (`p_acquire`).
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "id": self.id,
            "run": self.run_id,
            "test": self.test_name,
            "path": self.path,
            "connect_ms": self.connect_ms,
            "claim_ms": self.claim_ms,
            "acquire_ms": self.acquire_ms,
        })
    }
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
    let mode = finish.mode();
    // Without a janitor, teardowns recycle what earlier tests could not (still in use then).
    let sweep = if finish == Finish::Recycle {
        format!("\nSELECT {ns}.sweep(2);")
    } else {
        String::new()
    };
    let log = log.json();
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

/// How long a teardown nobody waits for lets the reset wait for the test's other sessions
/// to close (its pool's, an app's): its process is exiting, or its pools closing.
const DETACHED_BUSY_WAIT_MS: u32 = 2000;

/// The statements of a teardown sent and not waited for (`parting`), one per element: a
/// transaction that finishes the schema (`finish_detached`: its errors are recorded, not
/// raised) and, for a recycle, one that sweeps up to two schemas earlier tests left in use.
/// Notices are turned off first: the server flushes them at once, to a client that may be
/// gone.
pub(crate) fn parting_sql(
    ns: &Namespace,
    schema: &str,
    log: &AcquireLog<'_>,
    finish: Finish,
) -> Vec<String> {
    let mode = finish.mode();
    let mut statements = vec![
        // First: a BEGIN in a transaction the test left open warns, and the server would
        // flush the warning to a client that may be gone.
        "SELECT set_config('client_min_messages', 'error', false)".to_owned(),
        "BEGIN".to_owned(),
        format!(
            "SELECT set_config('lock_timeout', '10s', true), \
             set_config('pgharness.busy_wait_ms', '{DETACHED_BUSY_WAIT_MS}', true)"
        ),
        format!(
            "SELECT {ns}.finish_detached({}, {}::jsonb, '{mode}')",
            quote_literal(schema),
            quote_literal(&log.json().to_string()),
        ),
        "COMMIT".to_owned(),
    ];
    if finish == Finish::Recycle {
        statements.extend([
            "BEGIN".to_owned(),
            "SELECT set_config('lock_timeout', '10s', true)".to_owned(),
            format!("SELECT {ns}.sweep(2)"),
            "COMMIT".to_owned(),
        ]);
    }
    statements
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

/// Records the current time under `pgharness.<name>`.
pub(crate) fn mark(name: &str) -> String {
    // For the session, not the transaction: a creation split by a migration that runs
    // outside a transaction (`pool::create_batches`) reads its marks after a COMMIT.
    format!("SELECT set_config('pgharness.{name}', clock_timestamp()::text, false);")
}
