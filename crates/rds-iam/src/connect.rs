//! Connecting to RDS: a stream from a `Dialer`, TLS verified against the endpoint name, an
//! IAM token as the password, and patience while an Aurora Serverless cluster resumes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::message::{backend, frontend};
use rustls::ClientConfig;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use crate::cache::TokenCache;
use crate::dialer::{BoxStream, Dialer};
use crate::error::Error;
use crate::tls;
use crate::token::{AuthToken, TokenRequest};

/// Where to log in and how.
#[derive(Clone, Debug)]
pub struct RdsTarget {
    /// Endpoint, port, IAM user and region: what the token and certificate are for.
    pub endpoint: TokenRequest,
    /// The database to connect to.
    pub database: String,
    /// TLS configuration (see `tls::client_config`).
    pub tls: Arc<ClientConfig>,
    /// How long to wait for a resuming (or unreachable) database. Default 60 s.
    pub wake_deadline: Duration,
}

/// Progress while waiting for the database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waiting {
    /// Time spent so far.
    pub waited: Duration,
    /// The last failure, e.g. `FATAL 28000: no pg_hba.conf entry …`.
    pub reason: String,
}

impl std::fmt::Display for Waiting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "waiting for the database to resume… {}s ({})",
            self.waited.as_secs(),
            self.reason
        )
    }
}

/// Whether a failure is one a resuming Aurora cluster (or a tunnel coming up) produces:
/// `57P03 cannot connect now`, `28000 no pg_hba.conf entry` (Aurora's answer while it
/// resumes), or a refused, reset or cut connection.
pub fn is_transient(error: &Error) -> bool {
    let resuming = |code: &SqlState, message: &str| {
        *code == SqlState::CANNOT_CONNECT_NOW
            || (*code == SqlState::INVALID_AUTHORIZATION_SPECIFICATION
                && message.contains("no pg_hba.conf entry"))
    };
    match error {
        Error::Io { error, .. } => io_transient(error),
        Error::Refused { code, message, .. } => resuming(code, message),
        Error::Postgres { error, .. } => match error.as_db_error() {
            Some(db) => resuming(db.code(), db.message()),
            // No server answer: transient unless TLS itself rejected the server.
            None => crate::error::rustls_in_chain(error).is_none(),
        },
        _ => false,
    }
}

fn io_transient(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    if crate::error::rustls_in_chain(error).is_some() {
        return false;
    }
    matches!(
        error.kind(),
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | TimedOut
            | UnexpectedEof
            | BrokenPipe
            | NotConnected
    )
}

/// Whether nothing listened where the stream was dialed (through a tunnel: the jumphost's
/// dial was refused, which is also how a name the jumphost cannot resolve ends).
fn dial_refused(error: &Error) -> bool {
    crate::error::chain(error).any(|e| {
        e.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
    })
}

/// Whether `host` surely does not resolve: RDS endpoints are public DNS names (resolving to
/// private addresses), so one that does not resolve here is misspelt. A lookup that does not
/// answer within 2 s proves nothing.
async fn does_not_resolve(host: &str, port: u16) -> bool {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return false;
    }
    matches!(
        tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::lookup_host((host, port))
        )
        .await,
        Ok(Err(_))
    )
}

