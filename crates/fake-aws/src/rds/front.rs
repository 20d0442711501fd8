//! The listener: TLS required (`28000 no pg_hba.conf entry … no encryption` otherwise), a
//! cleartext password that must be a valid IAM token (`28000 PAM authentication failed`
//! otherwise), then the session is relayed to a real Postgres as the same user.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use rds_iam::clock::{Clock, SystemClock};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, copy_bidirectional};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use super::auth::{self, Expect};
use super::certs;
use super::pause::{Admission, PauseConfig, Pauser};
use super::upstream;
use super::wire::{self, FirstPacket};
use crate::credentials::CredentialStore;

/// How the fake RDS endpoint behaves.
#[derive(Clone, Debug)]
pub struct RdsFrontConfig {
    /// The endpoint name its certificate carries and tokens must be signed for.
    pub hostname: String,
    /// The port tokens must name (the real endpoint's, 5432), whatever port it listens on.
    pub port: u16,
    /// The region tokens must be signed for.
    pub region: String,
    /// The real Postgres sessions are relayed to.
    pub backend: SocketAddr,
    /// The password the IAM users have on the backend, which the front logs in with (as
    /// RDS authenticates behind its IAM check); `None` for a backend that trusts them.
    pub backend_password: Option<String>,
    /// Users with the `rds_iam` grant.
    pub allowed_users: Vec<String>,
    /// How long a token is accepted after signing (RDS: 15 min; shorter to test expiry).
    pub token_ttl: Duration,
    /// How far in the future a token's date may be.
    pub max_skew: Duration,
    /// Its clock.
    pub clock: Arc<dyn Clock>,
    /// Aurora Serverless auto-pause, if any.
    pub pause: Option<PauseConfig>,
    /// Where the CA bundle is written.
    pub state_dir: PathBuf,
    /// Where it listens (127.0.0.1:0 by default).
    pub listen: SocketAddr,
}

impl RdsFrontConfig {
    /// Defaults: `aurora-test.cluster-c0ffee.eu-west-2.rds.amazonaws.com:5432`, 15-minute
    /// tokens, no pause, the CA bundle under a fresh temporary directory.
    pub fn new(backend: SocketAddr, allowed_users: Vec<String>) -> RdsFrontConfig {
        RdsFrontConfig {
            hostname: "aurora-test.cluster-c0ffee.eu-west-2.rds.amazonaws.com".into(),
            port: 5432,
            region: "eu-west-2".into(),
            backend,
            backend_password: None,
            allowed_users,
            token_ttl: Duration::from_secs(900),
            max_skew: Duration::from_secs(300),
            clock: Arc::new(SystemClock),
            pause: None,
            state_dir: std::env::temp_dir().join(format!(
                "fake-aws-{}-{}",
                std::process::id(),
                rand::random::<u32>()
            )),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        }
    }
}

#[derive(Debug, Default)]
struct Stats {
    logins: AtomicU64,
    refused: AtomicU64,
}

struct Shared {
    config: RdsFrontConfig,
    credentials: Arc<CredentialStore>,
    acceptor: TlsAcceptor,
    pauser: Pauser,
    stats: Stats,
}

/// A running fake RDS endpoint. Dropping it stops it.
pub struct RdsFront {
    addr: SocketAddr,
    bundle: PathBuf,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
    /// The state directory, when this front made it: removed when it stops.
    made_dir: Option<PathBuf>,
}

impl std::fmt::Debug for RdsFront {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RdsFront")
            .field("addr", &self.addr)
            .field("hostname", &self.shared.config.hostname)
            .finish()
    }
}

impl Drop for RdsFront {
    fn drop(&mut self) {
        self.task.abort();
        // What it wrote (the CA bundle) goes with it, and the directory if it made it.
        let _ = std::fs::remove_file(&self.bundle);
        if let Some(dir) = &self.made_dir {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl RdsFront {
    /// Generates the certificates, binds, and starts serving.
    pub async fn start(
        config: RdsFrontConfig,
        credentials: Arc<CredentialStore>,
    ) -> anyhow::Result<RdsFront> {
        // A directory of its own (0700) unless it is given one that exists.
        let made_dir = if config.state_dir.exists() {
            None
        } else {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&config.state_dir)
                .with_context(|| format!("failed to create {}", config.state_dir.display()))?;
            Some(config.state_dir.clone())
        };
        let tls = certs::generate(&config.hostname, &config.state_dir)
            .context("failed to make the fake RDS certificates")?;
        let listener = TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("failed to bind {}", config.listen))?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            pauser: Pauser::new(config.pause),
            acceptor: TlsAcceptor::from(tls.server),
            config,
            credentials,
            stats: Stats::default(),
        });
        let task = tokio::spawn(accept_loop(listener, shared.clone()));
        tracing::info!(%addr, hostname = %shared.config.hostname, "fake RDS endpoint listening");
        Ok(RdsFront {
            addr,
            bundle: tls.bundle,
            shared,
            task,
            made_dir,
        })
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The CA bundle (PEM) that verifies its certificate.
    pub fn ca_bundle(&self) -> &Path {
        &self.bundle
    }

    /// The endpoint name.
    pub fn hostname(&self) -> &str {
        &self.shared.config.hostname
    }

    /// The port tokens must name.
    pub fn port(&self) -> u16 {
        self.shared.config.port
    }

    /// The region tokens must name.
    pub fn region(&self) -> &str {
        &self.shared.config.region
    }

    /// Pauses the cluster now, if nothing is connected.
    pub fn pause_now(&self) {
        self.shared.pauser.pause_now();
    }

