//! What `#[pgharness::test]` fills a test's parameters with ([`Inject`]), and the runtime
//! side of the attribute (`__macro`): the runtime, the database, closing what was handed
//! out, and the outcome.

use std::fmt::Debug;
use std::future::Future;
use std::pin::Pin;

use crate::testdb::{TestDb, TestDbBuilder};

/// A value `#[pgharness::test]` can hand a test, made from the test's database: a parameter
/// of this type is filled by [`Inject::inject`]. Implemented for
/// [`tokio_postgres::Client`] (a new connection in the schema),
/// [`deadpool_postgres::Pool`] (the test's pool) and, with the `sqlx` feature,
/// `sqlx::PgPool` and `sqlx::PgConnection`; a parameter of type [`TestDb`] gets the
/// database itself. Implement it for your own type (an app state built from a pool) to
/// have it injected too.
pub trait Inject: Sized {
    /// Makes the value; `closers` takes what must be closed before the schema is finished
    /// (a pool whose connections would otherwise still be open when it is recycled).
    fn inject(db: &TestDb, closers: &mut Closers) -> impl Future<Output = Self>;
}

impl Inject for tokio_postgres::Client {
    async fn inject(db: &TestDb, _: &mut Closers) -> Self {
        match db.connect().await {
            Ok(client) => client,
            Err(error) => panic!("pgharness: failed to connect to the test's schema: {error}"),
        }
    }
}

impl Inject for deadpool_postgres::Pool {
    async fn inject(db: &TestDb, _: &mut Closers) -> Self {
        // The test's own pool: `TestDb` closes it before the schema is finished.
        db.pool().clone()
    }
}

/// A pool of sqlx 0.8 connections to the test's schema (at most `pool_size`, opened
/// lazily), closed after the test's body and before its schema is finished.
#[cfg(feature = "sqlx")]
impl Inject for sqlx::PgPool {
    async fn inject(db: &TestDb, closers: &mut Closers) -> Self {
        // No ping before each acquire: it costs every query through the pool a round
        // trip, and a connection of a test's pool dies only with its server.
        let options = sqlx::postgres::PgPoolOptions::new()
            .max_connections(db.pool().status().max_size.max(1) as u32)
            .test_before_acquire(false);
        let own = db.sqlx_connect_options();
        let lent = closers
            .lends()
            .then(|| db.sqlx_lent_options(&own))
            .flatten();
        let pool = match lent {
            // Its first connection is the test's control session (`lend`): opened now, so
            // that every later one goes to the server.
            Some(lent) => match options.clone().connect_with(lent).await {
                Ok(pool) => {
                    pool.set_connect_options(own);
                    pool
                }
                Err(error) => {
                    tracing::debug!(%error, "pgharness: sqlx did not take the lent session");
                    options.connect_lazy_with(own)
                }
            },
            None => options.connect_lazy_with(own),
        };
        let closing = pool.clone();
        let home = db.lent_home();
        closers.push(async move {
            close_sqlx_pool(&closing).await;
            home_within(home).await;
        });
        pool
    }
}

/// Closes an sqlx 0.8 pool and every connection of it. Its `close()` alone can return with
/// a connection still open: one whose release (a ping) was under way takes its place among
/// the idle ones after `close()` last looked there (sqlx-core 0.8.6 `PoolInner::close`; 0.9
/// waits first and looks after). That one would stay open until the pool's last clone
/// drops, holding the schema (or its lent session) past the test. A second `close()` closes
/// it: by then no connection can be on its way back.
#[cfg(feature = "sqlx")]
pub(crate) async fn close_sqlx_pool(pool: &sqlx::PgPool) {
    pool.close().await;
    pool.close().await;
}

/// One sqlx 0.8 connection to the test's schema.
#[cfg(feature = "sqlx")]
impl Inject for sqlx::PgConnection {
    async fn inject(db: &TestDb, closers: &mut Closers) -> Self {
        // The test's control session (`lend`), when it can be lent.
        let own = db.sqlx_connect_options();
        if let Some(lent) = closers
            .lends()
            .then(|| db.sqlx_lent_options(&own))
            .flatten()
        {
            match sqlx::ConnectOptions::connect(&lent).await {
                Ok(connection) => {
                    closers.push(home_within(db.lent_home()));
                    return connection;
                }
                Err(error) => {
                    tracing::debug!(%error, "pgharness: sqlx did not take the lent session")
                }
            }
        }
        match sqlx::ConnectOptions::connect(&own).await {
            Ok(connection) => connection,
            Err(error) => {
                panic!("pgharness: failed to connect to the test's schema with sqlx: {error}")
            }
        }
    }
}

/// A diesel-async connection to the test's schema, over a connection pgharness opens and
/// drives (as `TestDb::connect`).
#[cfg(feature = "diesel-async")]
impl Inject for diesel_async::AsyncPgConnection {
    async fn inject(db: &TestDb, _: &mut Closers) -> Self {
        match diesel_connection(db.pg_config().clone(), db.server().backend()).await {
            Ok(connection) => connection,
            Err(error) => {
                panic!(
                    "pgharness: failed to connect to the test's schema with diesel-async: {error}"
                )
            }
        }
    }
}

