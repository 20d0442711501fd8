//! Lending a test's control session to its first sqlx connection, so that a test that gets
//! an sqlx pool starts no second backend.
//!
//! A new Postgres session costs a backend start (fork, login, catalog caches: 5–9 ms on a
//! small machine), and a test that asks for a `PgPool` would otherwise pay it twice: once
//! for the control connection that claims its schema, once for sqlx's first connection.
//! Instead, `#[pgharness::test]` (for a test that takes no `TestDb`) lends the control
//! session: sqlx connects to a Unix socket of this process, in a fresh directory only its
//! user can enter, and logs in with a password made for that one connection; behind it,
//! this module replays sqlx's startup settings on the control session (one round trip),
//! answers sqlx's login itself and then relays its messages to and from the session.
//! The pool's later connections go to the server directly.
//!
//! While the session is lent, the control connection's tokio-postgres client is held at
//! a [`Gated`] stream: its reads wait and its writes fail with an error that says why (its
//! answers would interleave with sqlx's). The session comes home when sqlx closes its
//! connection (Terminate, which is not passed on, or a closed socket) and every answer it
//! was owed has been read; a transaction it left open is rolled back. The teardown then
//! runs on it as on any control session. A session still lent when the test's `TestDb`
//! drops (a connection the test leaked) gets its parting written when it comes home.
//!
//! Nothing in this module runs unless a test asks for an sqlx connection (the `sqlx` and
//! `sqlx09` features); without them only the gate is built.
//!
//! The relay frames messages ([`take_frames`]) only to count what the server owes
//! (a ReadyForQuery per Sync, Query or FunctionCall) and to hold back Terminate.
//!
//! rds-iam's session pool (`sessions.rs`) does the same two things for the RDS proxy
//! (startup options read as the server reads them, ReadyForQuery counted): a twin of a few
//! dozen lines, kept because the crates are independent — pgharness must stay as light as
//! sqlx for a user's workspace, and rds-iam carries AWS's clients.

#![cfg_attr(not(any(feature = "sqlx", feature = "sqlx09")), allow(dead_code))]

use std::io;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BufMut, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// The port in the lending socket's name (`.s.PGSQL.<port>`): any, as long as sqlx is told.
pub(crate) const PORT: u16 = 5432;

/// What a tokio-postgres client on a lent session gets when it writes.
const LENT: &str = "pgharness lent the test's control connection to its first sqlx connection \
(`#[pgharness::test]` does so for a test that takes no `TestDb`); open a client of your own \
with `TestDb::connect()`";

/// How long a lend waits for sqlx to connect before it takes the session back.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a client of the lending socket may take to log in.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a session whose client left waits for the answers still owed to it.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// A stream that can be held while its session is lent.
pub(crate) struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
}

/// Whether the session behind a [`Gated`] stream is lent, and who waits for it to come home.
#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    /// Whether a client that wrote while the session was lent has been told.
    told: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct GateState {
    lent: bool,
    readers: Vec<Waker>,
}

impl Gate {
    fn lock(&self) -> std::sync::MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn close(&self) {
        self.lock().lent = true;
    }

    fn open(&self) {
        let readers = {
            let mut state = self.lock();
            state.lent = false;
            std::mem::take(&mut state.readers)
        };
        readers.into_iter().for_each(Waker::wake);
    }

    /// Whether the session is lent; when it is, `cx` is woken once it comes home.
    fn held(&self, cx: &mut Context<'_>) -> bool {
        let mut state = self.lock();
        if state.lent && !state.readers.iter().any(|w| w.will_wake(cx.waker())) {
            state.readers.push(cx.waker().clone());
        }
        state.lent
    }

    fn is_lent(&self) -> bool {
        self.lock().lent
    }
}

