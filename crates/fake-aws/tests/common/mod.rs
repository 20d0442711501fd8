//! A fake RDS endpoint in front of the run's real Postgres, and a client set up for it.
#![allow(dead_code)] // each test file uses a different subset

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fake_aws::rds::{RdsFront, RdsFrontConfig};
use fake_aws::{CredentialStore, KeyPair};
use rds_iam::clock::Clock;
use rds_iam::credentials::StaticCredentials;
use rds_iam::{RdsTarget, TcpDialer, TlsPolicy, TokenCache, TokenRequest};

pub(crate) const USER: &str = "iam_app";

pub(crate) struct Env {
    pub(crate) front: RdsFront,
    pub(crate) keys: KeyPair,
    pub(crate) target: RdsTarget,
    pub(crate) dialer: TcpDialer,
    pub(crate) backend: SocketAddr,
}

/// An admin connection to the run's Postgres (container or native, as configured), past
/// every proxy and fake.
pub(crate) async fn admin() -> tokio_postgres::Client {
    admin_with_config().await.0
}

async fn admin_with_config() -> (tokio_postgres::Client, tokio_postgres::Config) {
    let mut settings = pgharness::Settings::load().expect("settings");
    // An admin on a local server, also in a run of the rds backend: these tests create roles
    // and point the fakes at the server themselves.
    settings.url = None;
    // The fakes dial it over TCP (a native server listens only on its socket otherwise).
    settings.native_tcp = true;
    settings.backend = pgharness::backend::resolve_local(&settings, &pgharness::events::log_only)
        .await
        .expect("a local backend");
    let server = pgharness::backend::ensure(&settings, &pgharness::events::log_only)
        .await
        .expect("a Postgres server");
    let config = server.admin_config();
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("admin connection");
    tokio::spawn(connection);
    (client, config)
}

/// The run's Postgres (container or native, as configured), with the IAM user created
/// (its password on the backend: the admin's, which the fake front logs in with).
pub(crate) async fn backend() -> (SocketAddr, Option<String>) {
    backend_for(USER, None).await
}

/// The run's Postgres with IAM user `user` created, limited to `connection_limit`
/// connections at once when given (Postgres refuses more with `53300`).
pub(crate) async fn backend_for(
    user: &str,
    connection_limit: Option<i32>,
) -> (SocketAddr, Option<String>) {
    let (client, config) = admin_with_config().await;
    // Concurrent test processes race to create it; losing the race is fine.
    if let Err(error) = client
        .batch_execute(&format!("CREATE ROLE {user} LOGIN"))
        .await
    {
        let code = error
            .code()
            .map(|c| c.code().to_owned())
            .unwrap_or_default();
        assert!(
            code == "42710" || code == "23505",
            "creating {user}: {error}"
        );
    }
    let password = config
        .get_password()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let mut alter = String::new();
    if let Some(password) = &password {
        alter.push_str(&format!(
            "ALTER ROLE {user} PASSWORD {};",
            postgres_protocol::escape::escape_literal(password)
        ));
    }
    alter.push_str(&format!(
        "ALTER ROLE {user} CONNECTION LIMIT {};",
        connection_limit.unwrap_or(-1)
    ));
    client
        // Test processes run this at once: one at a time, or Postgres says "tuple
        // concurrently updated".
        .batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock(7366); {alter} COMMIT;"
        ))
        .await
        .expect("the IAM user's backend password and limit");
    (
        SocketAddr::from(([127, 0, 0, 1], config.get_ports()[0])),
        password,
    )
}

/// A fake RDS whose tokens live `token_ttl`, on a manual clock the test moves (share it with
/// the token cache, so that both sides see the same time).
pub(crate) async fn env_on_a_manual_clock(
    token_ttl: Duration,
) -> (Env, rds_iam::clock::ManualClock) {
    let clock = rds_iam::clock::ManualClock::new(std::time::SystemTime::now());
    let env = env(|config| {
        config.token_ttl = token_ttl;
        config.clock = Arc::new(clock.clone());
    })
    .await;
    (env, clock)
}

pub(crate) async fn env(configure: impl FnOnce(&mut RdsFrontConfig)) -> Env {
    env_as(USER, None, configure).await
}