/// A deadpool of diesel-async connections to the test's schema (at most `pool_size`),
/// closed after the test's body and before its schema is finished.
#[cfg(feature = "diesel-async")]
impl Inject for diesel_async::pooled_connection::deadpool::Pool<diesel_async::AsyncPgConnection> {
    async fn inject(db: &TestDb, closers: &mut Closers) -> Self {
        let manager = diesel_manager(db);
        let pool = match Self::builder(manager)
            .max_size(db.pool().status().max_size.max(1))
            .build()
        {
            Ok(pool) => pool,
            Err(error) => panic!("pgharness: failed to build the diesel-async pool: {error}"),
        };
        let closing = pool.clone();
        closers.push(async move { closing.close() });
        pool
    }
}

/// A bb8 pool of diesel-async connections to the test's schema (at most `pool_size`). bb8
/// has no close: its idle connections close when the test's last handle to it drops.
#[cfg(feature = "diesel-async")]
impl Inject for diesel_async::pooled_connection::bb8::Pool<diesel_async::AsyncPgConnection> {
    async fn inject(db: &TestDb, _: &mut Closers) -> Self {
        let manager = diesel_manager(db);
        match Self::builder()
            .max_size(db.pool().status().max_size.max(1) as u32)
            .build(manager)
            .await
        {
            Ok(pool) => pool,
            Err(error) => panic!("pgharness: failed to build the diesel-async bb8 pool: {error}"),
        }
    }
}

/// A diesel-async connection over a tokio-postgres client opened as the test's own are
/// (patiently, through the login relay of a `url` server, driven on pgharness' runtime).
#[cfg(feature = "diesel-async")]
async fn diesel_connection(
    config: tokio_postgres::Config,
    backend: crate::BackendKind,
) -> diesel::ConnectionResult<diesel_async::AsyncPgConnection> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let client = crate::connect::connect(
        &config,
        deadline,
        crate::connect::Patience::after_claim(backend),
        &crate::events::log_only,
        "the test's schema",
    )
    .await
    .map_err(|error| diesel::ConnectionError::BadConnection(error.to_string()))?;
    diesel_async::AsyncPgConnection::try_from(client).await
}

/// diesel-async's pool manager, its connections opened by [`diesel_connection`] (the URL
/// it is given is not used: the test's configuration is).
#[cfg(feature = "diesel-async")]
fn diesel_manager(
    db: &TestDb,
) -> diesel_async::pooled_connection::AsyncDieselConnectionManager<diesel_async::AsyncPgConnection>
{
    use diesel_async::pooled_connection::{AsyncDieselConnectionManager, ManagerConfig};
    let (config, backend) = (db.pg_config().clone(), db.server().backend());
    let mut manager = ManagerConfig::default();
    manager.custom_setup =
        Box::new(move |_url| Box::pin(diesel_connection(config.clone(), backend)));
    AsyncDieselConnectionManager::new_with_config("postgres://pgharness", manager)
}

/// A sea-orm connection to the test's schema, over an sqlx pool of at most `pool_size`
/// connections, closed after the test's body and before its schema is finished.
#[cfg(feature = "sea-orm")]
impl Inject for sea_orm::DatabaseConnection {
    async fn inject(db: &TestDb, closers: &mut Closers) -> Self {
        let pool = <sqlx::PgPool as Inject>::inject(db, closers).await;
        sea_orm::SqlxPostgresConnector::from_sqlx_postgres_pool(pool)
    }
}

/// A pool of sqlx 0.9 connections to the test's schema (the `sqlx09` feature), as for 0.8.
#[cfg(feature = "sqlx09")]
impl Inject for sqlx09::PgPool {
    async fn inject(db: &TestDb, closers: &mut Closers) -> Self {
        // No ping before each acquire: it costs every query through the pool a round
        // trip, and a connection of a test's pool dies only with its server.
        let options = sqlx09::postgres::PgPoolOptions::new()
            .max_connections(db.pool().status().max_size.max(1) as u32)
            .test_before_acquire(false);
        let own = db.sqlx09_connect_options();
        let lent = closers
            .lends()
            .then(|| db.sqlx09_lent_options(&own))
            .flatten();
        let pool = match lent {
            // Its first connection is the test's control session (`lend`): opened now, so
            // that every later one goes to the server.
            Some(lent) => match options.clone().connect_with(lent).await {
                Ok(pool) => {
                    pool.set_connect_options(own);
                    pool
                }
                Err(error) => {
                    tracing::debug!(%error, "pgharness: sqlx did not take the lent session");
                    options.connect_lazy_with(own)
                }
            },
            None => options.connect_lazy_with(own),
        };
        let closing = pool.clone();
        let home = db.lent_home();
        closers.push(async move {
            closing.close().await;
            home_within(home).await;
        });
        pool
    }
}