impl<S> Gated<S> {
    pub(crate) fn new(inner: S, gate: Arc<Gate>) -> Gated<S> {
        Gated { inner, gate }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.gate.held(cx) {
            return Poll::Pending;
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.gate.is_lent() {
            // tokio-postgres answers its caller "connection closed": said here too, once,
            // on stderr as well (a test may install no tracing subscriber).
            if !self
                .gate
                .told
                .swap(true, std::sync::atomic::Ordering::Relaxed)
            {
                tracing::warn!("{LENT}");
                eprintln!("pgharness: `TestDb::client()` was used while {LENT}");
            }
            return Poll::Ready(Err(io::Error::other(LENT)));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Nothing was written while lent: nothing to flush.
        if self.gate.is_lent() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // A shutdown would end the lent session for every duplicate of the socket.
        if self.gate.is_lent() {
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a control connection keeps to lend its session: a duplicate of its socket and the
/// gate of its client's stream.
pub(crate) struct Lendable {
    pub(crate) socket: OwnedFd,
    pub(crate) unix: bool,
    pub(crate) gate: Arc<Gate>,
    /// What the server reported at the control connection's login ([`REPORTED`]).
    pub(crate) reported: Vec<(String, String)>,
}

/// Where the session is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Whereabouts {
    /// With the control connection's client (never lent, or back).
    Home,
    /// With an sqlx connection.
    Lent,
    /// Gone: the server closed it or did not answer while it was lent.
    Lost,
    /// Its parting was written on it when it came home.
    Parted,
}

struct Shared {
    state: Mutex<(Whereabouts, Option<Vec<u8>>)>,
    changed: Condvar,
    /// The same change, for tasks (`Lender::home`).
    notify: tokio::sync::Notify,
    gate: Arc<Gate>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, (Whereabouts, Option<Vec<u8>>)> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set(&self, whereabouts: Whereabouts) {
        self.lock().0 = whereabouts;
        self.changed.notify_all();
        self.notify.notify_waiters();
    }
}

/// A control session that can be lent once.
pub(crate) struct Lender {
    lendable: Mutex<Option<Lendable>>,
    shared: Arc<Shared>,
}

/// How an sqlx connection reaches a lent session.
pub(crate) struct Ticket {
    /// The socket's directory (`<dir>/.s.PGSQL.<PORT>`).
    pub(crate) dir: PathBuf,
    /// The one connection's password.
    pub(crate) password: String,
}

impl std::fmt::Debug for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ticket")
            .field("dir", &self.dir)
            .field("password", &"<hidden>")
            .finish()
    }
}

impl Lender {
    pub(crate) fn new(lendable: Lendable) -> Lender {
        let shared = Arc::new(Shared {
            state: Mutex::new((Whereabouts::Home, None)),
            changed: Condvar::new(),
            notify: tokio::sync::Notify::new(),
            gate: lendable.gate.clone(),
        });
        Lender {
            lendable: Mutex::new(Some(lendable)),
            shared,
        }
    }

    /// Lends the session to the next connection that logs in on the ticket's socket with
    /// its password; `None` if it was lent before or the socket cannot be made (logged).
    /// The client must be idle: nothing sent and not answered.
    pub(crate) fn lend(&self) -> Option<Ticket> {
        let lendable = self
            .lendable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        let dir = socket_parent().join(format!("pgharness-{}", uuid::Uuid::new_v4().simple()));
        let listener = match listen(&dir) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::debug!(%error, dir = %dir.display(), "pgharness: no socket to lend the control session on");
                let _ = std::fs::remove_dir_all(&dir);
                return None;
            }
        };
        let password = uuid::Uuid::new_v4().simple().to_string();
        lendable.gate.close();
        self.shared.set(Whereabouts::Lent);
        let shared = self.shared.clone();
        let secret = password.clone();
        let socket_dir = dir.clone();
        let reported = lendable.reported;
        crate::driver::spawn(async move {
            let whereabouts = match session(lendable.socket, lendable.unix) {
                Ok(Session::Tcp(stream)) => {
                    serve(listener, stream, &secret, &reported, &socket_dir, &shared).await
                }
                Ok(Session::Unix(stream)) => {
                    serve(listener, stream, &secret, &reported, &socket_dir, &shared).await
                }
                Err(error) => {
                    tracing::debug!(%error, "pgharness: the control session could not be lent");
                    let _ = std::fs::remove_dir_all(&socket_dir);
                    Whereabouts::Home
                }
            };
            if whereabouts == Whereabouts::Home {
                shared.gate.open();
            }
            shared.set(whereabouts);
        });
        Some(Ticket { dir, password })
    }

    /// Resolves once the session is not lent (at once if it never was): an sqlx pool's
    /// `close()` may leave the Terminate of the lent connection to a task of the test's
    /// runtime, so the test's closers wait here, on that runtime, for the session.
    pub(crate) fn home(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let shared = self.shared.clone();
        async move {
            loop {
                let changed = shared.notify.notified();
                if shared.lock().0 != Whereabouts::Lent {
                    return;
                }
                changed.await;
            }
        }
    }

    /// Whether the session is lent now.
    pub(crate) fn is_lent(&self) -> bool {
        self.shared.lock().0 == Whereabouts::Lent
    }

