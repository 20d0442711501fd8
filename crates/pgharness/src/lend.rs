//! Lending a test's control session to its first sqlx connection, so that a test that gets
//! an sqlx pool starts no second backend.
//!
//! A new Postgres session costs a backend start (fork, login, catalog caches: 5–9 ms on a
//! small machine), and a test that asks for a `PgPool` would otherwise pay it twice: once
//! for the control connection that claims its schema, once for sqlx's first connection.
//! Instead, `#[pgharness::test]` (for a test that takes no `TestDb`) lends the control
//! session: sqlx connects to a Unix socket of this process, in a fresh directory only its
//! user can enter, and logs in with a password made for that one connection. This module
//! answers the login itself, with the greeting the server gave the control connection (its
//! ParameterStatus messages, read off tokio-postgres, and its pid, read off the login as it
//! passed through the [`Gated`] stream); sends the settings sqlx asked for and the session
//! lacks ahead of sqlx's first query, swallowing their answer but for the ParameterStatus
//! messages (so the login costs the session no round trip; a setting the server refuses
//! closes sqlx's connection, and says why); then relays sqlx's messages to and from the
//! session. The pool's later connections go to the server directly.
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
//! Startup parameters and options are read as the server reads them by `pg_wire`, which
//! rds-iam's session pool (the RDS proxy) shares.

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

use pg_wire::exchange::Exchange;

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

/// Messages larger than this are a broken peer (Postgres caps a message at 1 GB).
const MAX_MESSAGE: usize = 1 << 30;

/// A frontend Terminate message, whole.
const TERMINATE: &[u8] = &[b'X', 0, 0, 0, 4];

/// A stream that can be held while its session is lent.
pub(crate) struct Gated<S> {
    inner: S,
    gate: Arc<Gate>,
    /// What the login has sent so far, until its ReadyForQuery: read for the pid.
    login: Option<BytesMut>,
}

/// Whether the session behind a [`Gated`] stream is lent, and who waits for it to come home;
/// what its client owes or is owed ([`Exchange`]), and whether the session is being parted
/// from it.
#[derive(Default)]
pub(crate) struct Gate {
    state: Mutex<GateState>,
    /// Signalled when the client's exchange changes while the session is being parted.
    quiet: Condvar,
    /// Whether a client that wrote while the session was lent has been told.
    told: std::sync::atomic::AtomicBool,
    /// The backend's pid, from the login's BackendKeyData (0 until seen).
    pid: std::sync::atomic::AtomicI32,
    /// The backend's secret key, from the same message (for a CancelRequest).
    secret: std::sync::atomic::AtomicI32,
}

#[derive(Default)]
struct GateState {
    lent: bool,
    readers: Vec<Waker>,
    /// What the client has open with the server, counted once its login is over.
    exchange: Exchange,
    /// The login is over: the client's bytes are counted.
    counting: bool,
    /// The session is being parted from its client: the client's writes end at the next
    /// message boundary, and are swallowed after it.
    parting: bool,
}

