//! `TestDb`: one test's own migrated schema, its connections, and its teardown.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio::sync::OnceCell;
use tokio_postgres::Client;

use crate::connect::{self, Patience, PatientConnect};
use crate::error::Error;
use crate::events::log_only;
use crate::ledger::{self, SCHEMA_LOCK_SPACE, status};
use crate::script::{self, Batch, Migrations, quote_ident, quote_literal};
use crate::server::Server;
use crate::settings::{KeepPolicy, Settings, Teardown};
use crate::{backend, driver, naming};

/// A test's own schema on a shared server, migrated and ready.
///
/// Every connection it hands out (`client()`, `pool()`, `connect()`, and any client given
/// `connection_string()`) starts with `search_path = <schema>, public`.
///
/// When it is dropped, the schema is dropped too, unless the test is panicking (failed), in
/// which case it is kept and a `psql` command to inspect it is printed.
pub struct TestDb {
    schema: String,
    test_name: String,
    server: Server,
    client: Option<Client>,
    pool: Pool,
    config: tokio_postgres::Config,
    fixtures_dir: PathBuf,
    keep: KeepPolicy,
    teardown: Teardown,
    reap_ttl: Duration,
    acquire: Duration,
    lock_key: i32,
}

/// Options for one test's database. Start from [`TestDb::builder`].
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct TestDbBuilder {
    fixtures: Vec<String>,
    migrations: Option<Option<PathBuf>>,
    fixtures_dir: Option<PathBuf>,
    keep: Option<KeepPolicy>,
    pool_size: Option<usize>,
    test_name: Option<String>,
    settings: Option<Settings>,
}

impl TestDbBuilder {
    /// Loads these fixtures (`fixtures/<name>.sql`) after the migrations, in order.
    pub fn fixtures<I, S>(mut self, names: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.fixtures.extend(names.into_iter().map(Into::into));
        self
    }

    /// Applies the migrations of this directory instead of the configured one.
    pub fn migrations(mut self, dir: impl Into<PathBuf>) -> Self {
        self.migrations = Some(Some(dir.into()));
        self
    }

    /// Starts from an empty schema.
    pub fn without_migrations(mut self) -> Self {
        self.migrations = Some(None);
        self
    }

    /// Reads fixtures from this directory instead of the configured one.
    pub fn fixtures_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.fixtures_dir = Some(dir.into());
        self
    }

    /// When to keep the schema after the test.
    pub fn keep(mut self, policy: KeepPolicy) -> Self {
        self.keep = Some(policy);
        self
    }

    /// The most connections `pool()` opens (default `pool_size`, 2).
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = Some(size.max(1));
        self
    }

    /// Names the test (default: the name of the running test's thread).
    pub fn test_name(mut self, name: impl Into<String>) -> Self {
        self.test_name = Some(name.into());
        self
    }

    /// Uses these settings instead of loading them from the workspace and environment.
    pub fn settings(mut self, settings: Settings) -> Self {
        self.settings = Some(settings);
        self
    }

    /// Creates the schema, applies migrations and fixtures, and opens the connections.
    pub async fn build(self) -> Result<TestDb, Error> {
        let started = Instant::now();
        let settings = match self.settings.clone() {
            Some(settings) => settings,
            None => process_settings()?,
        };
        let server = match self.settings.is_some() {
            true => {
                let settings = settings.clone();
                driver::run(async move { backend::ensure(&settings, &log_only).await }).await?
            }
            false => process_server(&settings).await?,
        };
        let test_name = self.test_name.clone().unwrap_or_else(current_test_name);
        let run_id = settings
            .run_id
            .clone()
            .unwrap_or_else(|| process_run_id().to_owned());
        let attempt = std::env::var("NEXTEST_ATTEMPT")
            .ok()
            .and_then(|a| a.parse().ok())
            .unwrap_or(1);
        let schema =
            naming::schema_name(&run_id, &test_name, attempt, naming::next_nth(&test_name));
        let migrations = match &self.migrations {
            Some(None) => None,
            Some(Some(dir)) => Some(load_migrations(dir)?),
            None => Some(load_migrations(&settings.migrations)?),
        };
        let fixtures_dir = self
            .fixtures_dir
            .clone()
            .unwrap_or_else(|| settings.fixtures.clone());
        let fixtures = script::load_fixtures(&fixtures_dir, &self.fixtures)?;

        let mut config = server.config();
        config.options(format!("-csearch_path={schema},public"));
        config.application_name(&schema);

        let connect_started = Instant::now();
        let deadline = connect_started + settings.acquire_timeout;
        let client = connect::connect(
            &config,
            deadline,
            Patience::StartingOrFull,
            &log_only,
            &server.describe(),
        )
        .await?;
        let connect_ms = connect_started.elapsed().as_secs_f64() * 1000.0;

        let key = naming::lock_key(&schema);
        let host = hostname();
        let mut batch = Batch::default();
        batch.push(&format!(
            "SELECT pg_advisory_lock({SCHEMA_LOCK_SPACE}, {key});"
        ));
        batch.push("BEGIN;");
        batch.push(&ledger::ensure_sql());
        batch.push(&ledger::mark("t0"));
        batch.push(&format!("CREATE SCHEMA {};", quote_ident(&schema)));
        batch.push(&format!(
            "SET LOCAL search_path TO {}, public;",
            quote_ident(&schema)
        ));
        batch.push(&ledger::mark("t1"));
        if let Some(migrations) = &migrations {
            for file in migrations.files.iter() {
                batch.push_file("migration", file);
            }
        }
        batch.push(&ledger::mark("t2"));
        for file in &fixtures {
            batch.push_file("fixture", file);
        }
        batch.push(&ledger::mark("t3"));
        batch.push(&format!(
            "INSERT INTO pgharness.ledger (schema_name, run_id, test_name, attempt, host, pid, lock_key,
                 migrations_hash, status, connect_ms, create_ms, migrate_ms, fixtures_ms)
             VALUES ({}, {}, {}, {attempt}, {}, {}, {key}, {}, '{}', {connect_ms}, {}, {}, {});",
            quote_literal(&schema),
            quote_literal(&run_id),
            quote_literal(&test_name),
            quote_literal(&host),
            std::process::id(),
            quote_literal(migrations.as_ref().map_or("none", |m| m.hash.as_str())),
            status::ACTIVE,
            ledger::elapsed_ms("t0", "t1"),
            ledger::elapsed_ms("t1", "t2"),
            ledger::elapsed_ms("t2", "t3"),
        ));
        batch.push("COMMIT;");
        if let Err(error) = client.batch_execute(batch.text()).await {
            return Err(batch.explain(&format!("failed to create schema {schema}"), error));
        }

        let pool_size = self.pool_size.unwrap_or(settings.pool_size);
        let manager = Manager::from_connect(
            config.clone(),
            PatientConnect {
                timeout: settings.acquire_timeout,
            },
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Backend {
                backend: "pool",
                message: format!("failed to build the connection pool: {e}"),
            })?;

        let acquire = started.elapsed();
        tracing::debug!(%schema, ?acquire, "test database ready");
        Ok(TestDb {
            schema,
            test_name,
            server,
            client: Some(client),
            pool,
            config,
            fixtures_dir,
            keep: self.keep.unwrap_or(settings.keep),
            teardown: settings.teardown,
            reap_ttl: settings.reap_ttl,
            acquire,
            lock_key: key,
        })
    }
}

