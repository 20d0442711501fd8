//! The local auth proxy: a plain Postgres endpoint on 127.0.0.1 for any client (psql, sqlx,
//! the app), guarded by a per-run random password (SCRAM-SHA-256). Upstream it keeps
//! sessions already through verified TLS and an IAM login, and lends one to each client
//! (see `sessions`): a client's connection costs no upstream round trip, and a session
//! outlives any token (only the login needs one). Its sessions count against a [`Budget`]
//! shared with every proxy on the same cluster; a client beyond it waits for a session
//! instead of meeting `53300`.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::budget::Budget;
use crate::cache::TokenCache;
use crate::connect::{RdsTarget, tls_stream};
use crate::dialer::Dialer;
use crate::error::Error;
use crate::leases::{self, Leases};
use crate::scram::{self, ScramVerifier};
use crate::sessions::{CancelKey, Sessions};
use crate::wire::{self, Startup};
use tokio_postgres::error::SqlState;

/// The proxy's password. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct ProxyPassword(String);

impl ProxyPassword {
    /// 32 random hex digits.
    pub fn random() -> ProxyPassword {
        let mut bytes = [0; 16];
        rand::rng().fill_bytes(&mut bytes);
        ProxyPassword(hex::encode(bytes))
    }

    /// A given password (for a proxy whose password is stored elsewhere).
    pub fn new(password: impl Into<String>) -> ProxyPassword {
        ProxyPassword(password.into())
    }

    /// The password, for handing to a client. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ProxyPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ProxyPassword(***)")
    }
}

/// A running proxy. Dropping it stops accepting new clients; `shutdown` also ends the
/// sessions in flight.
#[derive(Debug)]
pub struct Proxy {
    addr: SocketAddr,
    user: String,
    database: String,
    password: ProxyPassword,
    accept: JoinHandle<()>,
    sweep: JoinHandle<()>,
    activity: Arc<Activity>,
    sessions: Arc<Sessions>,
    /// What opening a session ahead of demand needs.
    ahead: (Arc<RdsTarget>, Arc<dyn Dialer>, Arc<TokenCache>),
}

/// Client sessions in flight and when the last one ended.
#[derive(Debug)]
struct Activity {
    sessions: AtomicUsize,
    last_end: Mutex<Instant>,
}

/// Counts a session for as long as it lives.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.sessions.fetch_sub(1, Ordering::Relaxed);
        *self.0.last_end.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }
}

impl Proxy {
    /// Where clients connect.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The password clients must give.
    pub fn password(&self) -> &ProxyPassword {
        &self.password
    }

    /// A URL for clients, with the password. Never log it.
    pub fn url(&self) -> String {
        format!(
            "postgres://{}:{}@{}:{}/{}",
            crate::token::encode_query_value(&self.user),
            self.password.expose(),
            self.addr.ip(),
            self.addr.port(),
            self.database
        )
    }

    /// Opens up to `sessions` upstream sessions to the proxy's database ahead of demand,
    /// within the budget, in the background: for a test run that knows how many its tests
    /// will hold at once, so that its first tests do not each wait for a login through the
    /// link (logins stay bounded as for clients; a session the budget has no slot for is
    /// not opened).
    pub fn open_ahead(&self, sessions: usize) {
        for _ in 0..sessions {
            open_spare_in_background(
                self.ahead.0.clone(),
                self.ahead.1.clone(),
                self.ahead.2.clone(),
                self.sessions.clone(),
                self.database.clone(),
            );
        }
    }

    /// Client sessions open now.
    pub fn active_sessions(&self) -> usize {
        self.activity.sessions.load(Ordering::Relaxed)
    }