/// Whether a session could be parted from its client ([`Gate::quiesce`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Quiet {
    /// At rest: nothing owed, nothing half written, no COPY open. The parting may follow.
    AtRest,
    /// A COPY from the client is open (its CopyFail may be written, then wait again).
    CopyOpen,
    /// Answers are still owed after the wait (a statement still running).
    Owed(usize),
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

    /// Parts the session from its client: from now on the client's writes end at the next
    /// message boundary and are swallowed after it (tokio-postgres's Close for a statement
    /// dropped later, its Terminate), and this waits until the session owes the client
    /// nothing, or `timeout` passes. The client's connection task (on pgharness's driver
    /// runtime) keeps reading the answers meanwhile.
    pub(crate) fn quiesce(&self, timeout: Duration) -> Quiet {
        let deadline = std::time::Instant::now() + timeout;
        let mut state = self.lock();
        state.parting = true;
        loop {
            let exchange = &state.exchange;
            if exchange.at_rest() {
                return Quiet::AtRest;
            }
            if exchange.copy_in() && exchange.written_whole() && exchange.owed() == 0 {
                return Quiet::CopyOpen;
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return if exchange.copy_in() && exchange.written_whole() {
                    Quiet::CopyOpen
                } else {
                    Quiet::Owed(exchange.owed().max(1))
                };
            }
            state = self
                .quiet
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Whether the client's session was in a transaction (or a failed one) when it last
    /// heard from the server.
    pub(crate) fn in_transaction(&self) -> bool {
        self.lock().exchange.in_transaction()
    }

    /// Counts bytes the parting itself wrote on the session (a CopyFail and its Sync).
    pub(crate) fn wrote_on_session(&self, bytes: &[u8]) {
        self.lock().exchange.wrote(bytes);
    }

    /// The backend's pid and secret key, once the login has shown them.
    pub(crate) fn cancel_key(&self) -> Option<(i32, i32)> {
        let pid = self.pid.load(std::sync::atomic::Ordering::Relaxed);
        (pid != 0).then(|| (pid, self.secret.load(std::sync::atomic::Ordering::Relaxed)))
    }
}

impl<S> Gated<S> {
    pub(crate) fn new(inner: S, gate: Arc<Gate>) -> Gated<S> {
        Gated {
            inner,
            gate,
            login: Some(BytesMut::new()),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Gated<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.gate.held(cx) {
            return Poll::Pending;
        }
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        if !matches!(read, Poll::Ready(Ok(()))) {
            return read;
        }
        let got = &buf.filled()[before..];
        match this.login.as_mut() {
            Some(login) => {
                login.extend_from_slice(got);
                let (key, over) = read_login(login);
                if let Some((pid, secret)) = key {
                    let relaxed = std::sync::atomic::Ordering::Relaxed;
                    this.gate.pid.store(pid, relaxed);
                    this.gate.secret.store(secret, relaxed);
                }
                if over {
                    this.login = None;
                    this.gate.lock().counting = true;
                }
            }
            None => {
                let mut state = this.gate.lock();
                state.exchange.read(got);
                if state.parting {
                    this.gate.quiet.notify_all();
                }
            }
        }
        read
    }
}

/// Takes the whole messages of a login out of `login`: the pid and secret key of its
/// BackendKeyData, if one came, and whether its ReadyForQuery came (the login is over).
fn read_login(login: &mut BytesMut) -> (Option<(i32, i32)>, bool) {
    let mut pid = None;
    let mut end = 0;
    let mut over = false;
    for (kind, frame) in whole_frames(login) {
        end = frame.end;
        match kind {
            b'K' if frame.len() >= 13 => {
                let at = frame.start + 5;
                let int = |at: usize| {
                    i32::from_be_bytes([login[at], login[at + 1], login[at + 2], login[at + 3]])
                };
                pid = Some((int(at), int(at + 4)));
            }
            b'Z' => {
                over = true;
                break;
            }
            _ => {}
        }
    }
    login.advance(end);
    (pid, over)
}

/// The whole messages at the front of `buf`, in order: each one's type and its bytes'
/// range (type, length and body). A message not yet whole ends the walk.
fn whole_frames(buf: &[u8]) -> impl Iterator<Item = (u8, std::ops::Range<usize>)> + '_ {
    let mut end = 0;
    std::iter::from_fn(move || {
        let length = pg_wire::frame::length(&buf[end..], MAX_MESSAGE).ok()??;
        let frame = end..end + length;
        end = frame.end;
        Some((buf[frame.start], frame))
    })
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Gated<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.gate.is_lent() {
            // A client dropped while its session is lent says goodbye (tokio-postgres's
            // Terminate): not a use of the client, and not for the session either.
            if buf == TERMINATE {
                return Poll::Ready(Ok(buf.len()));
            }
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
        // Under the gate's lock, so that a parting never sees the session at rest while a
        // write is under way.
        let this = self.get_mut();
        let mut state = this.gate.lock();
        if !state.counting {
            drop(state);
            return Pin::new(&mut this.inner).poll_write(cx, buf);
        }
        let mut buf = buf;
        if state.parting {
            // The session is being parted: the message under way is finished, and nothing
            // after it reaches the server (tokio-postgres believes it sent it).
            let rest = state.exchange.rest_of_message();
            if rest == 0 {
                return Poll::Ready(Ok(buf.len()));
            }
            buf = &buf[..rest.min(buf.len())];
        }
        let written = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = written {
            state.exchange.wrote(&buf[..n]);
            if state.parting {
                this.gate.quiet.notify_all();
            }
        }
        written
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

/// What a lent session's client is greeted with at login, as the server greeted the
/// control connection.
struct Greeting {
    /// The settings the server reported ([`REPORTED`]).
    reported: Vec<(String, String)>,
    /// The backend's pid (its BackendKeyData).
    pid: i32,
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
        let greeting = Greeting {
            reported: lendable.reported,
            pid: lendable.gate.pid.load(std::sync::atomic::Ordering::Relaxed),
        };
        crate::driver::spawn(async move {
            let whereabouts = match session(lendable.socket, lendable.unix) {
                Ok(Session::Tcp(stream)) => {
                    serve(listener, stream, &secret, &greeting, &socket_dir, &shared).await
                }
                Ok(Session::Unix(stream)) => {
                    serve(listener, stream, &secret, &greeting, &socket_dir, &shared).await
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
            tracing::debug!(?whereabouts, "pgharness: the lent control session is back");
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
    greeting: &Greeting,
    dir: &Path,
    shared: &Shared,
) -> Whereabouts
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let lent = lend_out(listener, &mut backend, password, greeting, dir).await;
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
    greeting: &Greeting,
    dir: &Path,
) -> io::Result<u8>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let deadline = tokio::time::Instant::now() + ACCEPT_TIMEOUT;
    // Clients authenticate at once, each on its own clock: one that says nothing delays
    // nobody. The first with the password gets the session.
    let mut logins = futures_util::stream::FuturesUnordered::new();
    let (client, swallow) = loop {
        let authenticated = tokio::select! {
            accepted = tokio::time::timeout_at(deadline, listener.accept()) => {
                let Ok(accepted) = accepted else {
                    tracing::debug!("pgharness: nobody took the lent control session");
                    return Ok(b'I');
                };
                let (client, _) = accepted?;
                logins.push(async move {
                    let mut client = client;
                    let outcome =
                        tokio::time::timeout(LOGIN_TIMEOUT, authenticate(&mut client, password))
                            .await;
                    (client, outcome)
                });
                continue;
            }
            Some(login) = logins.next() => login,
        };
        let (mut client, params) = match authenticated {
            (client, Ok(Ok(Some(params)))) => (client, params),
            (_, Ok(Ok(None))) => continue,
            (_, Ok(Err(error))) => {
                tracing::debug!(%error, "pgharness: a login on the lending socket failed");
                continue;
            }
            (_, Err(_)) => {
                tracing::debug!("pgharness: a login on the lending socket took too long");
                continue;
            }
        };
        match greet(&mut client, backend, &params, greeting).await {
            Ok(Login::Done { swallow }) => break (client, swallow),
            Ok(Login::Lost(error)) => return Err(error),
            Err(error) => {
                tracing::debug!(%error, "pgharness: a login on the lending socket failed")
            }
        }
    };
    drop(logins);
    // One connection only: nobody else can reach the session from here on.
    drop(listener);
    let _ = std::fs::remove_dir_all(dir);
    relay(client, backend, swallow).await
}

enum Login {
    /// The client is logged in on the session; the answers to swallow first (its settings').
    Done { swallow: u32 },
    /// The session did not answer.
    Lost(io::Error),
}

/// sqlx's login on the lending socket, up to its password: its startup parameters when the
/// password is the lend's, `None` when it was turned away (a wrong password, a cancel
/// request). Touches nothing of the session, so clients authenticate side by side.
async fn authenticate(
    client: &mut tokio::net::UnixStream,
    password: &str,
) -> io::Result<Option<Vec<(String, String)>>> {
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
            196_608 => break pg_wire::startup::params(&body[4..]).map_err(io::Error::other)?,
            _ => return Ok(None),
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
        return Ok(None);
    }
    Ok(Some(params))
}

/// The rest of sqlx's login, once authenticated: its startup settings sent to the session,
/// and the session's login greeting sent back as the server would.
async fn greet<B>(
    client: &mut tokio::net::UnixStream,
    backend: &mut B,
    params: &[(String, String)],
    greeting: &Greeting,
) -> io::Result<Login>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    // The settings go ahead of the client's first query, and their answer is swallowed by
    // the relay (all but the ParameterStatus messages, which the client gets as a server
    // would send them after a SET): the login costs the session no round trip.
    let settings = settings_sql(params, &greeting.reported);
    if let Some(sql) = &settings {
        let mut query = BytesMut::new();
        put_frame(&mut query, b'Q', |body| {
            body.put_slice(sql.as_bytes());
            body.put_u8(0);
        });
        if let Err(error) = backend.write_all(&query).await {
            return Ok(Login::Lost(error));
        }
    }
    let mut hello = BytesMut::new();
    put_frame(&mut hello, b'R', |body| body.put_i32(0));
    for (name, value) in &greeting.reported {
        put_frame(&mut hello, b'S', |body| {
            body.put_slice(name.as_bytes());
            body.put_u8(0);
            body.put_slice(value.as_bytes());
            body.put_u8(0);
        });
    }
    put_frame(&mut hello, b'K', |body| {
        body.put_i32(greeting.pid);
        body.put_i32(rand_key());
    });
    put_frame(&mut hello, b'Z', |body| body.put_u8(b'I'));
    client.write_all(&hello).await?;
    Ok(Login::Done {
        swallow: u32::from(settings.is_some()),
    })
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

/// The settings a startup message asks for, as the server would take them: every parameter
/// but the user and database, and the `-c name=value` / `--name=value` switches of
/// `options` (words split at unescaped spaces, `\` escaping the next character).
pub(crate) fn startup_settings(params: &[(String, String)]) -> Vec<(String, String)> {
    let mut settings = Vec::new();
    for (name, value) in params {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            "options" => settings.extend(pg_wire::startup::option_settings(value)),
            _ => settings.push((name.clone(), value.clone())),
        }
    }
    settings
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

/// One statement setting what the startup asks for and the session lacks (`set_config`,
/// as the claim uses: nothing new to look up in the catalog of a backend that started a
/// moment ago); `None` when it lacks nothing.
fn settings_sql(params: &[(String, String)], reported: &[(String, String)]) -> Option<String> {
    use crate::script::quote_literal;
    let sets: Vec<String> = startup_settings(params)
        .iter()
        .filter(|(name, value)| !already(name, value, reported))
        .map(|(name, value)| {
            format!(
                "set_config({}, {}, false)",
                quote_literal(name),
                quote_literal(value)
            )
        })
        .collect();
    (!sets.is_empty()).then(|| format!("SELECT {}", sets.join(", ")))
}

/// Sends a simple query and reads its answer up to ReadyForQuery (dropped).
async fn simple<B>(backend: &mut B, query: &[u8]) -> io::Result<()>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    backend.write_all(query).await?;
    while read_frame(backend).await?.0 != b'Z' {}
    Ok(())
}

/// The text of an ErrorResponse's message field.
fn error_message(body: &[u8]) -> String {
    body.split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"M"))
        .map(|text| String::from_utf8_lossy(text).into_owned())
        .unwrap_or_default()
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
    out.extend_from_slice(&pg_wire::frame::error_response("FATAL", code, message));
}

/// The whole messages at the front of `buf`, taken out: their bytes, how many answers
/// they are owed (a ReadyForQuery for each Sync, Query and FunctionCall), and whether a
/// Terminate came (it, and anything after it, is dropped).
pub(crate) fn take_frames(buf: &mut BytesMut) -> (BytesMut, u32, bool) {
    let mut end = 0;
    let mut owed = 0;
    let mut terminated = false;
    for (kind, frame) in whole_frames(buf) {
        if kind == b'X' {
            terminated = true;
            break;
        }
        if matches!(kind, b'S' | b'Q' | b'F') {
            owed += 1;
        }
        end = frame.end;
    }
    let frames = buf.split_to(end);
    if terminated {
        buf.clear();
    }
    (frames, owed, terminated)
}

/// The whole messages at the front of `buf`, taken out: the bytes to pass on, how many
/// ReadyForQuery came, the last one's transaction status, and the message of an error
/// among the answers swallowed. While `swallow` is above zero the answers are the
/// session's own (the login's settings): dropped, but for ParameterStatus, each
/// ReadyForQuery ending one.
pub(crate) fn take_answers(
    buf: &mut BytesMut,
    swallow: &mut u32,
) -> (BytesMut, u32, Option<u8>, Option<String>) {
    let mut out = BytesMut::new();
    let mut ready = 0;
    let mut status = None;
    let mut refused = None;
    let mut end = 0;
    for (kind, range) in whole_frames(buf) {
        end = range.end;
        let frame = &buf[range];
        if kind == b'Z' && frame.len() >= 6 {
            ready += 1;
            status = Some(frame[5]);
        }
        if *swallow == 0 || kind == b'S' {
            out.extend_from_slice(frame);
        } else if kind == b'E' {
            refused = Some(error_message(&frame[5..]));
        } else if kind == b'Z' {
            *swallow -= 1;
        }
    }
    buf.advance(end);
    (out, ready, status, refused)
}

/// Relays between the client and the session until the client leaves and every answer it
/// (and the login, `swallow`) was owed has come; the session's transaction status then.
async fn relay<B>(
    mut client: tokio::net::UnixStream,
    backend: &mut B,
    mut swallow: u32,
) -> io::Result<u8>
where
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut up = BytesMut::with_capacity(8192);
    let mut down = BytesMut::with_capacity(8192);
    let mut owed: u32 = swallow;
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
                let (frames, ready, last, refused) = take_answers(&mut down, &mut swallow);
                owed = owed.saturating_sub(ready);
                status = last.unwrap_or(status);
                if client_here && client.write_all(&frames).await.is_err() {
                    client_here = false;
                }
                // The session refused a setting sqlx asked for at login: sqlx must not go
                // on without it. Said on stderr too (a test may have no subscriber).
                if let Some(error) = refused {
                    tracing::warn!(%error, "pgharness: a setting of the sqlx login failed on the lent session; its connection is closed");
                    eprintln!("pgharness: a setting sqlx asked for at login failed on the test's lent session ({error}); its connection is closed");
                    break;
                }
            }
        }
    }
    drop(client);
    tracing::debug!(
        owed,
        "pgharness: the lent session's client left; draining what it is owed"
    );
    // The answers still owed: read and dropped.
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while owed > 0 {
            if backend.read_buf(&mut down).await? == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof));
            }
            let (_, ready, last, _) = take_answers(&mut down, &mut swallow);
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

    #[tokio::test]
    async fn a_gated_stream_refuses_writes_while_lent_but_a_dropped_client_s_terminate() {
        let (ours, mut session) = tokio::io::duplex(64);
        let gate = Arc::new(Gate::default());
        let mut gated = Gated::new(ours, gate.clone());
        gate.close();
        gated.write_all(TERMINATE).await.unwrap();
        assert!(!gate.told.load(std::sync::atomic::Ordering::Relaxed));
        let query = frame(b'Q', b"SELECT 1\0");
        assert!(gated.write_all(&query).await.is_err());
        assert!(gate.told.load(std::sync::atomic::Ordering::Relaxed));
        gate.open();
        gated.write_all(&query).await.unwrap();
        drop(gated);
        let mut reached = Vec::new();
        session.read_to_end(&mut reached).await.unwrap();
        assert_eq!(
            reached, query,
            "only what was written after the session came home"
        );
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
        let (passed, ready, status, refused) = take_answers(&mut buf, &mut 0);
        assert_eq!((ready, status, refused), (2, Some(b'E'), None));
        assert_eq!(passed.len(), 6 + 5 + 6 + 6);
        assert_eq!(buf.len(), 3);
    }

    #[test]
    fn the_login_s_own_answers_are_swallowed_but_for_parameter_status() {
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&frame(b'T', b"\0\0"));
        buf.extend_from_slice(&frame(b'S', b"TimeZone\0UTC\0"));
        buf.extend_from_slice(&frame(b'E', b"SERROR\0C22023\0Mbad value\0\0"));
        buf.extend_from_slice(&frame(b'Z', b"I"));
        let client_s = frame(b'C', b"SELECT 1\0");
        buf.extend_from_slice(&client_s);
        let mut swallow = 1;
        let (passed, ready, _, refused) = take_answers(&mut buf, &mut swallow);
        let mut expected = frame(b'S', b"TimeZone\0UTC\0");
        expected.extend_from_slice(&client_s);
        assert_eq!(passed.to_vec(), expected);
        assert_eq!(
            (ready, swallow, refused.as_deref()),
            (1, 0, Some("bad value"))
        );
    }

    #[test]
    fn the_login_s_pid_and_secret_are_read_off_its_answers() {
        let mut login = BytesMut::new();
        login.extend_from_slice(&frame(b'R', &0i32.to_be_bytes()));
        let mut key = 4242i32.to_be_bytes().to_vec();
        key.extend_from_slice(&7i32.to_be_bytes());
        let k = frame(b'K', &key);
        login.extend_from_slice(&k[..6]);
        assert_eq!(read_login(&mut login), (None, false));
        login.extend_from_slice(&k[6..]);
        login.extend_from_slice(&frame(b'Z', b"I"));
        assert_eq!(read_login(&mut login), (Some((4242, 7)), true));
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
            let greeting = Greeting {
                reported: [("server_version", "17.2"), ("TimeZone", "Etc/UTC")]
                    .map(|(name, value)| (name.to_owned(), value.to_owned()))
                    .into(),
                pid: 4242,
            };
            lend_out(listener, &mut backend, "right", &greeting, &lending_dir).await
        });

        let (_, kind, body) = log_in(&socket, "wrong").await;
        assert_eq!(kind, b'E');
        assert!(String::from_utf8_lossy(&body).contains("28P01"));

        // Logged in at once, greeted as the control connection was: no round trip to the
        // session.
        let (mut client, kind, body) = log_in(&socket, "right").await;
        assert_eq!(
            (kind, body),
            (b'R', 0i32.to_be_bytes().to_vec()),
            "logged in"
        );
        for expected in [&b"server_version\x0017.2\0"[..], b"TimeZone\0Etc/UTC\0"] {
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

        // The session got the startup's settings it lacks (UTC under another name is UTC)
        // ahead of anything of the client's; of its answer the client sees only what the
        // settings changed.
        let (kind, body) = read_frame(&mut server).await.unwrap();
        let sql = String::from_utf8_lossy(&body).into_owned();
        assert_eq!(kind, b'Q');
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
        let mut answer = message(b'T', b"\0\0");
        answer.extend(data_row(&["t_1,public"]));
        answer.extend(message(b'S', b"DateStyle\0ISO, MDY\0"));
        answer.extend(message(b'C', b"SELECT 1\0"));
        answer.extend(message(b'Z', b"I"));
        server.write_all(&answer).await.unwrap();
        assert_eq!(
            read_frame(&mut client).await.unwrap(),
            (b'S', b"DateStyle\0ISO, MDY\0".to_vec())
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

    /// A client that connects and says nothing holds nobody up: the right client logs in
    /// without waiting out the silent one's login timeout (served one after the other, it
    /// waited `LOGIN_TIMEOUT`, 5 s, first).
    #[tokio::test]
    async fn a_silent_client_ahead_of_sqlx_delays_nobody() {
        let dir =
            std::env::temp_dir().join(format!("pgharness-test-{}", uuid::Uuid::new_v4().simple()));
        let listener = listen(&dir).unwrap();
        let socket = dir.join(format!(".s.PGSQL.{PORT}"));
        let (_server, backend) = tokio::io::duplex(64 * 1024);
        let lending_dir = dir.clone();
        let _lent = tokio::spawn(async move {
            let mut backend = backend;
            let greeting = Greeting {
                reported: Vec::new(),
                pid: 1,
            };
            lend_out(listener, &mut backend, "right", &greeting, &lending_dir).await
        });
        let _silent = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let logged_in = tokio::time::timeout(LOGIN_TIMEOUT / 2, log_in(&socket, "right")).await;
        let (_, kind, body) = logged_in.expect("held up by the silent client");
        assert_eq!((kind, body), (b'R', 0i32.to_be_bytes().to_vec()));
    }
}
