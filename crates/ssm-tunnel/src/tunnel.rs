//! `Tunnel`: the public handle of one port-forwarding session.

use std::sync::Arc;
use std::time::Duration;

use ssm_proto::handshake::{self, Mode, PortSession};
pub use ssm_proto::liveness::LivenessConfig;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::control;
use crate::driver::{Command, Driver, Stats};
use crate::error::Error;
use crate::stream::TunnelStream;
use crate::websocket;

/// What to forward, and through which instance.
#[derive(Clone, Debug)]
pub struct TunnelConfig {
    /// The jumphost's instance id (`i-…`).
    pub target: String,
    /// The remote host, as the instance resolves it (e.g. the RDS endpoint).
    pub host: String,
    /// The remote port.
    pub port: u16,
    /// `localPortNumber` to announce (informational for the agent).
    pub local_port: Option<u16>,
    /// The region (else from the environment).
    pub region: Option<String>,
    /// Largest payload per message toward the agent (the official client: 1024).
    pub chunk_size: usize,
    /// How long the handshake may take.
    pub handshake_timeout: Duration,
    /// How long the data channel websocket may take to open.
    pub open_timeout: Duration,
    /// When a silent link is declared dead (and the session resumed on a new websocket).
    pub liveness: LivenessConfig,
    /// How long a lost link may take to resume (ResumeSession and a new websocket, retried
    /// with backoff) before the session is given up.
    pub resume_for: Duration,
}

impl TunnelConfig {
    /// Forward `host:port` through `target`.
    pub fn new(target: impl Into<String>, host: impl Into<String>, port: u16) -> TunnelConfig {
        TunnelConfig {
            target: target.into(),
            host: host.into(),
            port,
            local_port: None,
            region: None,
            chunk_size: 1024,
            handshake_timeout: Duration::from_secs(30),
            open_timeout: Duration::from_secs(20),
            liveness: LivenessConfig::default(),
            resume_for: Duration::from_secs(180),
        }
    }
}

/// An open session. Dropping it ends the session too (as `close` does, without waiting).
#[derive(Debug)]
pub struct Tunnel {
    session_id: String,
    session: PortSession,
    commands: mpsc::Sender<Command>,
    driver: Option<JoinHandle<()>>,
    stats: Arc<Stats>,
    target: String,
}

impl Tunnel {
    /// StartSession, websocket, handshake; returns when the tunnel can carry connections.
    /// A session that fails to come up is terminated, never left open.
    pub async fn open(config: TunnelConfig) -> Result<Tunnel, Error> {
        let ssm = control::client(config.region.as_deref()).await?;
        Tunnel::open_with(config, ssm).await
    }