    /// How long no client has been connected (zero while one is).
    pub fn idle_for(&self) -> Duration {
        if self.active_sessions() > 0 {
            return Duration::ZERO;
        }
        self.activity
            .last_end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    /// Upstream logins so far (sessions opened; each is lent to many clients).
    pub fn upstream_logins(&self) -> u64 {
        self.sessions.logins.load(Ordering::Relaxed)
    }

    /// Clients served by an idle upstream session, opened before they came (by an earlier
    /// client, or ahead of demand): no upstream round trip on their path.
    pub fn clients_from_pool(&self) -> u64 {
        self.sessions.from_pool.load(Ordering::Relaxed)
    }

    /// Upstream sessions idle now, ready for the next client.
    pub fn idle_sessions(&self) -> usize {
        self.sessions.idle_now()
    }

    /// Upstream sessions closed instead of reused (a client left mid-query, a failed reset).
    pub fn discarded_sessions(&self) -> u64 {
        self.sessions.discarded.load(Ordering::Relaxed)
    }

    /// Clients that had to wait for a session because the budget was all in use.
    pub fn clients_waited(&self) -> u64 {
        self.sessions.waited.load(Ordering::Relaxed)
    }

    /// Clients waiting for a session now.
    pub fn waiting_clients(&self) -> usize {
        self.sessions.waiting_now()
    }

    /// Upstream sessions open now, idle or lent (never more than the budget).
    pub fn open_sessions(&self) -> usize {
        self.sessions.open_now()
    }

    /// Stops accepting clients.
    pub fn shutdown(self) {
        self.accept.abort();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.sweep.abort();
    }
}

/// How long a client has to send its startup message and authenticate, as Postgres's own
/// `authentication_timeout` (60 s there): a connection that does not is closed, and until it
/// has authenticated it does not count as a session (nor keep the proxy from its idle stop).
pub const AUTHENTICATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts a proxy on `listener` (bind 127.0.0.1:0 for an ephemeral port), whose upstream
/// sessions stay within `budget` together with every other proxy on it.
pub fn serve(
    listener: TcpListener,
    target: RdsTarget,
    password: ProxyPassword,
    dialer: Arc<dyn Dialer>,
    tokens: Arc<TokenCache>,
    budget: Budget,
) -> Result<Proxy, Error> {
    let addr = listener
        .local_addr()
        .map_err(|e| Error::io("failed to read the proxy's address", e))?;
    let verifier = Arc::new(ScramVerifier::new(password.expose()));
    let target = Arc::new(target);
    let (user, database) = (target.endpoint.user.clone(), target.database.clone());
    let activity = Arc::new(Activity {
        sessions: AtomicUsize::new(0),
        last_end: Mutex::new(Instant::now()),
    });
    let counted = activity.clone();
    let sessions = Arc::new(Sessions::new(budget));
    let pool = sessions.clone();
    let leases = Leases::new(budget.sessions, budget.wait);
    // Idle sessions give their slots up when another proxy waits for one.
    let sweep = tokio::spawn({
        let sessions = Arc::downgrade(&sessions);
        async move {
            let mut ticks = tokio::time::interval(crate::sessions::POLL * 4);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Some(sessions) = sessions.upgrade() else {
                    return;
                };
                sessions.yield_to_waiting_proxies().await;
            }
        }
    });
    let ahead = (target.clone(), dialer.clone(), tokens.clone());
    let accept = tokio::spawn(async move {
        loop {
            let (client, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "proxy: accept failed");
                    continue;
                }
            };
            let (target, verifier, dialer, tokens) = (
                target.clone(),
                verifier.clone(),
                dialer.clone(),
                tokens.clone(),
            );
            let (counted, pool, leases) = (counted.clone(), pool.clone(), leases.clone());
            tokio::spawn(async move {
                let upstream = UpstreamSide {
                    target,
                    dialer,
                    tokens,
                    sessions: pool,
                    leases,
                };
                let result = session(client, &upstream, &verifier, &counted).await;
                if let Err(error) = result {
                    tracing::info!(%peer, %error, "proxy: session ended with an error");
                }
            });
        }
    });
    tracing::info!(%addr, endpoint = %user, "local auth proxy listening");
    Ok(Proxy {
        addr,
        user,
        database,
        password,
        accept,
        sweep,
        activity,
        sessions,
        ahead,
    })
}

