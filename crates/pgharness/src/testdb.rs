//! `TestDb`: one test's own migrated schema, its connections, and its teardown.

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use tokio_postgres::Client;

use crate::connect::{self, Patience, PatientConnect};
use crate::error::Error;
use crate::events::log_only;
use crate::ledger::{self, Finish};
use crate::script::{self, Batch, Migrations};
use crate::server::Server;
use crate::settings::{BackendKind, KeepPolicy, Settings, Teardown};
use crate::{backend, driver, naming, pool};

/// A test's own schema on a shared server, migrated and ready.
///
/// Every connection it hands out (`client()`, `pool()`, `connect()`, and any client given
/// `connection_string()`) starts with `search_path = <schema>, public`.
///
/// When it is dropped, the schema is reset and returned to the pool under a new name (or
/// dropped, when it cannot be proven fresh), unless the test is panicking (failed), in which
/// case it is kept and a `psql` command to inspect it is printed.
pub struct TestDb {
    schema: String,
    test_name: String,
    server: Server,
    client: Option<Client>,
    /// A duplicate of the control connection's socket, for a teardown not waited for.
    parting: Option<crate::parting::Parting>,
    /// The control session, lendable once to an sqlx connection (`lend`).
    lender: Option<crate::lend::Lender>,
    pool: Pool,
    config: tokio_postgres::Config,
    fixtures_dir: PathBuf,
    keep: KeepPolicy,
    /// The test failed without panicking (`#[pgharness::test]` saw it return `Err`).
    failed: bool,
    teardown: Teardown,
    reap_ttl: Duration,
    acquire: Duration,
    lock_key: i32,
    acquire_id: String,
    path: &'static str,
    connect_ms: f64,
    claim_ms: f64,
    run_id: String,
    keep_name: String,
    state_dir: PathBuf,
    /// The RDS proxy lease option of this test process's connections (rds backend only).
    lease: Option<String>,
    /// The role's pgharness schema (its ledger and functions).
    ns: ledger::Namespace,
    /// The test's `search_path` (`ledger::search_path_sql`), comma-separated.
    search_path: String,
}

/// An embedded migrator's migrations, read once per process, migrator (a `static`: its
/// address is its identity) and source: hashing every migration for each test would cost a
/// dependent's debug build.
#[cfg(any(feature = "sqlx", feature = "sqlx09"))]
fn embedded_once(
    address: usize,
    source: &str,
    read: impl FnOnce(String) -> Result<Migrations, String>,
) -> Result<Arc<Migrations>, String> {
    type Cache = HashMap<(usize, String), Result<Arc<Migrations>, String>>;
    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    cache
        .get_or_insert_with(HashMap::new)
        .entry((address, source.to_owned()))
        .or_insert_with(|| read(format!("sqlx::migrate::Migrator {source}")).map(Arc::new))
        .clone()
}

/// A URL into a schema: `search_path` and the RDS lease (if any) in its options, named after
/// the schema.
fn schema_url(server: &Server, search_path: &str, lease: Option<&str>, schema: &str) -> String {
    let url = server.url_with_search_path(search_path);
    let url = match lease {
        // The lease goes with the search_path (see `build`): `-` and `.` need no escape,
        // and the id is a uuid.
        Some(lease) => format!(
            "{url}%20{}",
            lease.trim_start().replace('=', "%3D").replace(':', "%3A")
        ),
        None => url,
    };
    // Named after the schema, as the test's own connections are: the schema is reset only
    // once no session of that name is left (an app's pool still open when the test ends
    // leaves the schema to be recycled later, never under it). Schema names need no
    // escaping.
    format!("{url}&application_name={schema}")
}

/// A failed connection to the RDS proxy says so when the proxy is gone.
fn explain(server: &Server, state_dir: &std::path::Path, error: Error) -> Error {
    if server.backend() != BackendKind::Rds {
        return error;
    }
    backend::rds::proxy_gone(state_dir).unwrap_or(error)
}

/// Options for one test's database. Start from [`TestDb::builder`].
#[derive(Clone, Debug, Default)]
#[must_use]
pub struct TestDbBuilder {
    fixtures: Vec<String>,
    /// Fixtures given as text (`#[pgharness::test]` embeds them as `#[sqlx::test]` does).
    fixture_sources: Vec<(String, String)>,
    migrations: Option<Option<PathBuf>>,
    /// Migrations given in code (an embedded sqlx `Migrator`, migrations in code); they win
    /// over `migrations`.
    embedded: Option<Result<Arc<Migrations>, String>>,
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

    /// Loads this SQL after the migrations and the named fixtures, in order; `name` is what
    /// errors call it (`#[pgharness::test(fixtures(..))]` embeds the files with
    /// `include_str!`, found next to the test's source file as `#[sqlx::test]` finds them).
    pub fn fixture_sql(mut self, name: impl Into<String>, sql: impl Into<String>) -> Self {
        self.fixture_sources.push((name.into(), sql.into()));
        self
    }

    /// Applies the migrations of this directory instead of the configured one.
    pub fn migrations(mut self, dir: impl Into<PathBuf>) -> Self {
        self.migrations = Some(Some(dir.into()));
        self
    }