impl TestDb {
    /// Options for a test database.
    pub fn builder() -> TestDbBuilder {
        TestDbBuilder::default()
    }

    /// A test database with the default options: migrated, no fixtures.
    pub async fn new() -> Result<TestDb, Error> {
        TestDb::builder().build().await
    }

    /// The test's schema name (`t_<run>_<test>_<attempt>`).
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// The name of the test this database belongs to.
    pub fn test_name(&self) -> &str {
        &self.test_name
    }

    /// A connected client whose `search_path` is the test's schema.
    pub fn client(&self) -> &Client {
        self.client
            .as_ref()
            .unwrap_or_else(|| unreachable!("the client is only taken by Drop"))
    }

    /// A small pool (deadpool-postgres) of connections to the test's schema, for the code
    /// under test. Connections are opened lazily, at most `pool_size`.
    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// A URL for any client (psql, sqlx, another language): it carries
    /// `options=-csearch_path=<schema>,public`. It includes the server's password, if any:
    /// do not log it.
    pub fn connection_string(&self) -> String {
        self.server.url_for_schema(&self.schema)
    }

    /// The tokio-postgres configuration of the test's connections.
    pub fn pg_config(&self) -> &tokio_postgres::Config {
        &self.config
    }

    /// The server the schema lives on.
    pub fn server(&self) -> &Server {
        &self.server
    }

    /// How long it took to get this database ready.
    pub fn acquire_time(&self) -> Duration {
        self.acquire
    }

    /// Opens one more connection to the test's schema.
    pub async fn connect(&self) -> Result<Client, Error> {
        let deadline = Instant::now() + Duration::from_secs(30);
        connect::connect(
            &self.config,
            deadline,
            Patience::StartingOrFull,
            &log_only,
            &self.server.describe(),
        )
        .await
    }

    /// Loads `fixtures/<name>.sql` into the schema, in one transaction.
    pub async fn load_fixture(&self, name: &str) -> Result<(), Error> {
        let files = script::load_fixtures(&self.fixtures_dir, &[name.to_owned()])?;
        let mut batch = Batch::default();
        batch.push("BEGIN;");
        batch.push(&ledger::mark("f0"));
        batch.push_file("fixture", &files[0]);
        batch.push(&format!(
            "UPDATE pgharness.ledger SET fixtures_ms = coalesce(fixtures_ms, 0) + {}
              WHERE schema_name = {};",
            ledger::ms_since("f0"),
            quote_literal(&self.schema)
        ));
        batch.push("COMMIT;");
        let client = self.client();
        match client.batch_execute(batch.text()).await {
            Ok(()) => Ok(()),
            Err(error) => {
                let _ = client.batch_execute("ROLLBACK").await;
                Err(batch.explain(&format!("failed to load fixture {name}"), error))
            }
        }
    }