    /// Resumes started so far.
    pub fn resumes(&self) -> u64 {
        self.shared.pauser.resumes()
    }

    /// Successful IAM logins so far.
    pub fn logins(&self) -> u64 {
        self.shared.stats.logins.load(Ordering::Relaxed)
    }

    /// Refused IAM logins so far.
    pub fn refused(&self) -> u64 {
        self.shared.stats.refused.load(Ordering::Relaxed)
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(error) = connection(stream, peer.ip(), &shared).await {
                        tracing::debug!(%peer, error = format!("{error:#}"), "fake RDS: connection ended");
                    }
                });
            }
            Err(error) => tracing::warn!(%error, "fake RDS: accept failed"),
        }
    }
}

/// Releases an admitted connection's slot in the pause state.
struct Admitted<'a>(&'a Pauser);

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        self.0.closed(Instant::now());
    }
}

async fn connection(mut tcp: TcpStream, peer: IpAddr, shared: &Shared) -> anyhow::Result<()> {
    tcp.set_nodelay(true).ok();
    loop {
        match wire::read_startup(&mut tcp).await? {
            FirstPacket::GssEnc => tcp.write_all(b"N").await?,
            FirstPacket::Cancel(packet) => {
                return forward_cancel(shared.config.backend, &packet).await;
            }
            FirstPacket::Startup(params) => {
                let startup = FirstPacket::Startup(params);
                let message = no_pg_hba(peer, &startup, "no encryption");
                tcp.write_all(&wire::fatal("28000", &message)).await?;
                return Ok(());
            }
            FirstPacket::Ssl => {
                let admission = shared.pauser.admit(Instant::now());
                if admission == Admission::Reset {
                    #[allow(deprecated)]
                    // SO_LINGER 0: close with RST, as a resuming cluster's proxy does
                    tcp.set_linger(Some(Duration::ZERO)).ok();
                    return Ok(());
                }
                let _admitted = (admission == Admission::Admit).then(|| Admitted(&shared.pauser));
                tcp.write_all(b"S").await?;
                let tls = shared.acceptor.accept(tcp).await.context("TLS handshake")?;
                return secure_session(tls, peer, shared, admission).await;
            }
        }
    }
}

fn no_pg_hba(peer: IpAddr, startup: &FirstPacket, encryption: &str) -> String {
    format!(
        "no pg_hba.conf entry for host \"{peer}\", user \"{}\", database \"{}\", {encryption}",
        startup.param("user").unwrap_or(""),
        startup
            .param("database")
            .or(startup.param("user"))
            .unwrap_or("")
    )
}

async fn secure_session<S: AsyncRead + AsyncWrite + Unpin>(
    mut client: S,
    peer: IpAddr,
    shared: &Shared,
    admission: Admission,
) -> anyhow::Result<()> {
    let startup = wire::read_startup(&mut client).await?;
    let params = match &startup {
        FirstPacket::Cancel(packet) => return forward_cancel(shared.config.backend, packet).await,
        FirstPacket::Startup(params) => params.clone(),
        FirstPacket::Ssl | FirstPacket::GssEnc => {
            anyhow::bail!("a second encryption request inside TLS")
        }
    };
    if admission == Admission::PgHba {
        let message = no_pg_hba(peer, &startup, "SSL encryption");
        client.write_all(&wire::fatal("28000", &message)).await?;
        return Ok(());
    }
    let user = startup.param("user").unwrap_or("").to_owned();
    client.write_all(&wire::ask_for_password()).await?;
    client.flush().await?;
    let token = wire::read_password(&mut client).await?.unwrap_or_default();
    let expect = Expect {
        hostname: &shared.config.hostname,
        port: shared.config.port,
        region: &shared.config.region,
        user: &user,
        allowed_users: &shared.config.allowed_users,
        now: shared.config.clock.now(),
        token_ttl: shared.config.token_ttl,
        max_skew: shared.config.max_skew,
    };
    if let Err(reason) = auth::check(&token, &shared.credentials, &expect) {
        shared.stats.refused.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(%user, %reason, "fake RDS: refused an IAM login");
        let message = format!("PAM authentication failed for user \"{user}\"");
        client.write_all(&wire::fatal("28000", &message)).await?;
        return Ok(());
    }
    shared.stats.logins.fetch_add(1, Ordering::Relaxed);
    tracing::debug!(%user, "fake RDS: IAM login accepted");
    let mut backend = TcpStream::connect(shared.config.backend)
        .await
        .with_context(|| {
            format!(
                "failed to reach the backend Postgres at {}",
                shared.config.backend
            )
        })?;
    backend.set_nodelay(true).ok();
    let mut startup_message = bytes::BytesMut::new();
    postgres_protocol::message::frontend::startup_message(
        params.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        &mut startup_message,
    )?;
    backend.write_all(&startup_message).await?;
    // The backend's own authentication is the front's business, as it is RDS's: the
    // client, already through IAM, sees only the final AuthenticationOk.
    let after_login =
        match upstream::login(&mut backend, shared.config.backend_password.as_deref()).await? {
            upstream::Login::Ok(bytes) => bytes,
            upstream::Login::Refused(error_response) => {
                client.write_all(&error_response).await?;
                return Ok(());
            }
        };
    client.write_all(&after_login).await?;
    copy_bidirectional(&mut client, &mut backend).await?;
    Ok(())
}

async fn forward_cancel(backend: SocketAddr, packet: &[u8]) -> anyhow::Result<()> {
    let mut stream = TcpStream::connect(backend).await?;
    stream.write_all(packet).await?;
    stream.shutdown().await.ok();
    Ok(())
}