    /// Waits up to `timeout` for a lent session to come home; where it is then.
    pub(crate) fn reclaim(&self, timeout: Duration) -> Whereabouts {
        let state = self.shared.lock();
        let (state, _) = self
            .shared
            .changed
            .wait_timeout_while(state, timeout, |(whereabouts, _)| {
                *whereabouts == Whereabouts::Lent
            })
            .unwrap_or_else(|p| p.into_inner());
        state.0
    }

    /// Has `parting` written on the session when it comes home; `false` if it already has
    /// (or is lost).
    pub(crate) fn part_later(&self, parting: Vec<u8>) -> bool {
        let mut state = self.shared.lock();
        if state.0 != Whereabouts::Lent {
            return false;
        }
        state.1 = Some(parting);
        true
    }
}

/// Where the lending socket's directory goes: memory, where there is some to put it in
/// (`XDG_RUNTIME_DIR`, `/dev/shm`: a directory made on a disk after bulk deletes can cost a
/// millisecond), else the temporary directory.
fn socket_parent() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/dev/shm")])
        .find(|dir| dir.is_absolute() && dir.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// A private directory (0700) with the lending socket in it.
fn listen(dir: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o700).create(dir)?;
    let listener = std::os::unix::net::UnixListener::bind(dir.join(format!(".s.PGSQL.{PORT}")))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

enum Session {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

/// The control session's socket, registered with the current (driver) runtime.
fn session(socket: OwnedFd, unix: bool) -> io::Result<Session> {
    if unix {
        let stream = std::os::unix::net::UnixStream::from(socket);
        stream.set_nonblocking(true)?;
        Ok(Session::Unix(tokio::net::UnixStream::from_std(stream)?))
    } else {
        let stream = std::net::TcpStream::from(socket);
        stream.set_nonblocking(true)?;
        Ok(Session::Tcp(tokio::net::TcpStream::from_std(stream)?))
    }
}

/// Lends `backend` to the first connection that logs in on `listener`, relays until it
/// leaves, and brings the session home (or writes its parting, if one waits).
async fn serve<B>(
    listener: std::os::unix::net::UnixListener,
    mut backend: B,
    password: &str,
    reported: &[(String, String)],
    dir: &Path,
    shared: &Shared,
) -> Whereabouts
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let lent = lend_out(listener, &mut backend, password, reported, dir).await;
    let _ = std::fs::remove_dir_all(dir);
    let status = match lent {
        Ok(status) => status,
        Err(error) => {
            tracing::debug!(%error, "pgharness: the lent control session was lost");
            return Whereabouts::Lost;
        }
    };
    if status != b'I' {
        let mut rollback = BytesMut::new();
        put_frame(&mut rollback, b'Q', |body| body.put_slice(b"ROLLBACK\0"));
        if let Err(error) = simple(&mut backend, &rollback).await {
            tracing::debug!(%error, "pgharness: the lent control session could not roll back");
            return Whereabouts::Lost;
        }
    }
    let parting = shared.lock().1.take();
    match parting {
        Some(bytes) => match backend.write_all(&bytes).await {
            Ok(()) => Whereabouts::Parted,
            Err(error) => {
                tracing::warn!(%error, "pgharness: the teardown could not be sent on the control session sqlx gave back; the reaper will recycle or drop the schema");
                Whereabouts::Lost
            }
        },
        None => Whereabouts::Home,
    }
}

/// The session's time out: the first client to log in on `listener` (within
/// `ACCEPT_TIMEOUT`) gets it until it leaves. The session's transaction status then; an
/// error if the session was lost.
async fn lend_out<B>(
    listener: std::os::unix::net::UnixListener,
    backend: &mut B,
    password: &str,
    reported: &[(String, String)],
    dir: &Path,
) -> io::Result<u8>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let deadline = tokio::time::Instant::now() + ACCEPT_TIMEOUT;
    let client = loop {
        let Ok(accepted) = tokio::time::timeout_at(deadline, listener.accept()).await else {
            tracing::debug!("pgharness: nobody took the lent control session");
            return Ok(b'I');
        };
        let (mut client, _) = accepted?;
        match tokio::time::timeout(
            LOGIN_TIMEOUT,
            login(&mut client, backend, password, reported),
        )
        .await
        {
            Ok(Ok(Login::Done | Login::Failed)) => break client,
            Ok(Ok(Login::Refused)) => {}
            Ok(Ok(Login::Lost(error))) => return Err(error),
            Ok(Err(error)) => {
                tracing::debug!(%error, "pgharness: a login on the lending socket failed")
            }
            Err(_) => tracing::debug!("pgharness: a login on the lending socket took too long"),
        }
    };
    // One connection only: nobody else can reach the session from here on.
    drop(listener);
    let _ = std::fs::remove_dir_all(dir);
    relay(client, backend).await
}