    /// Applies the migrations of an embedded sqlx `Migrator` (`sqlx::migrate!()`, or one
    /// built at run time) instead of a directory, and fills `_sqlx_migrations` with its
    /// checksums, so that `migrator.run(&pool)` in the app finds the schema up to date. Pool
    /// schemas are kept per content hash, as for a directory; `source` says where the
    /// migrator comes from (`#[pgharness::test(migrator = "…")]` gives its path).
    #[cfg(feature = "sqlx")]
    pub fn sqlx_migrator(mut self, migrator: &sqlx::migrate::Migrator, source: &str) -> Self {
        self.embedded = Some(embedded_once(
            std::ptr::from_ref(migrator) as usize,
            source,
            |source| Ok(Migrations::from_sqlx(migrator, source)),
        ));
        self
    }

    /// [`sqlx_migrator`](Self::sqlx_migrator) for sqlx 0.9's `Migrator` (the `sqlx09`
    /// feature): its history table is the one it names (`table_name`); one outside the
    /// test's schema (a qualified name, `create_schemas`) is an error at `build`.
    #[cfg(feature = "sqlx09")]
    pub fn sqlx09_migrator(mut self, migrator: &sqlx09::migrate::Migrator, source: &str) -> Self {
        self.embedded = Some(embedded_once(
            std::ptr::from_ref(migrator) as usize,
            source,
            |source| Migrations::from_sqlx09(migrator, source),
        ));
        self
    }

    /// Builds the schema with migrations written in code instead of a directory: `migrate`
    /// gets a connection string into the new schema (its `search_path`, as
    /// [`TestDb::connection_string`]) and runs them there, once per pool schema: schemas are
    /// pooled by `source` and `key` (a version, or what names the migrations: change it when
    /// they change; an empty key pools them per build of the test binary, so a changed
    /// migration never meets a stale schema). `source` names them in errors and the ledger.
    /// Only a test process runs them, on a miss; the pool fills by recycling.
    pub fn migrate_with<F, Fut, E>(
        mut self,
        source: impl Into<String>,
        key: impl Into<String>,
        migrate: F,
    ) -> Self
    where
        F: Fn(String) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
        E: std::fmt::Display,
    {
        let code = crate::code_migrations::CodeMigrations::new(source.into(), key.into(), migrate);
        self.embedded = Some(Ok(Arc::new(Migrations::from_code(code))));
        self
    }

