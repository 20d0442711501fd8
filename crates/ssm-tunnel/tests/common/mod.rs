//! fake-aws's SSM service in front of the run's real Postgres, and an SSM client for it.
#![allow(dead_code)] // each test file uses a different subset

pub(crate) mod relay;

use std::net::SocketAddr;
use std::sync::Arc;

use fake_aws::ssm::{SsmConfig, SsmService};
use fake_aws::{CredentialStore, KeyPair};

pub(crate) const TARGET: &str = "i-0fake0jumphost0";
pub(crate) const DB_HOST: &str = "db.internal.example";

pub(crate) struct Env {
    pub(crate) ssm: SsmService,
    pub(crate) keys: KeyPair,
    pub(crate) postgres: SocketAddr,
}

/// The run's Postgres; its admin configuration is kept for clients through the tunnel.
pub(crate) async fn postgres() -> SocketAddr {
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
    let _ = ADMIN.set(server.admin_config());
    SocketAddr::from(([127, 0, 0, 1], server.config().get_ports()[0]))
}

static ADMIN: std::sync::OnceLock<tokio_postgres::Config> = std::sync::OnceLock::new();

/// A client configuration that logs in as the run's Postgres admin (user, password,
/// database), for a connection made through the tunnel. Call after [`postgres`].
pub(crate) fn admin_login() -> tokio_postgres::Config {
    let admin = ADMIN.get().expect("postgres() first");
    let mut config = tokio_postgres::Config::new();
    config
        .user(admin.get_user().unwrap_or("postgres"))
        .dbname(admin.get_dbname().unwrap_or("postgres"));
    if let Some(password) = admin.get_password() {
        config.password(password);
    }
    config
}

pub(crate) async fn env(configure: impl FnOnce(&mut SsmConfig)) -> Env {
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "info".into()))
        .try_init();
    let postgres = postgres().await;
    let keys = KeyPair::random_temporary();
    let mut config = SsmConfig::default();
    config.host_map.insert(DB_HOST.into(), postgres);
    configure(&mut config);
    let ssm = SsmService::start(config, Arc::new(CredentialStore::new([keys.clone()])))
        .await
        .expect("fake SSM starts");
    Env {
        ssm,
        keys,
        postgres,
    }
}

impl Env {
    pub(crate) fn client(&self) -> aws_sdk_ssm::Client {
        self.client_at(&self.ssm.endpoint_url())
    }

    /// A client of the SSM API at `endpoint` (e.g. a relay in front of the fake).
    pub(crate) fn client_at(&self, endpoint: &str) -> aws_sdk_ssm::Client {
        let config = aws_sdk_ssm::Config::builder()
            .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
            .region(aws_sdk_ssm::config::Region::new("eu-west-2"))
            .endpoint_url(endpoint)
            .credentials_provider(self.keys.to_credentials())
            .build();
        aws_sdk_ssm::Client::from_conf(config)
    }

    /// Environment variables for a child process (the CLI) to use this fake.
    pub(crate) fn child_env(&self) -> Vec<(String, String)> {
        vec![
            ("AWS_ENDPOINT_URL_SSM".into(), self.ssm.endpoint_url()),
            ("AWS_ACCESS_KEY_ID".into(), self.keys.access_key_id.clone()),
            (
                "AWS_SECRET_ACCESS_KEY".into(),
                self.keys.secret_access_key.clone(),
            ),
            (
                "AWS_SESSION_TOKEN".into(),
                self.keys.session_token.clone().unwrap_or_default(),
            ),
            ("AWS_REGION".into(), "eu-west-2".into()),
            ("AWS_CONFIG_FILE".into(), "/nonexistent".into()),
            ("AWS_SHARED_CREDENTIALS_FILE".into(), "/nonexistent".into()),
            ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ]
    }
}

/// Runs `SELECT` over a stream through the tunnel (plain protocol, the admin's login).
pub(crate) async fn query_over<S>(stream: S) -> Result<String, tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let config = admin_login();
    let (client, connection) = config.connect_raw(stream, tokio_postgres::NoTls).await?;
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT 'through ' || current_setting('server_version_num')",
            &[],
        )
        .await?;
    Ok(row.get(0))
}

/// An echo server: what the tunnel carries comes back, so transfers can be checked exactly.
pub(crate) async fn echo_server() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

/// `len` bytes of a xorshift sequence from `seed`.
pub(crate) fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Writes `data` through a tunnel stream to the echo server and reads all of it back.
pub(crate) async fn round_trip(stream: ssm_tunnel::TunnelStream, data: Vec<u8>) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut read, mut write) = tokio::io::split(stream);
    let len = data.len();
    let writer = tokio::spawn(async move {
        write.write_all(&data).await.unwrap();
        write.flush().await.unwrap();
        write
    });
    let mut back = vec![0; len];
    read.read_exact(&mut back)
        .await
        .expect("all the bytes come back");
    drop(writer.await.unwrap());
    back
}