    /// `open` with a client of your own.
    pub async fn open_with(
        config: TunnelConfig,
        ssm: aws_sdk_ssm::Client,
    ) -> Result<Tunnel, Error> {
        let grant = control::start(
            &ssm,
            &config.target,
            &config.host,
            config.port,
            config.local_port,
        )
        .await?;
        let session_id = grant.session_id.clone();
        tracing::info!(session = %session_id, target = %config.target, "SSM session started");
        let client_id = uuid::Uuid::new_v4().to_string();
        let link = match websocket::open(
            &grant.stream_url,
            &grant.token,
            &client_id,
            handshake::CLIENT_VERSION,
            config.open_timeout,
        )
        .await
        {
            Ok(link) => link,
            Err(error) => {
                let _ = control::terminate(&ssm, &session_id).await;
                return Err(error);
            }
        };
        let (commands, receiver) = mpsc::channel(64);
        let (ready_tx, ready_rx) = oneshot::channel();
        let stats = Arc::new(Stats::default());
        let driver = Driver {
            ssm: ssm.clone(),
            grant,
            client_id,
            link,
            liveness: config.liveness,
            resume_for: config.resume_for,
            open_deadline: config.open_timeout,
            commands: receiver,
            ready: Some(ready_tx),
            chunk_size: config.chunk_size,
            target: Arc::from(format!("{}:{}", config.host, config.port)),
            stats: stats.clone(),
            pending_session: None,
        };
        let task = tokio::spawn(driver.run());
        let ready = tokio::time::timeout(config.handshake_timeout, ready_rx).await;
        let session = match ready {
            Ok(Ok(Ok(session))) => session,
            Ok(Ok(Err(error))) => {
                let _ = control::terminate(&ssm, &session_id).await;
                return Err(error);
            }
            Ok(Err(_)) => {
                let _ = control::terminate(&ssm, &session_id).await;
                return Err(Error::Channel(
                    "the session driver stopped during the handshake".into(),
                ));
            }
            Err(_) => {
                task.abort();
                let _ = control::terminate(&ssm, &session_id).await;
                return Err(Error::TimedOut {
                    waiting_for: "the SSM agent (its handshake)".into(),
                    after: config.handshake_timeout,
                });
            }
        };
        tracing::info!(session = %session_id, mode = ?session.mode, agent = %session.agent_version, "SSM tunnel ready");
        Ok(Tunnel {
            session_id,
            session,
            commands,
            driver: Some(task),
            stats,
            target: config.target,
        })
    }

    /// The session id.
    pub fn session_id(&self) -> &str {
        &self.session_id
    }

    /// How streams are carried (mux, or one at a time).
    pub fn mode(&self) -> Mode {
        self.session.mode
    }

    /// What the agent announced.
    pub fn session(&self) -> &PortSession {
        &self.session
    }

    /// Websocket reconnects so far.
    pub fn reconnects(&self) -> u64 {
        self.stats
            .reconnects
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why the session ended, if it has.
    pub fn ended(&self) -> Option<String> {
        self.stats
            .ended
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Waits until the session ends by itself (idle timeout, terminated elsewhere, lost);
    /// returns why.
    pub async fn closed(&self) -> String {
        loop {
            let notified = self.stats.ended_notify.notified();
            if let Some(reason) = self.ended() {
                return reason;
            }
            notified.await;
        }
    }

    fn gone(&self) -> Error {
        Error::SessionClosed(
            self.ended()
                .unwrap_or_else(|| format!("the session {} is no longer running", self.session_id)),
        )
    }

    /// A new connection to the remote host through the tunnel. In basic mode it waits for
    /// the previous connection to end.
    pub async fn connect(&self) -> Result<TunnelStream, Error> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Open(reply))
            .await
            .map_err(|_| self.gone())?;
        answer.await.map_err(|_| self.gone())?
    }

    /// Forwards every connection accepted on `listener` until the session ends.
    pub async fn serve(&self, listener: TcpListener) -> Result<(), Error> {
        loop {
            let (mut local, peer) = listener.accept().await.map_err(|e| Error::Io {
                action: "accept".into(),
                source: e,
            })?;
            local.set_nodelay(true).ok();
            let mut remote = self.connect().await?;
            tracing::debug!(%peer, "forwarding a connection");
            tokio::spawn(async move {
                if let Err(error) = tokio::io::copy_bidirectional(&mut local, &mut remote).await {
                    tracing::debug!(%peer, %error, "forwarded connection ended");
                }
            });
        }
    }

    /// Ends the session (Flag TerminateSession and the TerminateSession API) while others
    /// may still hold the tunnel; their streams end.
    pub async fn terminate(&self) {
        let (reply, done) = oneshot::channel();
        if self.commands.send(Command::Close(reply)).await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(10), done).await;
        }
    }

    /// Ends the session: Flag TerminateSession and the TerminateSession API.
    pub async fn close(mut self) -> Result<(), Error> {
        self.terminate().await;
        if let Some(driver) = self.driver.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), driver).await;
        }
        tracing::info!(session = %self.session_id, target = %self.target, "SSM session closed");
        Ok(())
    }
}