enum Login {
    /// The client is logged in on the session.
    Done,
    /// A wrong password, a cancel request: the client was turned away.
    Refused,
    /// The session refused the client's settings; the client was told, and leaves.
    Failed,
    /// The session did not answer.
    Lost(io::Error),
}

/// sqlx's login on the lending socket: its password checked, its startup settings set on
/// the session, and the session's reported settings sent back as the server would.
async fn login<B>(
    client: &mut tokio::net::UnixStream,
    backend: &mut B,
    password: &str,
    reported: &[(String, String)],
) -> io::Result<Login>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let params = loop {
        let len = client.read_i32().await?;
        if !(8..=10_000).contains(&len) {
            return Err(io::Error::other("a startup packet of a bad length"));
        }
        let mut body = vec![0; len as usize - 4];
        client.read_exact(&mut body).await?;
        match i32::from_be_bytes([body[0], body[1], body[2], body[3]]) {
            // SSLRequest, GSSENCRequest: not here (a Unix socket of this process).
            80_877_103 | 80_877_104 => client.write_all(b"N").await?,
            196_608 => break startup_params(&body[4..])?,
            _ => return Ok(Login::Refused),
        }
    };
    let mut ask = BytesMut::new();
    put_frame(&mut ask, b'R', |body| body.put_i32(3));
    client.write_all(&ask).await?;
    let (kind, body) = read_frame(client).await?;
    let given = body.strip_suffix(b"\0").unwrap_or(&body);
    if kind != b'p' || !same(given, password.as_bytes()) {
        let mut refusal = BytesMut::new();
        error_response(
            &mut refusal,
            "28P01",
            "password authentication failed for the lent control session",
        );
        client.write_all(&refusal).await?;
        return Ok(Login::Refused);
    }
    let mut reported = reported.to_vec();
    let mut query = BytesMut::new();
    put_frame(&mut query, b'Q', |body| {
        body.put_slice(settings_sql(&params, &reported).as_bytes());
        body.put_u8(0);
    });
    let answer = match simple(backend, &query).await {
        Ok(answer) => answer,
        Err(error) => return Ok(Login::Lost(error)),
    };
    if let Some(error) = answer.error {
        client.write_all(&error).await?;
        return Ok(Login::Failed);
    }
    // What the settings changed, as the server reported it.
    for (name, value) in answer.statuses {
        match reported.iter_mut().find(|(known, _)| *known == name) {
            Some(known) => known.1 = value,
            None => reported.push((name, value)),
        }
    }
    let pid = answer.first.parse().unwrap_or(0);
    let mut hello = BytesMut::new();
    put_frame(&mut hello, b'R', |body| body.put_i32(0));
    for (name, value) in &reported {
        put_frame(&mut hello, b'S', |body| {
            body.put_slice(name.as_bytes());
            body.put_u8(0);
            body.put_slice(value.as_bytes());
            body.put_u8(0);
        });
    }
    put_frame(&mut hello, b'K', |body| {
        body.put_i32(pid);
        body.put_i32(rand_key());
    });
    put_frame(&mut hello, b'Z', |body| body.put_u8(b'I'));
    client.write_all(&hello).await?;
    Ok(Login::Done)
}

/// A cancel key nobody can use (cancel requests to the lending socket are turned away).
fn rand_key() -> i32 {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
}

/// Compares without stopping at the first difference.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The parameters of a StartupMessage after its protocol version.
fn startup_params(mut body: &[u8]) -> io::Result<Vec<(String, String)>> {
    let mut params = Vec::new();
    loop {
        let name = cstr(&mut body)?;
        if name.is_empty() {
            return Ok(params);
        }
        let value = cstr(&mut body)?;
        params.push((name, value));
    }
}

fn cstr(body: &mut &[u8]) -> io::Result<String> {
    let end = body
        .iter()
        .position(|&b| b == 0)
        .ok_or_else(|| io::Error::other("a startup parameter without its end"))?;
    let text = String::from_utf8(body[..end].to_vec())
        .map_err(|_| io::Error::other("a startup parameter that is not UTF-8"))?;
    *body = &body[end + 1..];
    Ok(text)
}