    /// Keeps the schema after the test whatever its outcome.
    pub fn keep(&mut self) {
        self.keep = KeepPolicy::Always;
    }

    fn kept_message(&self) -> String {
        let command = if self.server.has_password() {
            // Never print the password: reuse the variable the user set it in.
            format!(
                "PGOPTIONS='-csearch_path={},public' psql \"$PGHARNESS_URL\"",
                self.schema
            )
        } else {
            format!("psql '{}'", self.server.url_for_schema(&self.schema))
        };
        format!(
            "pgharness: kept schema {} of test `{}` for debugging; inspect it with:\n    {command}\n\
             (`cargo xtask reap` drops it once it is older than {:?}; PGHARNESS_KEEP=never drops it at once)",
            self.schema, self.test_name, self.reap_ttl
        )
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let failed = std::thread::panicking();
        let keep = match self.keep {
            KeepPolicy::OnFailure => failed,
            KeepPolicy::Always => true,
            KeepPolicy::Never => false,
        };
        // Close the pool first, so that its sessions release their locks before the drop.
        self.pool.close();
        let Some(client) = self.client.take() else {
            return;
        };
        let literal = quote_literal(&self.schema);
        let acquire_ms = self.acquire.as_secs_f64() * 1000.0;
        let key = self.lock_key;
        // The owner lock is released in the same round trip: a janitor must not wait for
        // the server to notice the closed connection.
        let finish = |status: &str| {
            format!(
                "UPDATE pgharness.ledger SET status = '{status}', ended_at = now(), acquire_ms = {acquire_ms}
                  WHERE schema_name = {literal};
                 SELECT pg_advisory_unlock({SCHEMA_LOCK_SPACE}, {key});"
            )
        };
        let sql = if keep {
            finish(status::KEPT)
        } else if self.teardown == Teardown::Deferred {
            finish(status::PASSED)
        } else {
            format!(
                "{}\nSET lock_timeout = '10s';\n{}",
                finish(status::PASSED),
                ledger::drop_sql(&self.schema)
            )
        };
        let schema = self.schema.clone();
        let outcome = driver::block_on(
            async move { client.batch_execute(&sql).await },
            Duration::from_secs(60),
        );
        match outcome {
            Some(Ok(())) => {}
            Some(Err(error)) => {
                tracing::warn!(%schema, error = %crate::error::pg_message(&error), "pgharness: teardown failed; the reaper will drop the schema");
            }
            None => {
                tracing::warn!(%schema, "pgharness: teardown timed out; the reaper will drop the schema")
            }
        }
        if keep {
            let message = self.kept_message();
            tracing::warn!("{message}");
            // The one place pgharness prints: libtest and nextest capture it and show it
            // with the failing test's output, where the developer is looking.
            eprintln!("{message}");
        }
    }
}

impl fmt::Debug for TestDb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TestDb")
            .field("schema", &self.schema)
            .field("test_name", &self.test_name)
            .field("server", &self.server)
            .field("keep", &self.keep)
            .finish_non_exhaustive()
    }
}

fn current_test_name() -> String {
    std::thread::current()
        .name()
        .filter(|name| *name != "main")
        .map(str::to_owned)
        .or_else(|| std::env::var("NEXTEST_TEST_NAME").ok())
        .unwrap_or_else(|| "test".to_owned())
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_else(|_| "unknown".to_owned())
}

fn process_run_id() -> &'static str {
    static RUN_ID: OnceLock<String> = OnceLock::new();
    RUN_ID.get_or_init(|| format!("process-{}", uuid::Uuid::new_v4()))
}

fn process_settings() -> Result<Settings, Error> {
    static SETTINGS: OnceLock<Result<Settings, String>> = OnceLock::new();
    SETTINGS
        .get_or_init(|| Settings::load().map_err(|e| e.to_string()))
        .clone()
        .map_err(|message| Error::Backend {
            backend: "settings",
            message,
        })
}

async fn process_server(settings: &Settings) -> Result<Server, Error> {
    static SERVER: OnceCell<Server> = OnceCell::const_new();
    SERVER
        .get_or_try_init(|| {
            let settings = settings.clone();
            driver::run(async move { backend::ensure(&settings, &log_only).await })
        })
        .await
        .cloned()
}

fn load_migrations(dir: &std::path::Path) -> Result<Arc<Migrations>, Error> {
    static CACHE: Mutex<Option<HashMap<PathBuf, Arc<Migrations>>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    if let Some(migrations) = cache.get(dir) {
        return Ok(migrations.clone());
    }
    let migrations = Arc::new(Migrations::load(dir)?);
    cache.insert(dir.to_path_buf(), migrations.clone());
    Ok(migrations)
}