    /// Builds the schema with sea-orm's migrator `M` (`MigratorTrait::up`, on a connection of
    /// its own, which fills `seaql_migrations` as sea-orm does), once per pool schema: keyed
    /// by `M`, its migrations' names and `version` (change it when a migration's code
    /// changes under the same name). An empty `version` pools them per build of the test
    /// binary instead, so a changed migration never meets a stale schema.
    /// `#[pgharness::test(sea_orm_migrator = "path::Migrator")]` asks for it (with
    /// `migrations_version = "…"` for a version).
    #[cfg(feature = "sea-orm")]
    pub fn sea_orm_migrator<M: sea_orm_migration::MigratorTrait>(mut self, version: &str) -> Self {
        let code = crate::code_migrations::sea_orm::<M>(version);
        self.embedded = Some(Ok(Arc::new(Migrations::from_code(code))));
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

    /// Claims a ready schema (or creates one), loads the fixtures, and opens the connections.
    pub async fn build(self) -> Result<TestDb, Error> {
        // Boxed and type-erased: the steps' nested futures are deep enough that test crates
        // composing them with rstest fixtures overflowed rustc's query depth.
        let build: std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<TestDb, Error>> + Send>,
        > = Box::pin(self.build_steps());
        build.await
    }

    async fn build_steps(self) -> Result<TestDb, Error> {
        let started = Instant::now();
        let settings = match self.settings.clone() {
            Some(settings) => settings,
            None => process_settings()?,
        };
        // A server recorded under target/pgharness/ is only believed to run: the first
        // connection proves it, and a refused one falls back to the full check.
        let (mut server, believed) = match self.settings.is_some() {
            true => match backend::known(&settings) {
                Some(server) => (server, true),
                None => (ensure_server(&settings).await?, false),
            },
            false => process_server(&settings).await?,
        };
        if server.backend() == BackendKind::Url {
            // A server a user gave stores SCRAM verifiers with 4096 iterations: derive each
            // salted password once, for every test process (`auth_relay`).
            crate::auth_relay::keep_in(&settings.state_dir);
            crate::auth_relay::enable();
        }
        let test_name = self.test_name.clone().unwrap_or_else(current_test_name);
        let run_id = settings
            .run_id
            .clone()
            .unwrap_or_else(|| process_run_id().to_owned());
        let attempt = std::env::var("NEXTEST_ATTEMPT")
            .ok()
            .and_then(|a| a.parse().ok())
            .unwrap_or(1);
        // The name a kept schema gets: pool schemas are renamed to it when their test fails.
        let keep_name =
            naming::schema_name(&run_id, &test_name, attempt, naming::next_nth(&test_name));
        let migrations = match (&self.embedded, &self.migrations) {
            (Some(Ok(embedded)), _) => Some(embedded.clone()),
            (Some(Err(problem)), _) => {
                return Err(Error::Setting {
                    name: "migrator".into(),
                    origin: "TestDb::builder().sqlx09_migrator(..)".into(),
                    problem: problem.clone(),
                    fix: "keep the migrator's history table in the schema it migrates (an unqualified `table_name`, no `create_schemas`)".into(),
                });
            }
            (None, Some(None)) => None,
            (None, Some(Some(dir))) => Some(load_migrations(dir, settings.migrations_layout)?),
            (None, None) => Some(load_migrations(
                &settings.migrations,
                settings.migrations_layout,
            )?),
        };
        let fixtures_dir = self
            .fixtures_dir
            .clone()
            .unwrap_or_else(|| settings.fixtures.clone());
        let mut fixtures = script::load_fixtures(&fixtures_dir, &self.fixtures)?;
        fixtures.extend(
            self.fixture_sources
                .iter()
                .map(|(name, sql)| script::SqlFile {
                    path: PathBuf::from(name),
                    text: sql.clone(),
                    outside_transaction: false,
                }),
        );

        let acquire_id = uuid::Uuid::new_v4().to_string();
        let pool_size = self.pool_size.unwrap_or(settings.pool_size);
        // Through the RDS proxy, every connection of the test process names it and how many
        // sessions a test holds (its client and its pool), so that the proxy grants them
        // together and a test never deadlocks waiting for a session while it holds others
        // (rds-iam's `leases`).
        let lease = (server.backend() == BackendKind::Rds).then(|| {
            format!(
                " -c{}={}:{}",
                backend::rds::LEASE_OPTION,
                process_run_id(),
                pool_size + 1
            )
        });
        let mut first = server.config();
        if let Some(lease) = &lease {
            first.options(lease.trim_start());
        }
        let connect_started = Instant::now();
        let deadline = connect_started + settings.acquire_timeout;
        // Nobody is starting a `url` server, nor one merely believed to run: a refused
        // connection fails at once (53300 is still waited out).
        let patience = if believed {
            Patience::WhileFull
        } else {
            Patience::for_backend(server.backend())
        };
        let connected = connect::connect_keeping(
            &first,
            deadline,
            patience,
            &log_only,
            &server.describe(),
            true,
        )
        .await;
        let (client, kept) = match connected {
            Ok(connected) => {
                if believed && self.settings.is_none() {
                    remember_server(&server);
                }
                connected
            }
            Err(error) if believed => {
                // The full check starts or finds the server and mends the record.
                tracing::debug!(%error, "the recorded server did not answer; checking the backend");
                server = ensure_server(&settings).await?;
                if self.settings.is_none() {
                    remember_server(&server);
                }
                connect::connect_keeping(
                    &server.config(),
                    deadline,
                    Patience::WhileStartingOrFull,
                    &log_only,
                    &server.describe(),
                    true,
                )
                .await?
            }
            Err(error) => return Err(explain(&server, &settings.state_dir, error)),
        };
        let connect_ms = connect_started.elapsed().as_secs_f64() * 1000.0;
        let parting = kept.parting;
        // Through the RDS proxy a new connection is a lease of a session already open.
        let lender = match server.backend() {
            BackendKind::Rds => None,
            _ if !settings.lend_session => None,
            _ => kept.lendable.map(crate::lend::Lender::new),
        };

        let host = hostname();
        let (hash, source) = match &migrations {
            Some(migrations) => (migrations.hash.as_str(), migrations.source.as_str()),
            None => ("none", ""),
        };
        let ns = ledger::Namespace::of(&server.config());
        let who = ledger::Claimant {
            ns: &ns,
            extra_search_path: &settings.extra_search_path,
            hash,
            source,
            run_id: &run_id,
            test_name: &test_name,
            attempt,
            host: &host,
            connect_ms,
        };
        let claim_started = Instant::now();
        let (schema, search_path, path) = match claim(&client, &who, &fixtures).await? {
            Some((schema, search_path)) => (schema, search_path, "claimed"),
            None => {
                let schema = pool::schema_name(hash);
                let url_for =
                    |search_path: &str| schema_url(&server, search_path, lease.as_deref(), &schema);
                pool::create(
                    &client,
                    &schema,
                    naming::lock_key(&schema),
                    migrations.as_deref(),
                    &who,
                    true,
                    &fixtures,
                    Some(&url_for),
                )
                .await?;
                // The path the batch set (a miss is rare and slow: one round trip more). A
                // simple query: a prepared statement's Close would still be owed when the
                // session is lent (`lend`).
                let search_path = client
                    .simple_query("SELECT current_setting('search_path')")
                    .await
                    .map_err(|e| Error::postgres("failed to read the search_path", e))?
                    .into_iter()
                    .find_map(|message| match message {
                        tokio_postgres::SimpleQueryMessage::Row(row) => {
                            row.get(0).map(str::to_owned)
                        }
                        _ => None,
                    })
                    .unwrap_or_default();
                (schema, search_path, "created")
            }
        };
        let claim_ms = claim_started.elapsed().as_secs_f64() * 1000.0;
        let key = naming::lock_key(&schema);

        // A startup option separates words with spaces: the path has none to lose.
        let search_path = search_path.replace(' ', "");
        let mut config = server.config();
        config.options(format!(
            "-csearch_path={search_path}{}",
            lease.as_deref().unwrap_or_default()
        ));
        config.application_name(&schema);

        let manager = Manager::from_connect(
            config.clone(),
            PatientConnect {
                timeout: settings.acquire_timeout,
                patience: Patience::after_claim(server.backend()),
            },
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(Error::Pool)?;

        let acquire = started.elapsed();
        tracing::debug!(%schema, ?acquire, "test database ready");
        Ok(TestDb {
            schema,
            test_name,
            server,
            client: Some(client),
            parting,
            lender,
            pool,
            config,
            fixtures_dir,
            keep: self.keep.unwrap_or(settings.keep),
            failed: false,
            teardown: settings.teardown,
            reap_ttl: settings.reap_ttl,
            acquire,
            lock_key: key,
            acquire_id,
            path,
            connect_ms,
            claim_ms,
            run_id,
            keep_name,
            state_dir: settings.state_dir.clone(),
            lease,
            ns: ns.clone(),
            search_path,
        })
    }
}

/// Claims a ready schema of the pool for `who`, and loads the fixtures into it in the same
/// round trip. `None` on a miss (nothing was changed then). Installs the ledger on a
/// server that has none yet.
/// Claims a ready schema: its name and the `search_path` the claim set, or `None` on a miss.
async fn claim(
    client: &Client,
    who: &ledger::Claimant<'_>,
    fixtures: &[script::SqlFile],
) -> Result<Option<(String, String)>, Error> {
    let mut batch = Batch::default();
    batch.push(&ledger::claim_sql(who, !fixtures.is_empty()));
    pool::push_fixtures(&mut batch, fixtures);
    let mut installed = false;
    loop {
        match client.simple_query(batch.text()).await {
            Ok(messages) => {
                let claimed = messages.iter().find_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => Some(
                        row.get(0)
                            .zip(row.get(1))
                            .map(|(schema, path)| (schema.to_owned(), path.to_owned())),
                    ),
                    _ => None,
                });
                return Ok(claimed.flatten());
            }
            Err(error) if !installed && ledger::is_missing_ledger(&error) => {
                ledger::bootstrap(client, who.ns).await?;
                installed = true;
            }
            Err(error) if ledger::foreign_namespace(&error, who.ns).is_some() => {
                return Err(
                    ledger::foreign_namespace(&error, who.ns).unwrap_or_else(|| {
                        Error::postgres("failed to claim a schema from the pool", error)
                    }),
                );
            }
            Err(error)
                if error
                    .code()
                    .is_some_and(|code| code.code() == ledger::MISS_SQLSTATE) =>
            {
                return Ok(None);
            }
            Err(error) => {
                return Err(batch.explain("failed to claim a schema from the pool", error));
            }
        }
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

    /// The test's schema name: a schema of the pool (`p_<migrations hash>_<random>`),
    /// renamed to `t_<run>_<test>_<attempt>` if the test fails and it is kept.
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
    /// `options=-csearch_path=<schema>,public` and `application_name=<schema>`. It includes the server's password, if any:
    /// do not log it.
    pub fn connection_string(&self) -> String {
        schema_url(
            &self.server,
            &self.search_path,
            self.lease.as_deref(),
            &self.schema,
        )
    }

    /// The test's connection as sqlx 0.8 options (the `sqlx` feature), for an app that
    /// builds its own pool: `PgPoolOptions::new().connect_with(db.sqlx_connect_options())`.
    /// Its fields (host or socket, port, user, password, database, options) are those of
    /// [`connection_string`](Self::connection_string).
    #[cfg(feature = "sqlx")]
    pub fn sqlx_connect_options(&self) -> sqlx::postgres::PgConnectOptions {
        match self.connection_string().parse() {
            Ok(options) => options,
            // The URL is pgharness's own; the parser's errors never quote it.
            Err(error) => panic!("pgharness: sqlx does not read the test's URL: {error}"),
        }
    }

    /// The test's connection as sqlx 0.9 options (the `sqlx09` feature), for an app that
    /// builds its own pool: `PgPoolOptions::new().connect_with(db.sqlx_connect_options())`.
    /// Its fields (host or socket, port, user, password, database, options) are those of
    /// [`connection_string`](Self::connection_string).
    #[cfg(feature = "sqlx09")]
    pub fn sqlx09_connect_options(&self) -> sqlx09::postgres::PgConnectOptions {
        match self.connection_string().parse() {
            Ok(options) => options,
            // The URL is pgharness's own; the parser's errors never quote it.
            Err(error) => panic!("pgharness: sqlx does not read the test's URL: {error}"),
        }
    }

    /// Resolves once the control session is not lent to sqlx (`lend`).
    #[cfg(any(feature = "sqlx", feature = "sqlx09"))]
    pub(crate) fn lent_home(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let home = self.lender.as_ref().map(crate::lend::Lender::home);
        async move {
            if let Some(home) = home {
                home.await;
            }
        }
    }

    /// Lends the control session (`lend`). Its client must be owed nothing: `build` ends
    /// on simple queries (tokio-postgres closes a prepared statement as it drops, not
    /// waited for, and that answer would reach sqlx). The lending tests build on both paths
    /// (claimed and created) and would see such an answer as a protocol error.
    #[cfg(any(feature = "sqlx", feature = "sqlx09"))]
    fn lend(&self) -> Option<crate::lend::Ticket> {
        self.lender.as_ref()?.lend()
    }

    /// Options for one sqlx 0.8 connection on the test's control session, lent to it
    /// (`lend`), made from the test's own `options` (read once per injection: sqlx's URL
    /// parser looks for a password file too): `None` once lent, or when the session
    /// cannot be lent (through the RDS proxy, or the login relay of a `url` server).
    #[cfg(feature = "sqlx")]
    pub(crate) fn sqlx_lent_options(
        &self,
        options: &sqlx::postgres::PgConnectOptions,
    ) -> Option<sqlx::postgres::PgConnectOptions> {
        let ticket = self.lend()?;
        Some(
            options
                .clone()
                .socket(&ticket.dir)
                .port(crate::lend::PORT)
                .password(&ticket.password)
                .ssl_mode(sqlx::postgres::PgSslMode::Disable),
        )
    }

    /// [`sqlx_lent_options`](Self::sqlx_lent_options) for sqlx 0.9.
    #[cfg(feature = "sqlx09")]
    pub(crate) fn sqlx09_lent_options(
        &self,
        options: &sqlx09::postgres::PgConnectOptions,
    ) -> Option<sqlx09::postgres::PgConnectOptions> {
        let ticket = self.lend()?;
        Some(
            options
                .clone()
                .socket(&ticket.dir)
                .port(crate::lend::PORT)
                .password(&ticket.password)
                .ssl_mode(sqlx09::postgres::PgSslMode::Disable),
        )
    }

    /// The test's connection as separate fields, for an app whose configuration takes a
    /// host, port, user, password and database rather than a URL. `options` carries the
    /// schema's `search_path` (`-csearch_path=…`): pass it on as the driver's startup
    /// options (sqlx `PgConnectOptions::options`, tokio-postgres `Config::options`, libpq's
    /// `options`), or the app's connections land outside the test's schema.
    pub fn connect_params(&self) -> ConnectParams {
        let config = &self.config;
        ConnectParams {
            host: match config.get_hosts().first() {
                Some(tokio_postgres::config::Host::Tcp(name)) => name.clone(),
                Some(tokio_postgres::config::Host::Unix(dir)) => dir.display().to_string(),
                None => String::new(),
            },
            port: config.get_ports().first().copied().unwrap_or(5432),
            user: config.get_user().unwrap_or_default().to_owned(),
            password: config
                .get_password()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            database: config.get_dbname().unwrap_or_default().to_owned(),
            options: config.get_options().unwrap_or_default().to_owned(),
            application_name: self.schema.clone(),
        }
    }

    /// The test's connection as libpq environment variables (`PGHOST`, `PGPORT`, `PGUSER`,
    /// `PGPASSWORD`, `PGDATABASE`, `PGOPTIONS` with the schema's `search_path`), for `psql`,
    /// `pg_dump` or any libpq program: `Command::new("psql").envs(db.libpq_env())`. Its
    /// command line then holds no password (every local user can read
    /// `/proc/<pid>/cmdline`; a process's environment only its owner can).
    pub fn libpq_env(&self) -> Vec<(&'static str, String)> {
        crate::server::libpq_env(&self.connection_string())
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
            Patience::after_claim(self.server.backend()),
            &log_only,
            &self.server.describe(),
        )
        .await
        .map_err(|error| explain(&self.server, &self.state_dir, error))
    }

