//! The local auth proxy: a plain Postgres endpoint on 127.0.0.1 for any client (psql, sqlx,
//! the app), guarded by a per-run random password (SCRAM-SHA-256), that logs in upstream
//! with verified TLS and a fresh IAM token for each client connection and then relays bytes.
//! A session through it can outlive any token: only the login needs one.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::RngCore;
use tokio::io::{AsyncWriteExt, copy_bidirectional};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::cache::TokenCache;
use crate::connect::{RdsTarget, open_raw, tls_stream};
use crate::dialer::Dialer;
use crate::error::Error;
use crate::scram::{self, ScramVerifier};
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
    activity: Arc<Activity>,
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

    /// Stops accepting clients.
    pub fn shutdown(self) {
        self.accept.abort();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// How long a client has to send its startup message and authenticate, as Postgres's own
/// `authentication_timeout` (60 s there): a connection that does not is closed, and until it
/// has authenticated it does not count as a session (nor keep the proxy from its idle stop).
pub const AUTHENTICATION_TIMEOUT: Duration = Duration::from_secs(10);

/// Starts a proxy on `listener` (bind 127.0.0.1:0 for an ephemeral port).
pub fn serve(
    listener: TcpListener,
    target: RdsTarget,
    password: ProxyPassword,
    dialer: Arc<dyn Dialer>,
    tokens: Arc<TokenCache>,
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
            let counted = counted.clone();
            tokio::spawn(async move {
                let result = session(
                    client,
                    &target,
                    &verifier,
                    dialer.as_ref(),
                    &tokens,
                    &counted,
                )
                .await;
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
        activity,
    })
}

async fn refuse(client: &mut TcpStream, code: SqlState, message: &str) -> Result<(), Error> {
    client
        .write_all(&wire::error_response("FATAL", code.code(), message))
        .await
        .map_err(|e| Error::io("failed to answer the client", e))
}

async fn session(
    mut client: TcpStream,
    target: &RdsTarget,
    verifier: &ScramVerifier,
    dialer: &dyn Dialer,
    tokens: &TokenCache,
    activity: &Arc<Activity>,
) -> Result<(), Error> {
    client.set_nodelay(true).ok();
    let login = tokio::time::timeout(
        AUTHENTICATION_TIMEOUT,
        authenticate(&mut client, target, verifier, dialer),
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
    relay(client, target, params, dialer, tokens).await
}

/// The client's startup and SCRAM login; `None` when it was answered already (refused,
/// or a cancel request forwarded).
async fn authenticate(
    client: &mut TcpStream,
    target: &RdsTarget,
    verifier: &ScramVerifier,
    dialer: &dyn Dialer,
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
            Startup::Cancel(packet) => {
                return forward_cancel(target, dialer, &packet).await.map(|()| None);
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

/// After the login: the upstream session, and the relay.
async fn relay(
    mut client: TcpStream,
    target: &RdsTarget,
    params: Vec<(String, String)>,
    dialer: &dyn Dialer,
    tokens: &TokenCache,
) -> Result<(), Error> {
    // The client's database replaces the target's; open_raw sends user and database first,
    // then the client's other parameters (options, application_name, …) in its order.
    let mut target = target.clone();
    if let Some((_, database)) = params.iter().find(|(k, _)| k == "database") {
        target.database = database.clone();
    }
    let (mut upstream, authentication_ok) =
        match open_raw(&target, &params, dialer, tokens, &|waiting| {
            tracing::info!("proxy: {waiting}")
        })
        .await
        {
            Ok(upstream) => upstream,
            Err(error) => {
                refuse(
                    &mut client,
                    SqlState::CONNECTION_FAILURE,
                    &format!(
                        "the proxy could not log in to {}: {error}",
                        target.endpoint.host
                    ),
                )
                .await?;
                return Err(error);
            }
        };
    client
        .write_all(&authentication_ok)
        .await
        .map_err(|e| Error::io("failed to answer the client", e))?;
    copy_bidirectional(&mut client, &mut upstream)
        .await
        .map_err(|e| Error::io("relay", e))?;
    Ok(())
}

async fn forward_cancel(
    target: &RdsTarget,
    dialer: &dyn Dialer,
    packet: &[u8],
) -> Result<(), Error> {
    let mut upstream = tls_stream(target, dialer).await?;
    upstream
        .write_all(packet)
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