/// The settings a startup message asks for, as the server would take them: every parameter
/// but the user and database, and the `-c name=value` / `--name=value` switches of
/// `options` (words split at unescaped spaces, `\` escaping the next character).
pub(crate) fn startup_settings(params: &[(String, String)]) -> Vec<(String, String)> {
    let mut settings = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => {
                let words = split_options(value);
                let mut words = words.iter();
                while let Some(word) = words.next() {
                    let setting = if word == "-c" {
                        words.next().map(String::as_str)
                    } else {
                        word.strip_prefix("-c").or_else(|| word.strip_prefix("--"))
                    };
                    if let Some((name, value)) = setting.and_then(|s| s.split_once('=')) {
                        settings.push((name.replace('-', "_"), value.to_owned()));
                    }
                }
            }
            _ => settings.push((name.clone(), value.clone())),
        }
    }
    settings
}

/// `pg_split_opts`: words at unescaped whitespace, `\x` standing for `x`.
fn split_options(options: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => word.extend(chars.next()),
            c if c.is_whitespace() => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// The settings a server reports to its client at login (`GUC_REPORT`, up to Postgres 18):
/// the control connection keeps what its own login reported ([`Lendable::reported`]).
pub(crate) const REPORTED: &[&str] = &[
    "application_name",
    "client_encoding",
    "DateStyle",
    "default_transaction_read_only",
    "in_hot_standby",
    "integer_datetimes",
    "IntervalStyle",
    "is_superuser",
    "scram_iterations",
    "search_path",
    "server_encoding",
    "server_version",
    "session_authorization",
    "standard_conforming_strings",
    "TimeZone",
];

/// Names of the one UTC zone (tzdata links to it).
const UTC_NAMES: &[&str] = &[
    "utc",
    "etc/utc",
    "uct",
    "etc/uct",
    "universal",
    "etc/universal",
    "zulu",
    "etc/zulu",
];

/// Whether a setting asked for at login is what the session has already (`reported`): a
/// `TimeZone` of UTC under another of its names counts (loading a zone costs a backend
/// about a millisecond, and the zone is the same).
fn already(name: &str, value: &str, reported: &[(String, String)]) -> bool {
    let Some((_, current)) = reported
        .iter()
        .find(|(known, _)| known.eq_ignore_ascii_case(name))
    else {
        return false;
    };
    let utc = |zone: &str| UTC_NAMES.contains(&zone.to_ascii_lowercase().as_str());
    current == value || name.eq_ignore_ascii_case("timezone") && utc(current) && utc(value)
}

/// One simple query: the backend's pid, and the startup's settings that the session does
/// not have already set for it (`set_config`, as the claim uses: nothing new to look up in
/// the catalog of a backend that started a moment ago).
fn settings_sql(params: &[(String, String)], reported: &[(String, String)]) -> String {
    use crate::script::quote_literal;
    let sets: String = startup_settings(params)
        .iter()
        .filter(|(name, value)| !already(name, value, reported))
        .map(|(name, value)| {
            format!(
                ", set_config({}, {}, false)",
                quote_literal(name),
                quote_literal(value)
            )
        })
        .collect();
    format!("SELECT pg_backend_pid()::text{sets}")
}

/// What a simple query on the session answered.
struct Answer {
    /// The first field of the first row.
    first: String,
    /// The ParameterStatus messages that came with it.
    statuses: Vec<(String, String)>,
    /// The ErrorResponse, whole, if one came.
    error: Option<Vec<u8>>,
}

/// Sends a simple query and reads its answer up to ReadyForQuery.
async fn simple<B>(backend: &mut B, query: &[u8]) -> io::Result<Answer>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    backend.write_all(query).await?;
    let mut answer = Answer {
        first: String::new(),
        statuses: Vec::new(),
        error: None,
    };
    let mut rows = 0;
    loop {
        let (kind, body) = read_frame(backend).await?;
        match kind {
            b'D' => {
                if rows == 0 {
                    answer.first = data_row(&body)?.into_iter().next().unwrap_or_default();
                }
                rows += 1;
            }
            b'S' => {
                let mut rest = &body[..];
                let name = cstr(&mut rest)?;
                answer.statuses.push((name, cstr(&mut rest)?));
            }
            b'E' => {
                let mut frame = BytesMut::new();
                put_frame(&mut frame, b'E', |out| out.put_slice(&body));
                answer.error = Some(frame.to_vec());
            }
            b'Z' => return Ok(answer),
            _ => {}
        }
    }
}