/// Retries `attempt` while it fails transiently, until the target's wake deadline,
/// reporting once a second. A refused connection to an endpoint whose name does not resolve
/// is an error at once.
pub(crate) async fn with_wake<T, F, Fut>(
    target: &RdsTarget,
    on_wait: &(dyn Fn(Waiting) + Send + Sync),
    mut attempt: F,
) -> Result<T, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let (deadline, host, port) = (
        target.wake_deadline,
        target.endpoint.host.as_str(),
        target.endpoint.port,
    );
    let started = Instant::now();
    let mut delay = Duration::from_millis(100);
    let mut last_report = started;
    let mut name_checked = false;
    loop {
        let error = match attempt().await {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        if !is_transient(&error) {
            return Err(error);
        }
        if !name_checked && dial_refused(&error) {
            name_checked = true;
            if does_not_resolve(host, port).await {
                return Err(Error::UnknownHost {
                    host: host.to_owned(),
                    port,
                });
            }
        }
        let waited = started.elapsed();
        if waited + delay > deadline {
            return Err(Error::WakeTimeout {
                waited,
                last: error.to_string(),
            });
        }
        if last_report.elapsed() >= Duration::from_secs(1) || waited < delay {
            last_report = Instant::now();
            let waiting = Waiting {
                waited,
                reason: error.to_string(),
            };
            tracing::info!("{waiting}");
            on_wait(waiting);
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Runs `login` with the cached token; if the server refuses that token (expired early,
/// revoked), forgets it and tries once more with a fresh one.
async fn with_fresh_token_on_refusal<T, F, Fut>(
    target: &RdsTarget,
    tokens: &TokenCache,
    mut login: F,
) -> Result<T, Error>
where
    F: FnMut(AuthToken) -> Fut,
    Fut: std::future::Future<Output = Result<T, Error>>,
{
    let token = tokens.token(&target.endpoint).await?;
    match login(token.clone()).await {
        Err(error) if error.is_token_refused() => {
            tokens.refused(&target.endpoint, &token).await;
            login(tokens.token(&target.endpoint).await?).await
        }
        other => other,
    }
}

/// A tokio-postgres client logged in with an IAM token over verified TLS, waiting out a
/// resuming cluster. `options` are startup options such as `-csearch_path=…`.
pub async fn connect(
    target: &RdsTarget,
    options: Option<&str>,
    dialer: &dyn Dialer,
    tokens: &TokenCache,
    on_wait: &(dyn Fn(Waiting) + Send + Sync),
) -> Result<Client, Error> {
    with_wake(target, on_wait, || {
        with_fresh_token_on_refusal(target, tokens, |token| {
            login(target, options, dialer, token)
        })
    })
    .await
}

async fn login(
    target: &RdsTarget,
    options: Option<&str>,
    dialer: &dyn Dialer,
    token: AuthToken,
) -> Result<Client, Error> {
    let stream = dialer
        .dial()
        .await
        .map_err(|e| Error::io("failed to open a stream to the database", e))?;
    let mut config = tokio_postgres::Config::new();
    config
        .host(&target.endpoint.host)
        .port(target.endpoint.port)
        .user(&target.endpoint.user)
        .dbname(&target.database)
        .password(token.expose())
        .ssl_mode(tokio_postgres::config::SslMode::Require);
    if let Some(options) = options {
        config.options(options);
    }
    let mut make = tokio_postgres_rustls::MakeRustlsConnect::new((*target.tls).clone());
    let tls = tokio_postgres::tls::MakeTlsConnect::<BoxStream>::make_tls_connect(
        &mut make,
        &target.endpoint.host,
    )
    .map_err(|e| Error::tls_caused(format!("failed to set up TLS: {e}"), e))?;
    let (client, connection) =
        config
            .connect_raw(stream, tls)
            .await
            .map_err(|e| Error::Postgres {
                action: format!(
                    "failed to log in to {} as {}",
                    target.endpoint.host, target.endpoint.user
                ),
                error: e,
            })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(error = %error, "RDS connection ended");
        }
    });
    Ok(client)
}

/// A raw, authenticated upstream connection for the proxy: TLS verified, StartupMessage
/// sent with `params` (user and database are the target's), the IAM token given and
/// accepted. Returns the stream at rest and the server's greeting, AuthenticationOk through
/// the first ReadyForQuery (ParameterStatus…, BackendKeyData), for the proxy's clients.
pub(crate) async fn open_raw(
    target: &RdsTarget,
    params: &[(String, String)],
    dialer: &dyn Dialer,
    tokens: &TokenCache,
    on_wait: &(dyn Fn(Waiting) + Send + Sync),
) -> Result<(TlsStream<BoxStream>, BytesMut), Error> {
    with_wake(target, on_wait, || {
        with_fresh_token_on_refusal(target, tokens, |token| {
            login_raw(target, params, dialer, token)
        })
    })
    .await
}

async fn login_raw(
    target: &RdsTarget,
    params: &[(String, String)],
    dialer: &dyn Dialer,
    token: AuthToken,
) -> Result<(TlsStream<BoxStream>, BytesMut), Error> {
    let mut stream = tls_stream(target, dialer).await?;
    let mut startup = vec![
        ("user".to_owned(), target.endpoint.user.clone()),
        ("database".to_owned(), target.database.clone()),
    ];
    startup.extend(
        params
            .iter()
            .filter(|(k, _)| k != "user" && k != "database")
            .cloned(),
    );
    let io = |e| Error::io("failed to talk to the database", e);
    let mut out = BytesMut::new();
    frontend::startup_message(
        startup.iter().map(|(k, v)| (k.as_str(), v.as_str())),
        &mut out,
    )
    .map_err(io)?;
    stream.write_all(&out).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let closed = || Error::Protocol("the server closed the connection during the login".into());
    let mut buffer = BytesMut::new();
    let frame = next_frame(&mut stream, &mut buffer)
        .await?
        .ok_or_else(closed)?;
    match parse(frame)? {
        backend::Message::AuthenticationCleartextPassword => {}
        backend::Message::ErrorResponse(body) => return Err(refused(&body)),
        other => {
            return Err(Error::Protocol(format!(
                "the server answered the login with {} instead of asking for a password: does `{}` have the rds_iam role?",
                describe(&other),
                target.endpoint.user
            )));
        }
    }
    out.clear();
    frontend::password_message(token.expose().as_bytes(), &mut out).map_err(io)?;
    stream.write_all(&out).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    let mut greeting = next_frame(&mut stream, &mut buffer)
        .await?
        .ok_or_else(closed)?;
    match parse(greeting.clone())? {
        backend::Message::AuthenticationOk => {}
        backend::Message::ErrorResponse(body) => return Err(refused(&body)),
        other => {
            return Err(Error::Protocol(format!(
                "the server answered the IAM token with {} instead of AuthenticationOk",
                describe(&other)
            )));
        }
    }
    while let Some(frame) = next_frame(&mut stream, &mut buffer).await? {
        match frame[0] {
            b'E' => return Err(error_of(frame)),
            b'Z' => {
                greeting.extend_from_slice(&frame);
                return Ok((stream, greeting));
            }
            _ => greeting.extend_from_slice(&frame),
        }
    }
    Err(closed())
}

/// Frames larger than this are a broken peer (Postgres caps a message at 1 GB).
const MAX_FRAME: usize = 1 << 30;

/// The length of the complete frame (tag, length, body) at the front of `buffer`, if it is
/// all there.
pub(crate) fn frame_length(buffer: &[u8]) -> Result<Option<usize>, Error> {
    pg_wire::frame::length(buffer, MAX_FRAME).map_err(|e| Error::Protocol(e.to_string()))
}

/// The next whole frame from the server, reading into `buffer` as needed; `None` when the
/// server closed the connection.
pub(crate) async fn next_frame<S: AsyncRead + Unpin>(
    stream: &mut S,
    buffer: &mut BytesMut,
) -> Result<Option<BytesMut>, Error> {
    loop {
        if let Some(length) = frame_length(buffer)? {
            return Ok(Some(buffer.split_to(length)));
        }
        let read = stream
            .read_buf(buffer)
            .await
            .map_err(|e| Error::io("failed to read from the server", e))?;
        if read == 0 {
            return Ok(None);
        }
    }
}

/// A frame that should be an ErrorResponse, as `Error::Refused`.
pub(crate) fn error_of(frame: BytesMut) -> Error {
    match parse(frame) {
        Ok(backend::Message::ErrorResponse(body)) => refused(&body),
        Ok(_) => Error::Protocol("expected an ErrorResponse".into()),
        Err(error) => error,
    }
}

/// A whole frame parsed by postgres-protocol.
pub(crate) fn parse(mut frame: BytesMut) -> Result<backend::Message, Error> {
    backend::Message::parse(&mut frame)
        .map_err(|e| Error::Protocol(format!("a malformed message from the server: {e}")))?
        .ok_or_else(|| Error::Protocol("a truncated message from the server".into()))
}

/// A server's ErrorResponse as `Error::Refused`.
fn refused(body: &backend::ErrorResponseBody) -> Error {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    let mut fields = body.fields();
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'V' => severity = value,
            b'S' if severity.is_empty() => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    Error::Refused {
        severity,
        code: SqlState::from_code(&code),
        message,
    }
}

/// What an unexpected server message was, for an error.
fn describe(message: &backend::Message) -> &'static str {
    match message {
        backend::Message::AuthenticationOk => "AuthenticationOk",
        backend::Message::AuthenticationMd5Password(_) => "an MD5 password request",
        backend::Message::AuthenticationSasl(_) => "a SASL (SCRAM) request",
        backend::Message::AuthenticationGss | backend::Message::AuthenticationSspi => {
            "a GSSAPI/SSPI request"
        }
        _ => "an unexpected message",
    }
}

