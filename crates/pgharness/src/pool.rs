//! The schema pool: migrated schemas waiting, ready, per content hash of their
//! migrations. A test claims one in one round trip (`ledger::claim_sql`); a passing test's
//! schema is reset to its freshly migrated state and returned (`finish` in `ledger.sql`), unless its structure changed; a miss creates one with [`create`].
//! [`warm`] keeps enough ready for a run's parallelism, on one connection.
//!
//! Everything run-wide is in Postgres: nextest runs each test in its own process.

use crate::layout::Layout;
use std::path::Path;

use tokio_postgres::Client;

use crate::error::Error;
use crate::ledger::{self, Claimant, Namespace};
use crate::naming;
use crate::script::{Batch, Migrations, SqlFile, quote_ident};

/// What a schema of the pool is named: `p_<hash>_<random>`. Pool schemas are renamed to
/// their test's name (`t_…`) when a failing test keeps one.
pub(crate) fn schema_name(hash: &str) -> String {
    let random = uuid::Uuid::new_v4().simple().to_string();
    format!("p_{}_{}", &hash[..hash.len().min(12)], &random[..16])
}

/// A connection string into a schema, given its `search_path` (for migrations in code).
pub(crate) type UrlFor<'a> = &'a (dyn Fn(&str) -> String + Sync);

/// Creates, migrates and records a schema, for a test on a miss (owner lock taken, session
/// `search_path` set, then fixtures: `for_test`) or for the pool. One round trip and one
/// transaction ([`create_batches`]); a migration that must run outside a transaction, or
/// migrations in code (run on `url_for`'s connection string), split it, and a failure after
/// the first part drops what was made.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn create(
    client: &Client,
    schema: &str,
    lock_key: i32,
    migrations: Option<&Migrations>,
    who: &Claimant<'_>,
    for_test: bool,
    fixtures: &[SqlFile],
    url_for: Option<UrlFor<'_>>,
) -> Result<(), Error> {
    let action = if for_test {
        format!("failed to create schema {schema}")
    } else {
        format!("failed to create pool schema {schema}")
    };
    let parts = create_batches(schema, lock_key, migrations, who, for_test, fixtures);
    for (i, part) in parts.iter().enumerate() {
        let failed = match part {
            Part::Sql(batch) => match client.batch_execute(batch.text()).await {
                Ok(()) => None,
                Err(error) => Some(batch.explain(&action, error)),
            },
            Part::Code(code) => run_code(client, code, url_for).await.err(),
        };
        if let Some(error) = failed {
            let _ = client.batch_execute("ROLLBACK").await;
            if i > 0 {
                // An earlier part committed the schema: nothing of it may stay behind.
                let _ = client
                    .batch_execute(&format!(
                        "SELECT {}.discard_owned({});",
                        who.ns,
                        crate::script::quote_literal(schema)
                    ))
                    .await;
            }
            return Err(error);
        }
    }
    Ok(())
}

/// Runs migrations in code on a connection of their own to the schema the session's
/// `search_path` names.
async fn run_code(
    client: &Client,
    code: &crate::code_migrations::CodeMigrations,
    url_for: Option<UrlFor<'_>>,
) -> Result<(), Error> {
    let failed = |message: String| Error::CodeMigrations {
        source_name: code.source.clone(),
        message,
    };
    let url_for = url_for.ok_or_else(|| {
        failed("they run only in a test process (a warmer has no code to run)".into())
    })?;
    let search_path: String = client
        .query_one("SELECT current_setting('search_path')", &[])
        .await
        .map_err(|e| Error::postgres("failed to read the search_path", e))?
        .get(0);
    code.run(url_for(&search_path.replace(' ', "")))
        .await
        .map_err(failed)
}

/// A part of a schema's creation: SQL sent as one batch, or migrations in code.
pub(crate) enum Part<'a> {
    Sql(Batch),
    Code(&'a crate::code_migrations::CodeMigrations),
}