/// A DataRow's text fields (NULL as empty).
fn data_row(mut body: &[u8]) -> io::Result<Vec<String>> {
    let bad = || io::Error::other("a malformed DataRow");
    if body.len() < 2 {
        return Err(bad());
    }
    let count = body.get_u16();
    let mut fields = Vec::with_capacity(count.into());
    for _ in 0..count {
        if body.len() < 4 {
            return Err(bad());
        }
        let len = body.get_i32();
        if len < 0 {
            fields.push(String::new());
            continue;
        }
        let len = len as usize;
        if body.len() < len {
            return Err(bad());
        }
        fields.push(String::from_utf8_lossy(&body[..len]).into_owned());
        body.advance(len);
    }
    Ok(fields)
}

async fn read_frame<S: AsyncRead + Unpin>(stream: &mut S) -> io::Result<(u8, Vec<u8>)> {
    let kind = stream.read_u8().await?;
    let len = stream.read_i32().await?;
    if len < 4 {
        return Err(io::Error::other("a message of a bad length"));
    }
    let mut body = vec![0; len as usize - 4];
    stream.read_exact(&mut body).await?;
    Ok((kind, body))
}

fn put_frame(out: &mut BytesMut, kind: u8, body: impl FnOnce(&mut BytesMut)) {
    out.put_u8(kind);
    let at = out.len();
    out.put_i32(0);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

fn error_response(out: &mut BytesMut, code: &str, message: &str) {
    put_frame(out, b'E', |body| {
        for (field, text) in [
            (b'S', "FATAL"),
            (b'V', "FATAL"),
            (b'C', code),
            (b'M', message),
        ] {
            body.put_u8(field);
            body.put_slice(text.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
    });
}

/// The whole messages at the front of `buf`, taken out: their bytes, how many answers
/// they are owed (a ReadyForQuery for each Sync, Query and FunctionCall), and whether a
/// Terminate came (it, and anything after it, is dropped).
pub(crate) fn take_frames(buf: &mut BytesMut) -> (BytesMut, u32, bool) {
    let mut end = 0;
    let mut owed = 0;
    while buf.len() >= end + 5 {
        let kind = buf[end];
        let len = i32::from_be_bytes([buf[end + 1], buf[end + 2], buf[end + 3], buf[end + 4]]);
        let len = len.max(4) as usize;
        if buf.len() < end + 1 + len {
            break;
        }
        if kind == b'X' {
            let frames = buf.split_to(end);
            buf.clear();
            return (frames, owed, true);
        }
        if matches!(kind, b'S' | b'Q' | b'F') {
            owed += 1;
        }
        end += 1 + len;
    }
    (buf.split_to(end), owed, false)
}

/// The ReadyForQuery messages among the whole messages at the front of `buf`, taken out
/// with them: how many, and the last one's transaction status.
pub(crate) fn take_answers(buf: &mut BytesMut) -> (BytesMut, u32, Option<u8>) {
    let mut end = 0;
    let mut ready = 0;
    let mut status = None;
    while buf.len() >= end + 5 {
        let kind = buf[end];
        let len = i32::from_be_bytes([buf[end + 1], buf[end + 2], buf[end + 3], buf[end + 4]]);
        let len = len.max(4) as usize;
        if buf.len() < end + 1 + len {
            break;
        }
        if kind == b'Z' && len >= 5 {
            ready += 1;
            status = Some(buf[end + 5]);
        }
        end += 1 + len;
    }
    (buf.split_to(end), ready, status)
}

/// Relays between the client and the session until the client leaves and every answer it
/// was owed has come; the session's transaction status then.
async fn relay<B>(mut client: tokio::net::UnixStream, backend: &mut B) -> io::Result<u8>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = BytesMut::with_capacity(8192);
    let mut down = BytesMut::with_capacity(8192);
    let mut owed: u32 = 0;
    let mut status = b'I';
    let mut client_here = true;
    loop {
        tokio::select! {
            read = client.read_buf(&mut up) => {
                let (frames, asked, terminated) = match read {
                    Ok(0) | Err(_) => break,
                    Ok(_) => take_frames(&mut up),
                };
                owed += asked;
                backend.write_all(&frames).await?;
                if terminated {
                    break;
                }
            }
            read = backend.read_buf(&mut down) => {
                if read? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                let (frames, ready, last) = take_answers(&mut down);
                owed = owed.saturating_sub(ready);
                status = last.unwrap_or(status);
                if client_here && client.write_all(&frames).await.is_err() {
                    client_here = false;
                }
            }
        }
    }
    drop(client);
    // The answers still owed: read and dropped.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while owed > 0 {
            if backend.read_buf(&mut down).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            let (_, ready, last) = take_answers(&mut down);
            owed = owed.saturating_sub(ready);
            status = last.unwrap_or(status);
        }
        Ok(())
    })
    .await;
    match drained {
        Ok(result) => result.map(|()| status),
        Err(_) => Err(io::Error::other(
            "the session did not answer what its client had sent",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame(&mut out, kind, |b| b.put_slice(body));
        out.to_vec()
    }

    #[test]
    fn frames_count_what_is_owed_and_hold_back_terminate() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(b'P', b"\0SELECT 1\0\0\0"));
        buf.extend_from_slice(&frame(b'S', b""));
        buf.extend_from_slice(&frame(b'Q', b"SELECT 2\0"));
        let whole = buf.len();
        buf.extend_from_slice(&frame(b'X', b""));
        buf.extend_from_slice(b"trailing");
        let (frames, owed, terminated) = take_frames(&mut buf);
        assert_eq!((frames.len(), owed, terminated), (whole, 2, true));
        assert!(buf.is_empty());
    }

    #[test]
    fn a_partial_message_waits_for_the_rest() {
        let query = frame(b'Q', b"SELECT 1\0");
        let mut buf = BytesMut::from(&query[..7]);
        let (frames, owed, terminated) = take_frames(&mut buf);
        assert_eq!((frames.len(), owed, terminated), (0, 0, false));
        buf.extend_from_slice(&query[7..]);
        assert_eq!(take_frames(&mut buf).1, 1);
    }

    #[test]
    fn answers_count_ready_for_query_and_keep_the_last_status() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(b'C', b"BEGIN\0"));
        buf.extend_from_slice(&frame(b'Z', b"T"));
        buf.extend_from_slice(&frame(b'Z', b"E"));
        buf.extend_from_slice(&frame(b'D', b"\0")[..3]);
        let (_, ready, status) = take_answers(&mut buf);
        assert_eq!((ready, status), (2, Some(b'E')));
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn startup_settings_read_options_as_the_server_does() {
        let params = [
            ("user".to_owned(), "app".to_owned()),
            ("DateStyle".to_owned(), "ISO, MDY".to_owned()),
            (
                "options".to_owned(),
                r"-csearch_path=t_1,public -c statement-timeout=5s --lock_timeout=1s -cx=a\ b"
                    .to_owned(),
            ),
        ];
        assert_eq!(
            startup_settings(&params),
            [
                ("DateStyle", "ISO, MDY"),
                ("search_path", "t_1,public"),
                ("statement_timeout", "5s"),
                ("lock_timeout", "1s"),
                ("x", "a b"),
            ]
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        );
    }

    #[test]
    fn passwords_are_compared_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }

    #[test]
    fn a_ticket_hides_its_password() {
        let ticket = Ticket {
            dir: PathBuf::from("/tmp/x"),
            password: "s3cret".to_owned(),
        };
        assert!(!format!("{ticket:?}").contains("s3cret"));
    }
}