/// A TLS stream to the database: SSLRequest, then a handshake verified against the endpoint.
pub(crate) async fn tls_stream(
    target: &RdsTarget,
    dialer: &dyn Dialer,
) -> Result<TlsStream<BoxStream>, Error> {
    let io = |e| Error::io("failed to start TLS with the database", e);
    let mut stream = dialer
        .dial()
        .await
        .map_err(|e| Error::io("failed to open a stream to the database", e))?;
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    stream.write_all(&request).await.map_err(io)?;
    stream.flush().await.map_err(io)?;
    match stream.read_u8().await.map_err(io)? {
        b'S' => {}
        b'N' => {
            return Err(Error::tls(
                "the server does not offer TLS; RDS IAM authentication requires it",
            ));
        }
        other => {
            return Err(Error::Protocol(format!(
                "unexpected answer {other:#x} to SSLRequest"
            )));
        }
    }
    let name = tls::server_name(&target.endpoint.host)?;
    TlsConnector::from(target.tls.clone()).connect(name, stream).await.map_err(|e| {
        if e.get_ref().is_some_and(|inner| inner.is::<rustls::Error>()) {
            Error::tls_caused(
                format!(
                    "the server's certificate is not valid for {}: {e} (is the CA bundle right? is the host the cluster endpoint?)",
                    target.endpoint.host
                ),
                e,
            )
        } else {
            io(e)
        }
    })
}
