//! The fake SSM service: configuration, sessions, the HTTP listener.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use super::faults::Faults;
use super::state::State;
use crate::credentials::CredentialStore;

/// How the fake SSM service behaves.
#[derive(Clone, Debug)]
pub struct SsmConfig {
    /// Instance ids whose agent is online.
    pub online_targets: Vec<String>,
    /// The agent version announced in the handshake ("3.3.987.0": mux; "3.0.196.0": basic).
    pub agent_version: String,
    /// Where `host` of a session goes: e.g. the RDS endpoint name → the fake RDS front.
    /// Hosts not in the map are dialed as given.
    pub host_map: HashMap<String, SocketAddr>,
    /// Outbound payloads are split into chunks of at most this many bytes (the agent: 1024).
    pub chunk_size: usize,
    /// Sleep about 1 ms after each outbound message, as the agent does.
    pub pacing: bool,
    /// Sessions with no data for this long end with `channel_closed` (AWS: 20 min).
    pub idle_timeout: Duration,
    /// Faults applied to every new session.
    pub faults: Faults,
    /// StartSession answers this error (`TargetNotConnected`, `AccessDeniedException`, …).
    pub refuse_start: Option<String>,
    /// ResumeSession hands out a new StreamUrl (as the service may).
    pub new_stream_url_on_resume: bool,
    /// The CustomerMessage of HandshakeComplete (empty: none, as usual).
    pub customer_message: String,
    /// Where it listens.
    pub listen: SocketAddr,
    /// The address its StreamUrls name, when clients reach it through something in front of
    /// it (a load balancer; in tests, a relay that plays the network). Default: `listen`'s.
    pub advertise: Option<SocketAddr>,
}

impl Default for SsmConfig {
    fn default() -> SsmConfig {
        SsmConfig {
            online_targets: vec!["i-0fake0jumphost0".into()],
            agent_version: "3.3.987.0".into(),
            host_map: HashMap::new(),
            chunk_size: 1024,
            pacing: true,
            idle_timeout: Duration::from_secs(20 * 60),
            faults: Faults::default(),
            refuse_start: None,
            new_stream_url_on_resume: true,
            customer_message: String::new(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            advertise: None,
        }
    }
}

/// What the service knows of one session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    /// The session id.
    pub id: String,
    /// The instance.
    pub target: String,
    /// `host` parameter.
    pub host: String,
    /// `portNumber` parameter.
    pub port: u16,
    /// Whether it has ended (terminated, idle, or closed by the client).
    pub ended: bool,
    /// How it ended.
    pub end_reason: Option<String>,
    /// Websockets opened for it (1 + resumes).
    pub connections: u32,
}

/// A running fake SSM service. Dropping it stops it.
pub struct SsmService {
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl Drop for SsmService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl std::fmt::Debug for SsmService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SsmService")
            .field("addr", &self.state.addr)
            .finish()
    }
}

impl SsmService {
    /// Binds and serves.
    pub async fn start(
        config: SsmConfig,
        credentials: Arc<CredentialStore>,
    ) -> anyhow::Result<SsmService> {
        let listener = TcpListener::bind(config.listen).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            config: Mutex::new(config),
            credentials,
            sessions: Mutex::new(HashMap::new()),
            start_sessions: Mutex::new(0),
            addr,
            accepted: (AtomicU64::new(0), AtomicU64::new(0)),
        });
        let router = super::api::router(state.clone());
        let counters = state.clone();
        let task = tokio::spawn(async move {
            // No Nagle: every data-channel message is small and waits for an answer; with
            // Nagle and delayed ACKs each exchange would cost tens of milliseconds.
            let listener = axum::serve::ListenerExt::tap_io(listener, move |tcp| {
                let _ = tcp.set_nodelay(true);
                counters.accepted.0.fetch_add(1, Ordering::Relaxed);
                if tcp.nodelay().unwrap_or(false) {
                    counters.accepted.1.fetch_add(1, Ordering::Relaxed);
                }
            });
            if let Err(error) = axum::serve(listener, router).await {
                tracing::error!(%error, "fake SSM: server failed");
            }
        });
        tracing::info!(%addr, "fake SSM service listening");
        Ok(SsmService { state, task })
    }

    /// The endpoint for `AWS_ENDPOINT_URL_SSM`.
    pub fn endpoint_url(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    /// Where it listens.
    pub fn local_addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// Connections accepted so far, and how many of them the kernel reports with
    /// TCP_NODELAY (read back from each socket, not assumed).
    pub fn accepted_sockets(&self) -> (u64, u64) {
        (
            self.state.accepted.0.load(Ordering::Relaxed),
            self.state.accepted.1.load(Ordering::Relaxed),
        )
    }

    /// StartSession calls answered so far (including refused ones).
    pub fn start_session_calls(&self) -> u64 {
        *self
            .state
            .start_sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Every session so far.
    pub fn sessions(&self) -> Vec<SessionRecord> {
        let sessions = self
            .state
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let mut records: Vec<_> = sessions.values().map(|s| s.record.clone()).collect();
        records.sort_by(|a, b| a.id.cmp(&b.id));
        records
    }

    /// Every session token the service has issued, by StartSession and by each
    /// ResumeSession (for tests that check no log carries one).
    pub fn issued_tokens(&self) -> Vec<String> {
        let sessions = self
            .state
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        sessions
            .values()
            .flat_map(|s| s.earlier_tokens.iter().chain([&s.token]).cloned())
            .collect()
    }

    /// Sessions not yet ended.
    pub fn open_sessions(&self) -> usize {
        self.sessions().iter().filter(|s| !s.ended).count()
    }

    /// Changes the configuration for sessions started from now on (faults, refusals, …).
    pub fn reconfigure(&self, change: impl FnOnce(&mut SsmConfig)) {
        change(&mut self.state.config.lock().unwrap_or_else(|p| p.into_inner()));
    }
}