    /// Loads `fixtures/<name>.sql` into the schema, in one transaction.
    pub async fn load_fixture(&self, name: &str) -> Result<(), Error> {
        let files = script::load_fixtures(&self.fixtures_dir, &[name.to_owned()])?;
        let mut batch = Batch::default();
        batch.push("BEGIN;");
        batch.push(&ledger::mark("f0"));
        batch.push_file("fixture", &files[0]);
        batch.push(&ledger::fixtures_sql(&ledger::ms_since("f0")));
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

    /// Marks the test failed, as a panic does: under `keep = on-failure` the schema is kept.
    pub(crate) fn mark_failed(&mut self) {
        self.failed = true;
    }

    /// Keeps the schema after the test whatever its outcome.
    pub fn keep(&mut self) {
        self.keep = KeepPolicy::Always;
    }

    fn kept_message(&self, schema: &str) -> String {
        let command = self.server.psql_command(schema, &self.state_dir);
        format!(
            "pgharness: kept schema {schema} of test `{}` for debugging; inspect it with:\n    {command}\n\
             (`cargo pgharness reap` drops it once it is older than {:?}; PGHARNESS_KEEP=never drops it at once)",
            self.test_name, self.reap_ttl
        )
    }
}

impl TestDb {
    /// Writes the teardown on the control connection and returns without waiting: the
    /// server finishes the schema after the test (`parting`). Only a write that fails is
    /// the test's to hear of; what the finish meets on the server is recorded in the
    /// acquire log, and named by the run summary.
    fn part(
        &self,
        parting: crate::parting::Parting,
        log: &ledger::AcquireLog<'_>,
        finish: Finish,
        reader_alive: bool,
    ) {
        let shape = match self.server.backend() {
            BackendKind::Rds => crate::parting::Shape::Query,
            _ => crate::parting::Shape::Unsynced,
        };
        let statements = ledger::parting_sql(&self.ns, &self.schema, log, finish);
        let sent = parting.send(&statements, shape, Duration::from_secs(5), reader_alive);
        match sent {
            Ok(()) => {
                tracing::debug!(schema = %self.schema, "test database finished (not waited for)")
            }
            Err(error) => {
                tracing::warn!(schema = %self.schema, %error, "pgharness: the teardown could not be sent; the reaper will recycle or drop the schema");
                eprintln!(
                    "pgharness: the teardown of test `{}` could not be sent ({error}); schema {} is finished once its session ends, by a later test's teardown, the runner's janitor or `cargo pgharness reap`",
                    self.test_name, self.schema
                );
            }
        }
    }
}

/// How a test's schema is finished: kept (a failure, or `keep = always`), marked passed for
/// the janitor (`teardown = deferred`), or recycled.
fn finish_mode(keep: bool, teardown: Teardown) -> Finish {
    if keep {
        Finish::Keep
    } else if teardown == Teardown::Deferred {
        Finish::Pass
    } else {
        Finish::Recycle
    }
}

/// What `Drop` knows when it chooses how to send a test's teardown.
#[derive(Clone, Copy, Debug)]
struct DropFacts {
    /// Not waited for: a passing test, teardown not `inline`.
    detached: bool,
    /// Where the control session is (lent to sqlx, home, lost).
    whereabouts: crate::lend::Whereabouts,
    /// The control connection's client is closed (it wrote while its session was lent).
    client_closed: bool,
    /// A duplicate of the socket was kept for a parting.
    has_parting: bool,
}

/// How `Drop` sends a test's teardown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Route {
    /// The session is lent to an sqlx connection the test kept: the parting goes out when
    /// it comes home.
    PartLater,
    /// The session is gone: nothing to send; a later sweep finishes the schema.
    Lost,
    /// Sent on the socket's duplicate and not waited for (`reader_alive`: the client's
    /// connection task still reads the answers owed to it).
    Part { reader_alive: bool },
    /// Run through the client, waiting for its outcome (`teardown = inline`, a kept schema).
    Wait,
}