/// A fake RDS for IAM user `user`, at most `connection_limit` connections of it at once on
/// the backend when given.
pub(crate) async fn env_as(
    user: &str,
    connection_limit: Option<i32>,
    configure: impl FnOnce(&mut RdsFrontConfig),
) -> Env {
    let (backend, password) = backend_for(user, connection_limit).await;
    let keys = KeyPair::random_temporary();
    let mut config = RdsFrontConfig::new(backend, vec![user.to_owned()]);
    config.backend_password = password;
    configure(&mut config);
    let front = RdsFront::start(config, Arc::new(CredentialStore::new([keys.clone()])))
        .await
        .expect("the fake RDS starts");
    let tls = rds_iam::tls::client_config(&TlsPolicy::VerifyFull {
        ca_bundle: front.ca_bundle().to_owned(),
    })
    .unwrap();
    let target = RdsTarget {
        endpoint: TokenRequest::new(front.hostname(), front.port(), user, Some(front.region()))
            .unwrap(),
        database: "postgres".into(),
        tls,
        wake_deadline: Duration::from_secs(30),
    };
    let dialer = TcpDialer::new(front.local_addr().to_string());
    Env {
        front,
        keys,
        target,
        dialer,
        backend,
    }
}

impl Env {
    pub(crate) fn tokens(&self) -> TokenCache {
        TokenCache::new(Arc::new(StaticCredentials(self.keys.to_credentials())))
    }

    pub(crate) fn tokens_with(&self, clock: Arc<dyn Clock>, reuse_for: Duration) -> TokenCache {
        TokenCache::with_clock(
            Arc::new(StaticCredentials(self.keys.to_credentials())),
            clock,
            reuse_for,
        )
    }
}

pub(crate) fn ignore_waits(_: rds_iam::Waiting) {}

/// Waits until `done` holds: a sync point on a proxy's own counters.
pub(crate) async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting: {what}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Waits until backend `pid` runs a statement (pg_stat_activity, seen from `observer`).
pub(crate) async fn until_running(observer: &tokio_postgres::Client, pid: i32) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let running: bool = observer
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1 AND state = 'active')",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if running {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "backend {pid} never ran its statement"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A local auth proxy in front of the fake RDS, on an ephemeral port.
pub(crate) async fn proxy(
    env: &Env,
    password: rds_iam::ProxyPassword,
    tokens: TokenCache,
    budget: rds_iam::Budget,
) -> rds_iam::Proxy {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    rds_iam::serve(
        listener,
        env.target.clone(),
        password,
        Arc::new(env.dialer.clone()),
        Arc::new(tokens),
        budget,
    )
    .unwrap()
}

/// The user a client is logged in as, on the server's side.
pub(crate) async fn current_user(client: &tokio_postgres::Client) -> String {
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

/// A client of a proxy, its connection driven in the background.
pub(crate) async fn client_of(proxy: &rds_iam::Proxy) -> tokio_postgres::Client {
    let config: tokio_postgres::Config = proxy.url().parse().unwrap();
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// A session budget of `sessions` on a lock space of its own: test processes share the
/// server, and must not share (or wait on) each other's budgets.
pub(crate) fn budget(sessions: u32) -> rds_iam::Budget {
    rds_iam::Budget {
        lock_space: rand::random_range(0x1000_0000..0x7000_0000),
        ..rds_iam::Budget::new(sessions)
    }
}

/// Logs in to the fake RDS endpoint with `password` as the IAM token, over TLS configured
/// by `tls` and checked against `server_name`; the raw path a client other than rds-iam takes.
pub(crate) async fn login_with(
    env: &Env,
    tls: &rustls::ClientConfig,
    server_name: &str,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .user(USER)
        .dbname("postgres")
        .password(password)
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    let mut make = tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone());
    let tls = tokio_postgres::tls::MakeTlsConnect::<tokio::net::TcpStream>::make_tls_connect(
        &mut make,
        server_name,
    )
    .expect("a valid server name");
    let stream = tokio::net::TcpStream::connect(env.front.local_addr())
        .await
        .expect("the front listens");
    let (client, connection) = config.connect_raw(stream, tls).await?;
    tokio::spawn(connection);
    Ok(client)
}

/// A temporary directory only this user can enter (0700), removed with everything in it
/// when dropped: where a test keeps the secrets it hands to a process.
pub(crate) struct PrivateDir(std::path::PathBuf);

impl PrivateDir {
    pub(crate) fn new() -> PrivateDir {
        use std::os::unix::fs::DirBuilderExt;
        let path = std::env::temp_dir().join(format!("fake-aws-test-{}", uuid::Uuid::new_v4()));
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .expect("a private temporary directory");
        PrivateDir(path)
    }

    pub(crate) fn path(&self) -> &std::path::Path {
        &self.0
    }

    /// Writes `contents` to a new 0600 file `name` inside.
    pub(crate) fn secret_file(&self, name: &str, contents: &str) -> std::path::PathBuf {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let path = self.0.join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut file| file.write_all(contents.as_bytes()))
            .expect("a secret file");
        path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