/// Opens a spare session to `database` in the background and keeps it idle, if the budget
/// has room.
fn open_spare_in_background(
    target: Arc<RdsTarget>,
    dialer: Arc<dyn Dialer>,
    tokens: Arc<TokenCache>,
    pool: Arc<Sessions>,
    database: String,
) {
    tokio::spawn(async move {
        match pool
            .open_spare(&target, &database, dialer.as_ref(), &tokens)
            .await
        {
            Ok(Some(session)) => pool.give_back(session),
            Ok(None) => {}
            Err(error) => {
                tracing::info!(%error, "proxy: could not open a spare upstream session")
            }
        }
    });
}

/// Everything a client's session needs of the upstream side.
struct UpstreamSide {
    target: Arc<RdsTarget>,
    dialer: Arc<dyn Dialer>,
    tokens: Arc<TokenCache>,
    sessions: Arc<Sessions>,
    leases: Arc<Leases>,
}

async fn refuse(client: &mut TcpStream, code: SqlState, message: &str) -> Result<(), Error> {
    client
        .write_all(&wire::error_response("FATAL", code.code(), message))
        .await
        .map_err(|e| Error::io("failed to answer the client", e))
}

async fn session(
    mut client: TcpStream,
    upstream: &UpstreamSide,
    verifier: &ScramVerifier,
    activity: &Arc<Activity>,
) -> Result<(), Error> {
    client.set_nodelay(true).ok();
    let login = tokio::time::timeout(
        AUTHENTICATION_TIMEOUT,
        authenticate(
            &mut client,
            &upstream.target,
            verifier,
            upstream.dialer.as_ref(),
            &upstream.sessions,
        ),
    )
    .await;
    let params = match login {
        Ok(Ok(Some(params))) => params,
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(error)) => return Err(error),
        Err(_) => {
            return refuse(
                &mut client,
                SqlState::PROTOCOL_VIOLATION,
                "authentication timed out (no login within 10 s)",
            )
            .await;
        }
    };
    activity.sessions.fetch_add(1, Ordering::Relaxed);
    let _in_flight = InFlight(activity.clone());
    lend_and_relay(client, upstream, params).await
}

/// The client's startup and SCRAM login; `None` when it was answered already (refused,
/// or a cancel request forwarded).
async fn authenticate(
    client: &mut TcpStream,
    target: &RdsTarget,
    verifier: &ScramVerifier,
    dialer: &dyn Dialer,
    sessions: &Sessions,
) -> Result<Option<Vec<(String, String)>>, Error> {
    let mut client = client;
    let protocol = |e: wire::WireError| Error::Protocol(e.to_string());
    let params = loop {
        match wire::read_startup(&mut client).await.map_err(protocol)? {
            // The hop to the proxy is loopback; TLS is for the hop to RDS.
            Startup::Ssl | Startup::GssEnc => client
                .write_all(b"N")
                .await
                .map_err(|e| Error::io("failed to answer the client", e))?,
            Startup::Cancel {
                process_id,
                secret_key,
            } => {
                return forward_cancel(target, dialer, sessions, (process_id, secret_key))
                    .await
                    .map(|()| None);
            }
            Startup::Startup(params) => break params,
        }
    };
    let user = params
        .iter()
        .find(|(k, _)| k == "user")
        .map(|(_, v)| v.as_str())
        .unwrap_or("");
    if user != target.endpoint.user {
        let message = format!(
            "this proxy logs in as \"{}\"; connect as that user (not \"{user}\")",
            target.endpoint.user
        );
        return refuse(
            client,
            SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
            &message,
        )
        .await
        .map(|()| None);
    }
    if !scram::authenticate(&mut client, verifier).await? {
        return refuse(
            client,
            SqlState::INVALID_PASSWORD,
            &format!("password authentication failed for user \"{user}\""),
        )
        .await
        .map(|()| None);
    }
    Ok(Some(params))
}