/// The statements of [`create`]: one batch, a transaction that creates the schema, applies
/// the migrations, fills the tool's history table and records the schema (then loads the
/// fixtures, for a test). A migration its tool runs outside any transaction (`-- no-transaction`)
/// is a batch of its own, between two transactions; the session's `search_path` and the
/// timing marks then outlive the first (and a pool schema's `search_path` is reset after).
pub(crate) fn create_batches<'m>(
    schema: &str,
    lock_key: i32,
    migrations: Option<&'m Migrations>,
    who: &Claimant<'_>,
    for_test: bool,
    fixtures: &[SqlFile],
) -> Vec<Part<'m>> {
    let split = migrations
        .is_some_and(|m| m.code.is_some() || m.files.iter().any(|f| f.outside_transaction));
    let ident = quote_ident(schema);
    let mut batches = Vec::new();
    let mut batch = Batch::default();
    if for_test {
        batch.push(&format!(
            "SELECT pg_advisory_lock({}, {lock_key});",
            ledger::SCHEMA_LOCK_SPACE
        ));
    }
    batch.push("BEGIN;");
    batch.push(&ledger::mark("t0"));
    batch.push(&format!("CREATE SCHEMA {ident};"));
    // Session-wide for a test's own connection (it persists after COMMIT), and for every
    // part of a split creation; only for this transaction when warming in one. The claim's
    // search_path (`ledger::search_path_sql`): the migrations see what the tests will.
    batch.push(&format!(
        "SELECT set_config('search_path', {}, {});",
        ledger::search_path_sql(&crate::script::quote_literal(schema), who.extra_search_path),
        !for_test && !split
    ));
    batch.push(&ledger::mark("t1"));
    if let Some(migrations) = migrations {
        for file in &migrations.files {
            if file.outside_transaction {
                batch.push("COMMIT;");
                batches.push(Part::Sql(std::mem::take(&mut batch)));
                let mut alone = Batch::default();
                alone.push_file("migration", file);
                batches.push(Part::Sql(alone));
                batch.push("BEGIN;");
            } else {
                batch.push_file("migration", file);
            }
        }
        if let Some(code) = &migrations.code {
            batch.push("COMMIT;");
            batches.push(Part::Sql(std::mem::take(&mut batch)));
            batches.push(Part::Code(code));
            batch.push("BEGIN;");
        }
        // Nothing the migrations wrote may be outside the schema (ledger.sql says how).
        if !migrations.files.is_empty() {
            batch.push(&format!(
                "SELECT {}.refuse_written_elsewhere({});",
                who.ns,
                crate::script::quote_literal(schema)
            ));
        }
        if let Some(history) = &migrations.history {
            batch.push(history);
        }
    }
    batch.push(&ledger::mark("t2"));
    batch.push(&ledger::register_sql(
        schema,
        lock_key,
        who,
        for_test,
        &ledger::elapsed_ms("t0", "t1"),
        &ledger::elapsed_ms("t1", "t2"),
    ));
    push_fixtures(&mut batch, fixtures);
    batch.push("COMMIT;");
    if split && !for_test {
        batch.push("RESET search_path;");
    }
    batches.push(Part::Sql(batch));
    batches
}

/// Appends fixtures (if any) and the record of how long they took to load.
pub(crate) fn push_fixtures(batch: &mut Batch, fixtures: &[SqlFile]) {
    if fixtures.is_empty() {
        return;
    }
    batch.push(&ledger::mark("t3"));
    for file in fixtures {
        batch.push_file("fixture", file);
    }
    batch.push(&ledger::fixtures_sql(&ledger::ms_since("t3")));
}

/// What [`warm`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Warmed {
    /// Ready schemas of the migration set before.
    pub ready_before: u64,
    /// Schemas it created.
    pub created: u64,
}