/// The teardown's route, from what `Drop` knows: a pure function (tested as a table).
fn route(facts: DropFacts) -> Route {
    use crate::lend::Whereabouts;
    match facts.whereabouts {
        Whereabouts::Lent => return Route::PartLater,
        Whereabouts::Lost | Whereabouts::Parted => return Route::Lost,
        Whereabouts::Home => {}
    }
    // A client that wrote while its session was lent is closed: the parting is all that
    // can finish the schema then.
    if (facts.client_closed || facts.detached) && facts.has_parting {
        return Route::Part {
            reader_alive: !facts.client_closed,
        };
    }
    Route::Wait
}

/// How long a teardown that waits (inline, or keeping a failed test's schema) waits for the
/// control session lent to sqlx to come home: after its closers, only a connection the test
/// kept in use (or, after a panic, one its runtime would have closed) is still out.
const RECLAIM_TIMEOUT: Duration = Duration::from_millis(200);

impl TestDb {
    /// Has the teardown written on the lent control session when sqlx gives it back.
    fn part_later(&self, log: &ledger::AcquireLog<'_>, finish: Finish) {
        let statements = ledger::parting_sql(&self.ns, &self.schema, log, finish);
        let deferred = crate::parting::message(&statements, crate::parting::Shape::Unsynced)
            .ok()
            .is_some_and(|bytes| {
                self.lender
                    .as_ref()
                    .is_some_and(|lender| lender.part_later(bytes))
            });
        if deferred {
            tracing::info!(schema = %self.schema, "pgharness: the test's sqlx connection is still in use; its schema is finished when it closes");
        } else {
            tracing::warn!(schema = %self.schema, "pgharness: the control session lent to sqlx is gone; the reaper will recycle or drop the schema");
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let failed = self.failed || std::thread::panicking();
        let keep = match self.keep {
            KeepPolicy::OnFailure => failed,
            KeepPolicy::Always => true,
            KeepPolicy::Never => false,
        };
        // Close the pool first: a schema is reset only once no other session of its test
        // is connected (`pgharness.reset` waits briefly for closing ones).
        self.pool.close();
        let Some(client) = self.client.take() else {
            return;
        };
        let parting = self.parting.take();
        let finish = finish_mode(keep, self.teardown);
        // A session lent to sqlx comes home when its pool closes (`#[pgharness::test]`'s
        // closers wait for it). A teardown not waited for never waits for it either: if
        // the session is still out, its parting goes out when it comes home. One that
        // waits gives it a moment (its test's runtime, blocked here, may hold the close).
        let detached = !keep && self.teardown != Teardown::Inline;
        let whereabouts = match &self.lender {
            Some(lender) if detached && lender.is_lent() => crate::lend::Whereabouts::Lent,
            Some(lender) => lender.reclaim(RECLAIM_TIMEOUT),
            None => crate::lend::Whereabouts::Home,
        };
        // The owner lock is released in the same round trip: a janitor must not wait for
        // the server to notice the closed connection.
        let log = ledger::AcquireLog {
            id: &self.acquire_id,
            run_id: &self.run_id,
            test_name: &self.test_name,
            path: self.path,
            connect_ms: self.connect_ms,
            claim_ms: self.claim_ms,
            acquire_ms: self.acquire.as_secs_f64() * 1000.0,
        };
        let facts = DropFacts {
            detached,
            whereabouts,
            client_closed: client.is_closed(),
            has_parting: parting.is_some(),
        };
        let parting = match (route(facts), parting) {
            // Still with an sqlx connection the test kept (a pool clone in a server that
            // outlives it): the teardown goes out when that connection closes.
            (Route::PartLater, _) => {
                self.part_later(&log, finish);
                return;
            }
            (Route::Lost, _) => {
                tracing::warn!(schema = %self.schema, "pgharness: the control session lent to sqlx was lost; a later sweep, the janitor or the reaper recycles or drops the schema");
                return;
            }
            (Route::Part { reader_alive }, Some(parting)) => {
                self.part(parting, &log, finish, reader_alive);
                // tokio-postgres's own Terminate is swallowed at the gate: the parting's
                // ended the session.
                drop(client);
                return;
            }
            (Route::Part { .. } | Route::Wait, parting) => parting,
        };
        let sql = ledger::finish_sql(
            &self.ns,
            &self.schema,
            &log,
            finish,
            &self.keep_name,
            self.lock_key,
        );
        // A transaction the test left open, or failed in, is rolled back first: in a failed
        // one the finish would be refused.
        let sql = match &parting {
            Some(parting) if parting.in_transaction() => format!("ROLLBACK;\n{sql}"),
            _ => sql,
        };
        let schema = self.schema.clone();
        let outcome = driver::block_on(
            async move { client.simple_query(&sql).await },
            Duration::from_secs(60),
        );
        let mut final_name = self.schema.clone();
        // The connection itself failed (no SQLSTATE: closed, reset, refused): the server
        // went away or cannot be reached, and nothing was kept there to inspect.
        let lost = match &outcome {
            Some(Err(error)) => error.code().is_none().then(|| error.to_string()),
            _ => None,
        };
        match outcome {
            Some(Ok(messages)) => {
                let result = messages.iter().find_map(|message| match message {
                    tokio_postgres::SimpleQueryMessage::Row(row) => row.get(0).map(str::to_owned),
                    _ => None,
                });
                tracing::debug!(%schema, outcome = ?result, "test database finished");
                if let Some(name) = result.as_deref().and_then(|r| r.strip_prefix("kept:")) {
                    final_name = name.to_owned();
                }
            }
            // Said on stderr as well as logged: a project that installs no tracing
            // subscriber (or silences pgharness) still sees it with the test's output.
            Some(Err(error)) if lost.is_none() => {
                let error = crate::error::pg_message(&error);
                tracing::warn!(%schema, %error, "pgharness: teardown failed; the reaper will recycle or drop the schema");
                eprintln!(
                    "pgharness: the teardown of test `{}` failed ({error}); schema {schema} is left for `cargo pgharness reap` to recycle or drop",
                    self.test_name
                );
            }
            // The connection itself is gone: said once below for a kept schema; else the
            // server went away and there is nothing to recycle.
            Some(Err(error)) => {
                tracing::warn!(%schema, %error, "pgharness: teardown lost its connection");
            }
            None => {
                tracing::warn!(%schema, "pgharness: teardown timed out; the reaper will recycle or drop the schema");
                eprintln!(
                    "pgharness: the teardown of test `{}` did not finish within 60 s; schema {schema} is left for `cargo pgharness reap` to recycle or drop",
                    self.test_name
                );
            }
        }
        if let (true, Some(error)) = (keep, &lost) {
            eprintln!(
                "pgharness: the connection to the server of test `{}` was lost ({error}): there is no schema to inspect (the server may be gone; the reaper recycles or drops what remains)",
                self.test_name
            );
        } else if keep {
            let message = self.kept_message(&final_name);
            tracing::warn!("{message}");
            // The one place pgharness prints: libtest and nextest capture it and show it
            // with the failing test's output, where the developer is looking.
            eprintln!("{message}");
        }
    }
}

/// The test's connection as separate fields ([`TestDb::connect_params`]). `Debug` never
/// shows the password.
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectParams {
    /// A host name or address, or a Unix socket's directory (a path, starting with `/`).
    pub host: String,
    /// The port (of the socket, for a directory).
    pub port: u16,
    /// The role.
    pub user: String,
    /// Its password, if the server asks for one.
    pub password: Option<String>,
    /// The database.
    pub database: String,
    /// Startup options: `-csearch_path=<schema>,…` (and, through the RDS proxy, its lease).
    pub options: String,
    /// The schema's name, to tell the test's sessions apart in `pg_stat_activity` (an app
    /// may use its own: the reset waits for any session that still writes in the schema).
    pub application_name: String,
}

impl fmt::Debug for ConnectParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnectParams")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("database", &self.database)
            .field("options", &self.options)
            .field("application_name", &self.application_name)
            .finish()
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

/// This machine's name, for the ledger (which host holds a schema).
pub(crate) fn hostname() -> String {
    gethostname::gethostname().to_string_lossy().into_owned()
}

fn process_run_id() -> &'static str {
    static RUN_ID: OnceLock<String> = OnceLock::new();
    RUN_ID.get_or_init(|| format!("process-{}", uuid::Uuid::new_v4()))
}