/// After the login: an upstream session (an idle one, else a new one), and the relay.
async fn lend_and_relay(
    mut client: TcpStream,
    upstream: &UpstreamSide,
    params: Vec<(String, String)>,
) -> Result<(), Error> {
    // The client's database replaces the target's.
    let database = params
        .iter()
        .find(|(k, _)| k == "database")
        .map_or_else(|| upstream.target.database.clone(), |(_, v)| v.clone());
    let request = leases::request_of(&params);
    let sessions = &upstream.sessions;
    let leased = async {
        let lease = upstream.leases.acquire(request, sessions).await?;
        let session = sessions
            .lease(
                &upstream.target,
                &database,
                upstream.dialer.as_ref(),
                &upstream.tokens,
            )
            .await?;
        Ok::<_, Error>((lease, session))
    }
    .await;
    let (_lease, session) = match leased {
        Ok(leased) => leased,
        Err(error) => {
            let (code, message) = match &error {
                Error::BudgetExhausted { .. } | Error::OverBudget { .. } => {
                    (SqlState::TOO_MANY_CONNECTIONS, error.to_string())
                }
                _ => (
                    SqlState::CONNECTION_FAILURE,
                    format!(
                        "the proxy could not log in to {}: {error}",
                        upstream.target.endpoint.host
                    ),
                ),
            };
            refuse(&mut client, code, &message).await?;
            return Err(error);
        }
    };
    // Ahead of demand: when this was the last idle session, open the next one meanwhile,
    // if the budget has room.
    if sessions.none_idle(&database) {
        open_spare_in_background(
            upstream.target.clone(),
            upstream.dialer.clone(),
            upstream.tokens.clone(),
            sessions.clone(),
            database.clone(),
        );
    }
    sessions.serve_client(&mut client, session, &params).await
}

/// Forwards a cancel request with a key the proxy showed a client that still holds its
/// session, rewritten to the backend's own key; any other key cancels nothing (as Postgres
/// ignores an unknown key).
async fn forward_cancel(
    target: &RdsTarget,
    dialer: &dyn Dialer,
    sessions: &Sessions,
    shown: CancelKey,
) -> Result<(), Error> {
    let Some((process_id, secret_key)) = sessions.backend_key(shown) else {
        tracing::debug!("proxy: a cancel request with a key no client holds now; ignored");
        return Ok(());
    };
    let mut forwarded = bytes::BytesMut::new();
    postgres_protocol::message::frontend::cancel_request(process_id, secret_key, &mut forwarded);
    let mut upstream = tls_stream(target, dialer).await?;
    upstream
        .write_all(&forwarded)
        .await
        .map_err(|e| Error::io("failed to forward a cancel request", e))?;
    upstream
        .flush()
        .await
        .map_err(|e| Error::io("failed to forward a cancel request", e))?;
    upstream.shutdown().await.ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::StaticCredentials;
    use crate::{TcpDialer, TlsPolicy, TokenRequest};
    use tokio::io::AsyncReadExt;

    /// A proxy whose upstream is never dialed (no client gets that far).
    async fn proxy() -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let target = RdsTarget {
            endpoint: TokenRequest::new(
                "db.cluster-x.eu-west-2.rds.amazonaws.com",
                5432,
                "app_iam",
                Some("eu-west-2"),
            )
            .unwrap(),
            database: "app".into(),
            tls: crate::tls::client_config(&TlsPolicy::InsecureAcceptAnyCertificate).unwrap(),
            wake_deadline: Duration::from_secs(1),
        };
        let credentials =
            aws_credential_types::Credentials::new("AKID", "secret", None, None, "test");
        serve(
            listener,
            target,
            ProxyPassword::random(),
            Arc::new(TcpDialer::new("127.0.0.1:9")),
            Arc::new(TokenCache::new(Arc::new(StaticCredentials(credentials)))),
            Budget::default(),
        )
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn clients_that_never_log_in_are_closed_and_never_count_as_sessions() {
        let proxy = proxy().await;
        let mut idle = Vec::new();
        for _ in 0..50 {
            idle.push(TcpStream::connect(proxy.local_addr()).await.unwrap());
        }
        // Connected, but not logged in: not sessions, so the idle stop still counts.
        tokio::task::yield_now().await;
        assert_eq!(proxy.active_sessions(), 0);
        // The paused clock runs on while every task waits: each is closed after the timeout.
        for mut client in idle {
            let mut answer = Vec::new();
            client.read_to_end(&mut answer).await.unwrap();
            let text = String::from_utf8_lossy(&answer);
            assert!(text.contains("authentication timed out"), "{text:?}");
        }
        assert_eq!(proxy.active_sessions(), 0);
    }
}