/// Keeps the pool of one migration set filled. The migrations are read and hashed once,
/// when it is made: a janitor calls [`Warmer::warm`] every few milliseconds.
#[derive(Debug)]
pub struct Warmer {
    migrations: Migrations,
    host: String,
    extra_search_path: Vec<String>,
}

impl Warmer {
    /// A warmer for the migrations of this directory, read in `layout`.
    pub fn new(migrations_dir: &Path, layout: Layout) -> Result<Warmer, Error> {
        Ok(Warmer {
            migrations: Migrations::load(migrations_dir, layout)?,
            host: crate::testdb::hostname(),
            extra_search_path: Vec::new(),
        })
    }

    /// The warmer of the workspace's default migration set: `settings.migrations` read in
    /// its layout, with `settings.extra_search_path`.
    pub fn for_settings(settings: &crate::Settings) -> Result<Warmer, Error> {
        Ok(
            Warmer::new(&settings.migrations, settings.migrations_layout)?
                .extra_search_path(&settings.extra_search_path),
        )
    }

    /// Schemas after the pool schema's own on the migrations' `search_path`, as the tests'
    /// (`extra_search_path`).
    pub fn extra_search_path(mut self, schemas: &[String]) -> Warmer {
        self.extra_search_path = schemas.to_vec();
        self
    }

    /// Tops the pool up to `target` ready schemas, creating them one at a time on `client`
    /// (so a warmer never uses more than its one connection). Stops early at `max_new`.
    pub async fn warm(
        &self,
        client: &Client,
        ns: &Namespace,
        target: u64,
        max_new: u64,
    ) -> Result<Warmed, Error> {
        let migrations = &self.migrations;
        let ready_before = ready_count(client, ns, &migrations.hash).await?;
        let mut warmed = Warmed {
            ready_before,
            created: 0,
        };
        while ready_before + warmed.created < target && warmed.created < max_new {
            let schema = schema_name(&migrations.hash);
            let who = Claimant {
                ns,
                extra_search_path: &self.extra_search_path,
                hash: &migrations.hash,
                source: &migrations.source,
                run_id: "warmer",
                test_name: "",
                attempt: 0,
                host: &self.host,
                connect_ms: 0.0,
            };
            create(
                client,
                &schema,
                naming::lock_key(&schema),
                Some(migrations),
                &who,
                false,
                &[],
                None,
            )
            .await?;
            warmed.created += 1;
        }
        Ok(warmed)
    }
}

/// Tops the pool of one migration set up to `target` ready schemas, once (see [`Warmer`]).
pub async fn warm(
    client: &Client,
    ns: &Namespace,
    migrations_dir: &Path,
    layout: Layout,
    target: u64,
    max_new: u64,
) -> Result<Warmed, Error> {
    Warmer::new(migrations_dir, layout)?
        .warm(client, ns, target, max_new)
        .await
}

/// Ready schemas of one migration set.
async fn ready_count(client: &Client, ns: &Namespace, hash: &str) -> Result<u64, Error> {
    if !ledger::check_namespace(client, ns).await? {
        ledger::bootstrap(client, ns).await?;
    }
    let query = &format!(
        "SELECT {ns}.ready_count($1) + 0 * {}",
        ledger::version_probe(ns)
    );
    let row = match client.query_one(query, &[&hash]).await {
        Ok(row) => row,
        Err(error) if ledger::is_missing_ledger(&error) => {
            ledger::bootstrap(client, ns).await?;
            client
                .query_one(query, &[&hash])
                .await
                .map_err(|e| Error::postgres("failed to count ready schemas", e))?
        }
        Err(error) => return Err(Error::postgres("failed to count ready schemas", error)),
    };
    Ok(row.get::<_, i64>(0) as u64)
}

/// The migration set's content hash (what the pool is keyed by) of a directory.
pub fn migrations_hash(migrations_dir: &Path, layout: Layout) -> Result<String, Error> {
    Ok(Migrations::load(migrations_dir, layout)?.hash)
}