/// This process's settings, loaded once; a load that fails is not remembered, so every
/// caller gets the typed error (`Error::Setting`, …) itself.
fn process_settings() -> Result<Settings, Error> {
    static SETTINGS: OnceLock<Settings> = OnceLock::new();
    if let Some(settings) = SETTINGS.get() {
        return Ok(settings.clone());
    }
    let settings = Settings::load()?;
    Ok(SETTINGS.get_or_init(|| settings).clone())
}

/// This process's server (settings from the workspace and environment): one a connection
/// has proved, else the one recorded under `target/pgharness/` (believed, `true`), else
/// the backend's full check.
async fn process_server(settings: &Settings) -> Result<(Server, bool), Error> {
    if let Some(server) = proved_server()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    {
        return Ok((server, false));
    }
    if let Some(server) = backend::known(settings) {
        return Ok((server, true));
    }
    let server = ensure_server(settings).await?;
    remember_server(&server);
    Ok((server, false))
}

fn proved_server() -> &'static Mutex<Option<Server>> {
    static SERVER: Mutex<Option<Server>> = Mutex::new(None);
    &SERVER
}

fn remember_server(server: &Server) {
    *proved_server().lock().unwrap_or_else(|p| p.into_inner()) = Some(server.clone());
}

/// The backend's full check: starts or joins the server.
async fn ensure_server(settings: &Settings) -> Result<Server, Error> {
    let settings = settings.clone();
    driver::run(async move { backend::ensure(&settings, &log_only).await }).await
}