/// One sqlx 0.9 connection to the test's schema (the `sqlx09` feature).
#[cfg(feature = "sqlx09")]
impl Inject for sqlx09::PgConnection {
    async fn inject(db: &TestDb, closers: &mut Closers) -> Self {
        // The test's control session (`lend`), when it can be lent.
        let own = db.sqlx09_connect_options();
        if let Some(lent) = closers
            .lends()
            .then(|| db.sqlx09_lent_options(&own))
            .flatten()
        {
            match sqlx09::ConnectOptions::connect(&lent).await {
                Ok(connection) => {
                    closers.push(home_within(db.lent_home()));
                    return connection;
                }
                Err(error) => {
                    tracing::debug!(%error, "pgharness: sqlx did not take the lent session")
                }
            }
        }
        match sqlx09::ConnectOptions::connect(&own).await {
            Ok(connection) => connection,
            Err(error) => {
                panic!("pgharness: failed to connect to the test's schema with sqlx: {error}")
            }
        }
    }
}

/// Waits (a little) for the control session lent to sqlx to come home: the Terminate of a
/// closed pool's connection may still be a task of the test's runtime. A connection the
/// test kept past its end is not waited for: the teardown goes out when it closes.
#[cfg(any(feature = "sqlx", feature = "sqlx09"))]
async fn home_within(home: impl Future<Output = ()>) {
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), home).await;
}

/// What must be closed after the test's body and before its schema is finished, and
/// whether the test's control session may be lent to its first sqlx connection.
#[derive(Default)]
pub struct Closers {
    closes: Vec<Pin<Box<dyn Future<Output = ()> + Send>>>,
    lend: bool,
}

impl Closers {
    /// For a test that cannot reach its `TestDb`'s own client (`#[pgharness::test]` on a
    /// test with no `TestDb` parameter): the first sqlx pool or connection injected gets
    /// the control session itself, and no second backend is started for it. After that,
    /// [`TestDb::client`] fails with an error that says so; [`TestDb::connect`] still
    /// opens clients.
    #[doc(hidden)]
    pub fn lending() -> Closers {
        Closers {
            closes: Vec::new(),
            lend: true,
        }
    }

    /// Whether the control session may be lent (see [`Closers::lending`]).
    pub fn lends(&self) -> bool {
        self.lend
    }

    /// Runs `close` after the test's body returns. (After a panic nothing is closed: the
    /// schema of a failed test is kept as it is.)
    pub fn push(&mut self, close: impl Future<Output = ()> + Send + 'static) {
        self.closes.push(Box::pin(close));
    }

    #[doc(hidden)]
    pub async fn close(self) {
        for close in self.closes {
            close.await;
        }
    }
}

/// A test's return value: `()` or `Result<(), E: Debug>`.
pub trait Outcome {
    /// The failure, if the test failed without panicking.
    fn failure(self) -> Option<String>;
}

impl Outcome for () {
    fn failure(self) -> Option<String> {
        None
    }
}

impl<T, E: Debug> Outcome for Result<T, E> {
    fn failure(self) -> Option<String> {
        self.err().map(|error| format!("{error:?}"))
    }
}

/// The attribute's runtime side; not an API.
#[doc(hidden)]
pub mod __macro {
    pub use super::Closers;
    use super::{Outcome, TestDb, TestDbBuilder};

    /// `migrator = "…"`: an embedded sqlx `Migrator` of 0.8 or 0.9 (a method call, so that a
    /// `LazyLock` of one derefs to it).
    pub trait SqlxMigrator {
        /// The builder with this migrator's migrations.
        fn pgharness_apply(&self, builder: TestDbBuilder, source: &str) -> TestDbBuilder;
    }

    #[cfg(feature = "sqlx")]
    impl SqlxMigrator for sqlx::migrate::Migrator {
        fn pgharness_apply(&self, builder: TestDbBuilder, source: &str) -> TestDbBuilder {
            builder.sqlx_migrator(self, source)
        }
    }

    #[cfg(feature = "sqlx09")]
    impl SqlxMigrator for sqlx09::migrate::Migrator {
        fn pgharness_apply(&self, builder: TestDbBuilder, source: &str) -> TestDbBuilder {
            builder.sqlx09_migrator(self, source)
        }
    }

    /// A current-thread runtime with IO and time, as `#[tokio::test]` builds.
    pub fn runtime() -> tokio::runtime::Runtime {
        match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => panic!("pgharness: failed to build the test's runtime: {error}"),
        }
    }

    /// The test's database, or a panic saying why there is none and what to do.
    pub async fn database(builder: TestDbBuilder) -> TestDb {
        match builder.build().await {
            Ok(db) => db,
            Err(error) => panic!("pgharness: failed to set up the test database: {error}"),
        }
    }

    /// Finishes the schema (kept if the test returned `Err`), then fails the test with the
    /// error, as `#[test]` does for a returned `Err`.
    pub fn finish(mut db: TestDb, outcome: impl Outcome) {
        let failure = outcome.failure();
        if failure.is_some() {
            db.mark_failed();
        }
        drop(db);
        if let Some(failure) = failure {
            panic!("the test returned an error: {failure}");
        }
    }
}