#[cfg(test)]
mod relay_tests {
    use super::*;
    use tokio::net::UnixStream;

    fn startup(params: &[(&str, &str)]) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.put_i32(196_608);
        for (name, value) in params {
            body.put_slice(name.as_bytes());
            body.put_u8(0);
            body.put_slice(value.as_bytes());
            body.put_u8(0);
        }
        body.put_u8(0);
        let mut out = BytesMut::new();
        out.put_i32(body.len() as i32 + 4);
        out.put_slice(&body);
        out.to_vec()
    }

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        put_frame(&mut out, kind, |b| b.put_slice(body));
        out.to_vec()
    }

    fn data_row(fields: &[&str]) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.put_u16(fields.len() as u16);
        for field in fields {
            body.put_i32(field.len() as i32);
            body.put_slice(field.as_bytes());
        }
        message(b'D', &body)
    }

    async fn log_in(socket: &Path, password: &str) -> (UnixStream, u8, Vec<u8>) {
        let mut client = UnixStream::connect(socket).await.unwrap();
        client
            .write_all(&startup(&[
                ("user", "app"),
                ("DateStyle", "ISO, MDY"),
                ("TimeZone", "UTC"),
                ("options", "-csearch_path=t_1,public"),
            ]))
            .await
            .unwrap();
        let (kind, body) = read_frame(&mut client).await.unwrap();
        assert_eq!(
            (kind, body),
            (b'R', 3i32.to_be_bytes().to_vec()),
            "asks for a password"
        );
        client
            .write_all(&message(b'p', format!("{password}\0").as_bytes()))
            .await
            .unwrap();
        let (kind, body) = read_frame(&mut client).await.unwrap();
        (client, kind, body)
    }

    /// The lending socket turns a wrong password away (and stays open for the right one),
    /// sets the startup's settings on the session, answers the login as the server would,
    /// relays, holds Terminate back and reports the session's transaction status.
    #[tokio::test]
    async fn the_lending_socket_logs_in_only_its_password_and_relays_until_terminate() {
        use std::os::unix::fs::PermissionsExt;
        let dir =
            std::env::temp_dir().join(format!("pgharness-test-{}", uuid::Uuid::new_v4().simple()));
        let listener = listen(&dir).unwrap();
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700, "only its user may enter the directory");
        let socket = dir.join(format!(".s.PGSQL.{PORT}"));
        let (mut server, backend) = tokio::io::duplex(64 * 1024);
        let lending_dir = dir.clone();
        let lent = tokio::spawn(async move {
            let mut backend = backend;
            let reported = [("server_version", "17.2"), ("TimeZone", "Etc/UTC")]
                .map(|(name, value)| (name.to_owned(), value.to_owned()));
            lend_out(listener, &mut backend, "right", &reported, &lending_dir).await
        });

        let (_, kind, body) = log_in(&socket, "wrong").await;
        assert_eq!(kind, b'E');
        assert!(String::from_utf8_lossy(&body).contains("28P01"));

        let login = tokio::spawn({
            let socket = socket.clone();
            async move { log_in(&socket, "right").await }
        });
        // The session gets the startup's settings it lacks (UTC under another name is
        // UTC), and is asked for its pid.
        let (kind, body) = read_frame(&mut server).await.unwrap();
        let sql = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(kind, b'Q');
        assert!(sql.starts_with("SELECT pg_backend_pid()"), "{sql}");
        assert!(
            sql.contains("set_config('search_path', 't_1,public', false)"),
            "{sql}"
        );
        assert!(
            sql.contains("set_config('DateStyle', 'ISO, MDY', false)"),
            "{sql}"
        );
        assert!(!sql.contains("TimeZone"), "{sql}");
        assert!(!sql.contains("'app'"), "the user is not a setting: {sql}");
        let mut answer = data_row(&["4242", "t_1,public"]);
        answer.extend(message(b'S', b"DateStyle\0ISO, MDY\0"));
        answer.extend(message(b'C', b"SELECT 1\0"));
        answer.extend(message(b'Z', b"I"));
        server.write_all(&answer).await.unwrap();

        let (mut client, kind, body) = login.await.unwrap();
        assert_eq!(
            (kind, body),
            (b'R', 0i32.to_be_bytes().to_vec()),
            "logged in"
        );
        // What the control session's login reported, with what the settings changed.
        for expected in [
            &b"server_version\x0017.2\0"[..],
            b"TimeZone\0Etc/UTC\0",
            b"DateStyle\0ISO, MDY\0",
        ] {
            let (kind, body) = read_frame(&mut client).await.unwrap();
            assert_eq!((kind, body), (b'S', expected.to_vec()));
        }
        let (kind, body) = read_frame(&mut client).await.unwrap();
        assert_eq!((kind, &body[..4]), (b'K', &4242i32.to_be_bytes()[..]));
        let (kind, body) = read_frame(&mut client).await.unwrap();
        assert_eq!((kind, body), (b'Z', b"I".to_vec()));
        assert!(
            !dir.exists(),
            "the socket is gone once its one client is in"
        );

        // Relayed both ways; Terminate is not passed on.
        client.write_all(&message(b'Q', b"BEGIN\0")).await.unwrap();
        assert_eq!(
            read_frame(&mut server).await.unwrap(),
            (b'Q', b"BEGIN\0".to_vec())
        );
        server.write_all(&message(b'Z', b"T")).await.unwrap();
        assert_eq!(
            read_frame(&mut client).await.unwrap(),
            (b'Z', b"T".to_vec())
        );
        client.write_all(&message(b'X', b"")).await.unwrap();
        assert_eq!(lent.await.unwrap().unwrap(), b'T', "left in a transaction");
        let mut rest = Vec::new();
        drop(client);
        let read =
            tokio::time::timeout(Duration::from_millis(50), server.read_buf(&mut rest)).await;
        assert!(
            read.is_err() || rest.is_empty(),
            "nothing after the relay: {rest:?}"
        );
    }
}
