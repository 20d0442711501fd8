//! Helpers for pgharness' own integration tests: the configured server, an admin client,
//! settings for servers of a test's own, and the child test process.
#![allow(dead_code)] // each test file uses a different subset

use std::path::PathBuf;

use pgharness::{BackendKind, Server, Settings};
use tokio_postgres::Client;

/// The server the run is configured for (what `cargo xtask test` started).
pub(crate) async fn configured_server() -> Server {
    let settings = Settings::load().expect("settings");
    pgharness::backend::ensure(&settings, &pgharness::events::log_only)
        .await
        .expect("the configured backend starts")
}

/// The server's administrator (`postgres` on the servers pgharness starts): for roles and
/// for looking at anything.
pub(crate) async fn admin(server: &Server) -> Client {
    connect(server.admin_config()).await
}

/// The tests' role, as the runner connects (its ledger, its pool, its schemas).
pub(crate) async fn runner(server: &Server) -> Client {
    connect(server.config()).await
}

pub(crate) async fn connect(config: tokio_postgres::Config) -> Client {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(connection);
    client
}

/// Settings for a server of this test's own: a fresh root, so its container or native
/// server is not the run's shared one. Remove it with `pgharness::backend::stop`.
pub(crate) fn isolated_settings(backend: BackendKind, label: &str) -> Settings {
    let root = std::env::temp_dir().join(format!("pgharness-it-{label}-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&root).expect("temp root");
    let env = std::env::vars().filter(|(k, _)| k == "PGHARNESS_IMAGE");
    let mut settings = Settings::load_from(&root, env).expect("settings");
    settings.backend = backend;
    settings
}

pub(crate) fn child_binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pgharness-selftest-child"))
}

pub(crate) async fn schema_exists(client: &Client, schema: &str) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            &[&schema],
        )
        .await
        .expect("query")
        .get(0)
}

/// The namespace of the tests' role on the servers pgharness starts, where their ledger is.
pub(crate) fn admin_ns() -> pgharness::ledger::Namespace {
    pgharness::ledger::Namespace::for_user(pgharness::TESTS_ROLE)
}

/// The schema of the one test database of a run.
pub(crate) async fn schema_of_run(client: &Client, run: &str) -> String {
    client
        .query_one(
            &format!(
                "SELECT schema_name FROM {}.ledger WHERE run_id = $1",
                admin_ns()
            ),
            &[&run],
        )
        .await
        .expect("the run's schema is in the ledger")
        .get(0)
}

/// A schema's ledger status. A recycled schema is renamed (`finish` in ledger.sql): its row
/// is then found by the name it had (`previous_name`).
pub(crate) async fn ledger_status(client: &Client, schema: &str) -> Option<String> {
    ledger_field(client, schema, "status").await
}

/// The name a schema has now: its own, or the one its recycle gave it.
pub(crate) async fn current_name(client: &Client, schema: &str) -> Option<String> {
    ledger_field(client, schema, "schema_name").await
}

/// A text column of the ledger row of `schema`, by its name or the one it had.
async fn ledger_field(client: &Client, schema: &str, column: &str) -> Option<String> {
    client
        .query_opt(
            &format!(
                "SELECT {column} FROM {}.ledger WHERE schema_name = $1 OR previous_name = $1
                  ORDER BY schema_name = $1 DESC LIMIT 1",
                admin_ns()
            ),
            &[&schema],
        )
        .await
        .expect("query")
        .map(|row| row.get(0))
}

/// A migration set of the calling test's own (`0001_app.sql` holding `sql`): the pool is
/// keyed by content, so a unique comment keeps other tests (and earlier runs) out of its pool.
pub(crate) fn own_migrations(label: &str, sql: &str) -> PathBuf {
    let id = uuid::Uuid::new_v4();
    let dir = std::env::temp_dir().join(format!("pgharness-mig-{label}-{id}"));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("0001_app.sql"), format!("-- {id}\n{sql}")).expect("migration");
    dir
}

/// A role made for one test, with only CONNECT and CREATE on the database; dropped (with
/// everything it owns) by [`Role::drop_all`].
pub(crate) struct Role {
    pub(crate) name: String,
    database: String,
    url: String,
}

/// `url` with its database replaced.
pub(crate) fn with_database(url: &str, database: &str) -> String {
    let mut url = url::Url::parse(url).expect("a URL");
    url.set_path(&format!("/{database}"));
    url.to_string()
}

impl Role {
    pub(crate) async fn create(admin: &Client, label: &str, server: &Server) -> Role {
        let name = format!(
            "pgh_{label}_{}",
            &uuid::Uuid::new_v4().simple().to_string()[..10]
        );
        let password = format!("pw-{}", uuid::Uuid::new_v4().simple());
        let database: String = admin
            .query_one("SELECT current_database()::text", &[])
            .await
            .unwrap()
            .get(0);
        admin
            .batch_execute(&format!(
                "CREATE ROLE {name} LOGIN PASSWORD '{password}';
                 GRANT CREATE ON DATABASE {database} TO {name};"
            ))
            .await
            .unwrap();
        Role {
            url: with_database(server.url_as(&name, &password).expose(), &database),
            name,
            database,
        }
    }

    pub(crate) fn url(&self) -> String {
        self.url.clone()
    }

    pub(crate) async fn client(&self) -> Client {
        connect(self.url().parse().unwrap()).await
    }

    pub(crate) fn settings(&self) -> Settings {
        let mut settings = Settings::load().unwrap();
        settings.teardown = pgharness::Teardown::Inline;
        settings.backend = BackendKind::Url;
        settings.url = Some(pgharness::SecretUrl::new(self.url()));
        settings
    }

    pub(crate) async fn drop_all(self, admin: &Client) {
        admin
            .batch_execute(&format!(
                "DROP OWNED BY {name} CASCADE;
                 REVOKE CREATE ON DATABASE {db} FROM {name}; DROP ROLE {name};",
                name = self.name,
                db = self.database
            ))
            .await
            .unwrap();
    }
}

/// A small deterministic generator (xorshift), so that a failing case replays from its seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}
