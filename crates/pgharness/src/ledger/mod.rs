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

mod claim;
mod reap;
mod summary;

use tokio_postgres::Client;

use crate::error::Error;

pub(crate) use claim::{
    AcquireLog, Claimant, Finish, MISS_SQLSTATE, claim_sql, elapsed_ms, finish_sql, fixtures_sql,
    mark, ms_since, parting_sql, register_sql, search_path_sql,
};
pub use reap::{POOL_IDLE_LIMIT, ReapReport, ReapScope, hold_run_lock, reap, settle};
pub use summary::{RunSummary, run_summary};

/// Advisory-lock namespace (first key) for schema owners.
pub(crate) const SCHEMA_LOCK_SPACE: i32 = 0x7067_6800;
/// Advisory-lock namespace for runs (held by `cargo pgharness test` for the whole run).
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

/// Only the claimant's own schemas: one made by another role (a local run as the admin, then
/// an RDS run as the IAM user, on one server) holds tables the claimant may not touch.
const OWNED_BY_CURRENT_USER: &str = "(SELECT nspowner FROM pg_catalog.pg_namespace WHERE nspname = schema_name) \
     = (SELECT oid FROM pg_catalog.pg_roles WHERE rolname = current_user)";

/// The version marker of `ledger.sql` (a function named after it). Statements that need
/// this version call it, so that an older installation fails them with 42883 and
/// [`is_missing_ledger`] sends the caller to [`bootstrap`].
pub(crate) fn version_probe(ns: &Namespace) -> String {
    format!("{ns}.{VERSION_FUNCTION}()")
}

/// The name of `ledger.sql`'s version marker function (see [`version_probe`]).
pub const VERSION_FUNCTION: &str = "version_14";

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