fn load_migrations(
    dir: &std::path::Path,
    layout: crate::layout::Layout,
) -> Result<Arc<Migrations>, Error> {
    type Cache = HashMap<(PathBuf, crate::layout::Layout), Arc<Migrations>>;
    static CACHE: Mutex<Option<Cache>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    let cache = cache.get_or_insert_with(HashMap::new);
    let key = (dir.to_path_buf(), layout);
    if let Some(migrations) = cache.get(&key) {
        return Ok(migrations.clone());
    }
    let migrations = Arc::new(Migrations::load(dir, layout)?);
    cache.insert(key, migrations.clone());
    Ok(migrations)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lend::Whereabouts::{self, Home, Lent, Lost, Parted};

    #[test]
    fn a_teardown_s_route_follows_from_what_drop_knows() {
        let part = |reader_alive| Route::Part { reader_alive };
        // (detached, whereabouts, client closed, parting kept) → route
        let table: &[(bool, Whereabouts, bool, bool, Route)] = &[
            (true, Home, false, true, part(true)),
            (true, Home, false, false, Route::Wait),
            (false, Home, false, true, Route::Wait),
            (false, Home, true, true, part(false)),
            (true, Home, true, true, part(false)),
            (false, Home, true, false, Route::Wait),
            (true, Lent, false, true, Route::PartLater),
            (false, Lent, true, true, Route::PartLater),
            (true, Lost, false, true, Route::Lost),
            (false, Parted, false, true, Route::Lost),
        ];
        for &(detached, whereabouts, client_closed, has_parting, expected) in table {
            let facts = DropFacts {
                detached,
                whereabouts,
                client_closed,
                has_parting,
            };
            assert_eq!(route(facts), expected, "{facts:?}");
        }
    }

    #[test]
    fn a_failure_keeps_a_deferred_teardown_passes_and_the_rest_recycle() {
        assert_eq!(finish_mode(true, Teardown::Detached), Finish::Keep);
        assert_eq!(finish_mode(true, Teardown::Deferred), Finish::Keep);
        assert_eq!(finish_mode(false, Teardown::Deferred), Finish::Pass);
        assert_eq!(finish_mode(false, Teardown::Detached), Finish::Recycle);
        assert_eq!(finish_mode(false, Teardown::Inline), Finish::Recycle);
    }
}
