//! Upstream sessions kept across the proxy's clients: each is opened once (a stream through
//! the dialer, TLS verified, an IAM login, a slot of the [`Budget`] taken) and then lent to
//! one client after another, so a client's connection costs no upstream round trip.
//!
//! A client is shown the session's greeting (its ParameterStatus messages) with a cancel key
//! of the proxy's own in BackendKeyData, mapped to the backend's key while the client holds
//! the session: its cancel requests reach its backend, and a key kept after it left cancels
//! nobody else's query. Its startup parameters (`options=-c…`, `application_name`, …) are
//! applied with one `set_config` statement sent ahead of its first query, whose answer the
//! proxy swallows. When the client leaves, the session goes back only if it is at rest (no
//! query in flight after a short wait for the answers owed, no unsynchronised extended
//! protocol) and one pipelined reset succeeds: `ROLLBACK` (when a transaction was left
//! open), `DISCARD ALL` (which also releases advisory locks, so pgharness's owner locks end
//! with the client's connection, as they do without the proxy) and the slot taken again;
//! otherwise it is closed.
//!
//! The budget (see `budget`): a proxy opens sessions while its share allows; past that a
//! client waits (at most `Budget::wait`) for one to be given back, and the first session a
//! client needs when every slot is held elsewhere polls for one.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use fallible_iterator::FallibleIterator;
use postgres_protocol::escape::escape_literal;
use postgres_protocol::message::backend;
use rand::Rng;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_rustls::client::TlsStream;

use crate::budget::Budget;
use crate::cache::TokenCache;
use crate::connect::{self, RdsTarget, error_of, frame_length, next_frame};
use crate::dialer::{BoxStream, Dialer};
use crate::error::Error;
use crate::wire;

/// The most idle sessions kept per database.
const MAX_IDLE: usize = 32;
/// How long the answers owed to a client that left are waited for before the session is
/// given up.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a reset may take before the session is given up.
const RESET_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a proxy that waits for a slot tries again, and how often one with idle
/// sessions looks for another proxy's waiting flag.
pub(crate) const POLL: Duration = Duration::from_millis(250);

/// A backend's cancel key (process id, secret), as BackendKeyData carries it.
pub(crate) type CancelKey = (i32, i32);

/// An upstream session through its login, at rest, holding a slot of the budget.
pub(crate) struct Upstream {
    stream: TlsStream<BoxStream>,
    /// From AuthenticationOk to the first ReadyForQuery: what each client is shown.
    greeting: BytesMut,
    /// Where the greeting's BackendKeyData carries the backend's cancel key.
    key_at: Option<usize>,
    database: String,
    /// The budget slot (advisory lock) this session holds.
    slot: u32,
    _open: OpenGuard,
}

/// Holds a session's place in the proxy's own share of the budget, counts it as open once
/// it holds a slot, and tells waiting clients when it closes.
struct OpenGuard {
    open: Option<Arc<AtomicUsize>>,
    changed: Arc<Notify>,
    _permit: OwnedSemaphorePermit,
}

impl OpenGuard {
    fn count(&mut self, open: &Arc<AtomicUsize>) {
        open.fetch_add(1, Ordering::Relaxed);
        self.open = Some(open.clone());
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        if let Some(open) = &self.open {
            open.fetch_sub(1, Ordering::Relaxed);
        }
        self.changed.notify_waiters();
    }
}

/// Counts a waiting client for as long as it waits.
pub(crate) struct WaitGuard<'a>(&'a AtomicUsize);

impl Drop for WaitGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The idle sessions, by database, the budget, and what happened to sessions so far.
pub(crate) struct Sessions {
    budget: Budget,
    idle: Mutex<HashMap<String, Vec<Upstream>>>,
    /// This proxy's sessions, open or opening: never more than the whole budget.
    permits: Arc<Semaphore>,
    /// Logins whose session holds no slot yet.
    unslotted: Semaphore,
    /// Told whenever a session is given back or closed.
    changed: Arc<Notify>,
    open: Arc<AtomicUsize>,
    /// Clients waiting for a session now.
    waiting: AtomicUsize,
    /// The cancel keys shown to clients now, and the keys of the backends they hold.
    cancel_keys: Mutex<HashMap<CancelKey, CancelKey>>,
    /// Upstream logins (sessions opened).
    pub(crate) logins: AtomicU64,
    /// Clients served by an idle session, opened before they came: no upstream round trip
    /// on their path.
    pub(crate) from_pool: AtomicU64,
    /// Sessions closed instead of reused (a client left mid-query, a reset failed).
    pub(crate) discarded: AtomicU64,
    /// Clients that had to wait because the budget was all in use.
    pub(crate) waited: AtomicU64,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("budget", &self.budget)
            .field("open", &self.open.load(Ordering::Relaxed))
            .field("logins", &self.logins.load(Ordering::Relaxed))
            .field("from_pool", &self.from_pool.load(Ordering::Relaxed))
            .finish()
    }
}

/// Where a session comes from when none is idle, and whether it may wait for a slot.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Patience {
    /// A spare opened ahead of demand: without a free slot it is closed at once.
    None,
    /// A client's: it waits for a slot until then.
    Until(Instant),
}

impl Sessions {
    pub(crate) fn new(budget: Budget) -> Sessions {
        Sessions {
            budget,
            idle: Mutex::default(),
            permits: Arc::new(Semaphore::new(budget.sessions as usize)),
            unslotted: Semaphore::new(budget.logins_without_slot.max(1) as usize),
            changed: Arc::default(),
            open: Arc::default(),
            waiting: AtomicUsize::new(0),
            cancel_keys: Mutex::default(),
            logins: AtomicU64::new(0),
            from_pool: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            waited: AtomicU64::new(0),
        }
    }

    /// An idle session for `database` whose server has not hung up meanwhile.
    pub(crate) fn take(&self, database: &str) -> Option<Upstream> {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.get_mut(database)?;
        while let Some(mut upstream) = list.pop() {
            if at_rest(&mut upstream.stream) {
                self.from_pool.fetch_add(1, Ordering::Relaxed);
                return Some(upstream);
            }
            self.discarded.fetch_add(1, Ordering::Relaxed);
        }
        None
    }

    /// Whether no idle session for `database` is left.
    pub(crate) fn none_idle(&self, database: &str) -> bool {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(database)
            .is_none_or(Vec::is_empty)
    }

    /// Keeps an idle session (a spare opened ahead of demand, or one reset after a client).
    pub(crate) fn give_back(&self, upstream: Upstream) {
        {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            let list = idle.entry(upstream.database.clone()).or_default();
            if list.len() < MAX_IDLE {
                list.push(upstream);
            }
        }
        self.changed.notify_waiters();
    }

    /// Closes one idle session of a database other than `database`, to make room in the
    /// budget for it; whether there was one.
    fn close_idle_elsewhere(&self, database: &str) -> bool {
        let closed = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.iter_mut()
                .filter(|(name, _)| name.as_str() != database)
                .find_map(|(_, list)| list.pop())
        };
        closed.is_some()
    }

    /// Idle sessions now, all databases.
    pub(crate) fn idle_now(&self) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(Vec::len)
            .sum()
    }

    /// Sessions open now that hold a slot, idle or lent.
    pub(crate) fn open_now(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Clients waiting for a session now.
    pub(crate) fn waiting_now(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Counts a client that waits for a session, until the guard drops.
    pub(crate) fn start_waiting(&self) -> WaitGuard<'_> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.waited.fetch_add(1, Ordering::Relaxed);
        WaitGuard(&self.waiting)
    }

    /// A session for a client of `database`: an idle one, else a new one while the budget
    /// allows, else the first one given back. A client waits at most the budget's `wait`.
    pub(crate) async fn lease(
        &self,
        target: &RdsTarget,
        database: &str,
        dialer: &dyn Dialer,
        tokens: &TokenCache,
    ) -> Result<Upstream, Error> {
        let deadline = Instant::now() + self.budget.wait;
        let mut waiting: Option<WaitGuard<'_>> = None;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if let Some(upstream) = self.take(database) {
                return Ok(upstream);
            }
            if let Ok(permit) = self.permits.clone().try_acquire_owned() {
                drop(waiting);
                return self
                    .open(
                        target,
                        database,
                        dialer,
                        tokens,
                        permit,
                        Patience::Until(deadline),
                    )
                    .await;
            }
            if self.close_idle_elsewhere(database) {
                continue;
            }
            if waiting.is_none() {
                waiting = Some(self.start_waiting());
                tracing::info!(
                    sessions = self.budget.sessions,
                    "proxy: all of this proxy's upstream sessions are lent; a client waits for one"
                );
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(self.exhausted());
            }
        }
    }

    /// A spare session for `database`, opened ahead of demand when the budget allows.
    pub(crate) async fn open_spare(
        &self,
        target: &RdsTarget,
        database: &str,
        dialer: &dyn Dialer,
        tokens: &TokenCache,
    ) -> Result<Option<Upstream>, Error> {
        let Ok(permit) = self.permits.clone().try_acquire_owned() else {
            return Ok(None);
        };
        match self
            .open(target, database, dialer, tokens, permit, Patience::None)
            .await
        {
            Ok(upstream) => Ok(Some(upstream)),
            Err(Error::BudgetExhausted { .. }) => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn exhausted(&self) -> Error {
        Error::BudgetExhausted {
            sessions: self.budget.sessions,
            asked: 1,
            waited: self.budget.wait,
        }
    }

    /// Opens a session to `database` and takes a slot for it: a neutral startup (user,
    /// database, UTF8), so that a reset brings it back to the same defaults for every client.
    async fn open(
        &self,
        target: &RdsTarget,
        database: &str,
        dialer: &dyn Dialer,
        tokens: &TokenCache,
        permit: OwnedSemaphorePermit,
        patience: Patience,
    ) -> Result<Upstream, Error> {
        let _unslotted = self
            .unslotted
            .acquire()
            .await
            .map_err(|_| Error::Protocol("the proxy is shutting down".into()))?;
        let mut target = target.clone();
        target.database = database.to_owned();
        let params = [("client_encoding".to_owned(), "UTF8".to_owned())];
        let (mut stream, greeting) =
            connect::open_raw(&target, &params, dialer, tokens, &|waiting| {
                tracing::info!("proxy: {waiting}")
            })
            .await?;
        self.logins.fetch_add(1, Ordering::Relaxed);
        let mut guard = OpenGuard {
            open: None,
            changed: self.changed.clone(),
            _permit: permit,
        };
        let first = rand::rng().random_range(1..=self.budget.sessions);
        let mut flagged = false;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (slot, _) = claim(&mut stream, &self.budget, first).await?;
            if let Some(slot) = slot {
                guard.count(&self.open);
                if flagged {
                    run(&mut stream, &self.budget.lower_flag()).await?;
                }
                return Ok(Upstream {
                    key_at: key_offset(&greeting),
                    stream,
                    greeting,
                    database: database.to_owned(),
                    slot,
                    _open: guard,
                });
            }
            let Patience::Until(deadline) = patience else {
                return Err(self.exhausted());
            };
            if !flagged {
                run(&mut stream, &self.budget.raise_flag()).await?;
                flagged = true;
                tracing::info!(
                    sessions = self.budget.sessions,
                    "proxy: every slot of the cluster's session budget is held (by other proxies \
                     sharing it); waiting for one"
                );
            }
            if Instant::now() >= deadline {
                return Err(self.exhausted());
            }
            // A session of this proxy given back meanwhile serves as well.
            let poll = tokio::time::sleep_until(deadline.min(Instant::now() + POLL));
            tokio::select! {
                () = poll => {}
                () = changed => {
                    if let Some(upstream) = self.take(database) {
                        return Ok(upstream);
                    }
                }
            }
        }
    }

    /// Serves one client on `upstream`, then gives the session back if it can be reset (and
    /// no other proxy waits for its slot).
    pub(crate) async fn serve_client(
        &self,
        client: &mut TcpStream,
        mut upstream: Upstream,
        startup: &[(String, String)],
    ) -> Result<(), Error> {
        let shown = self.lend_cancel_key(upstream.key());
        let outcome = relay(client, &mut upstream, startup, shown).await;
        if let Some(shown) = shown {
            self.cancel_keys
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&shown);
        }
        let reason = match outcome {
            Ok(Some(status)) => {
                match tokio::time::timeout(
                    RESET_TIMEOUT,
                    reset(&mut upstream, status, &self.budget),
                )
                .await
                {
                    Ok(Ok(Reset::Kept)) => {
                        self.give_back(upstream);
                        return Ok(());
                    }
                    Ok(Ok(Reset::OthersWait)) if self.waiting_now() > 0 => {
                        self.give_back(upstream);
                        return Ok(());
                    }
                    // Not counted as discarded: the slot goes to another proxy's client.
                    Ok(Ok(Reset::OthersWait)) => return Ok(()),
                    Ok(Ok(Reset::SlotLost)) => "lost its budget slot",
                    Ok(Err(error)) => {
                        tracing::info!(%error, "proxy: an upstream session could not be reset; closing it");
                        "could not be reset"
                    }
                    Err(_) => "took too long to reset",
                }
            }
            Ok(None) => "was left mid-statement",
            Err(error) => {
                self.discarded.fetch_add(1, Ordering::Relaxed);
                return Err(error);
            }
        };
        tracing::debug!("proxy: an upstream session {reason}; closing it");
        self.discarded.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// A key of the proxy's own for the client to cancel with, mapped to the backend's for
    /// as long as the client holds the session: a key kept after it left cancels nothing.
    fn lend_cancel_key(&self, backend: Option<CancelKey>) -> Option<CancelKey> {
        let backend = backend?;
        let mut keys = self.cancel_keys.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let shown: CancelKey = (rand::rng().random_range(1..i32::MAX), rand::rng().random());
            if let std::collections::hash_map::Entry::Vacant(entry) = keys.entry(shown) {
                entry.insert(backend);
                return Some(shown);
            }
        }
    }

    /// The backend key behind a key shown to a client now.
    pub(crate) fn backend_key(&self, shown: CancelKey) -> Option<CancelKey> {
        self.cancel_keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&shown)
            .copied()
    }

    /// Gives the slots of idle sessions back when another proxy waits for one: looks for a
    /// waiting flag through one idle session, and closes every idle session if one is up
    /// (unless a client of this proxy waits too).
    pub(crate) async fn yield_to_waiting_proxies(&self) {
        let probe = {
            let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
            idle.values_mut().find_map(Vec::pop)
        };
        let Some(mut probe) = probe else { return };
        let sql = format!("SELECT {}", self.budget.others_waiting());
        let answer = tokio::time::timeout(RESET_TIMEOUT, query_row(&mut probe.stream, &sql)).await;
        match answer {
            Ok(Ok(row)) if row.first().and_then(Option::as_deref) == Some("t") => {
                if self.waiting_now() == 0 {
                    let closed: Vec<Upstream> = self
                        .idle
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .values_mut()
                        .flat_map(std::mem::take)
                        .collect();
                    tracing::info!(
                        sessions = closed.len() + 1,
                        "proxy: another proxy waits for a session slot; closing idle sessions"
                    );
                } else {
                    self.give_back(probe);
                }
            }
            Ok(Ok(_)) => self.give_back(probe),
            Ok(Err(error)) => {
                tracing::debug!(%error, "proxy: an idle session failed its check; closing it");
                self.discarded.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.discarded.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Where the cancel key (process id, secret) of a greeting's BackendKeyData starts.
fn key_offset(greeting: &[u8]) -> Option<usize> {
    let mut at = 0;
    while let Ok(Some(length)) = frame_length(&greeting[at..]) {
        if greeting[at] == b'K' && length == 13 {
            return Some(at + 5);
        }
        at += length;
    }
    None
}

impl Upstream {
    /// The backend's own cancel key.
    fn key(&self) -> Option<CancelKey> {
        let key = self.greeting.get(self.key_at?..)?;
        let word = |i: usize| key.get(i..i + 4)?.try_into().ok().map(i32::from_be_bytes);
        Some((word(0)?, word(4)?))
    }

    /// The greeting a client is shown: the backend's key replaced by `shown`.
    fn greeting_with_key(&self, shown: Option<CancelKey>) -> BytesMut {
        let mut greeting = self.greeting.clone();
        if let (Some(at), Some((pid, secret))) = (self.key_at, shown) {
            greeting[at..at + 4].copy_from_slice(&pid.to_be_bytes());
            greeting[at + 4..at + 8].copy_from_slice(&secret.to_be_bytes());
        }
        greeting
    }
}

/// Sends `statements` to a session at rest in one write (one round trip) and reads every
/// answer: the first row any of them returned, as text, and the transaction status of the
/// last ReadyForQuery. The first error ends it (the caller closes the session).
async fn pipeline(
    stream: &mut TlsStream<BoxStream>,
    statements: &[&str],
) -> Result<(Vec<Option<String>>, u8), Error> {
    let mut out = BytesMut::new();
    for sql in statements {
        out.extend_from_slice(&query(sql));
    }
    stream
        .write_all(&out)
        .await
        .map_err(|e| Error::io("failed to write to the server", e))?;
    stream
        .flush()
        .await
        .map_err(|e| Error::io("failed to write to the server", e))?;
    let mut buffer = BytesMut::new();
    let mut row = None;
    let mut owed = statements.len();
    while let Some(frame) = next_frame(stream, &mut buffer).await? {
        match frame[0] {
            b'E' => return Err(error_of(frame)),
            b'D' if row.is_none() => row = Some(data_row(frame)?),
            b'Z' => {
                owed -= 1;
                if owed > 0 {
                    continue;
                }
                if !buffer.is_empty() {
                    return Err(Error::Protocol(
                        "the server said more than it was asked".into(),
                    ));
                }
                let status = frame.get(5).copied().unwrap_or(b'E');
                return Ok((row.unwrap_or_default(), status));
            }
            _ => {}
        }
    }
    Err(Error::Protocol("the server closed the session".into()))
}

/// Runs one statement on a session at rest and returns its first row's values as text.
async fn query_row(
    stream: &mut TlsStream<BoxStream>,
    sql: &str,
) -> Result<Vec<Option<String>>, Error> {
    pipeline(stream, &[sql]).await.map(|(row, _)| row)
}

/// Runs one statement on a session at rest, for its effect.
async fn run(stream: &mut TlsStream<BoxStream>, sql: &str) -> Result<(), Error> {
    query_row(stream, sql).await.map(drop)
}

/// A DataRow's values as text.
fn data_row(frame: BytesMut) -> Result<Vec<Option<String>>, Error> {
    let backend::Message::DataRow(body) = connect::parse(frame)? else {
        return Err(Error::Protocol("a row that is not a DataRow".into()));
    };
    let buffer = body.buffer();
    body.ranges()
        .map(|range| Ok(range.map(|r| String::from_utf8_lossy(&buffer[r]).into_owned())))
        .collect()
        .map_err(|e| Error::Protocol(format!("a malformed row: {e}")))
}

/// Takes a slot for a session at rest (its own `first`, else the next free one): the slot,
/// if any was free, and whether another proxy waits for one.
async fn claim(
    stream: &mut TlsStream<BoxStream>,
    budget: &Budget,
    first: u32,
) -> Result<(Option<u32>, bool), Error> {
    let row = query_row(stream, &budget.claim_statement(first)).await?;
    claimed(&row)
}

fn claimed(row: &[Option<String>]) -> Result<(Option<u32>, bool), Error> {
    let unexpected = || Error::Protocol(format!("an unexpected answer to the slot claim: {row:?}"));
    let slot = match row.first().ok_or_else(unexpected)? {
        Some(slot) => Some(slot.parse().map_err(|_| unexpected())?),
        None => None,
    };
    let others_wait = row.get(1).ok_or_else(unexpected)?.as_deref() == Some("t");
    Ok((slot, others_wait))
}

/// Whether an idle session's stream has nothing to say (an idle server says nothing; a
/// closed or broken one would be readable).
fn at_rest(stream: &mut TlsStream<BoxStream>) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    let mut byte = [0u8; 1];
    let mut buffer = ReadBuf::new(&mut byte);
    matches!(
        Pin::new(stream).poll_read(&mut cx, &mut buffer),
        Poll::Pending
    )
}

/// A simple-protocol Query message.
fn query(sql: &str) -> BytesMut {
    let mut frame = BytesMut::new();
    frame.put_u8(b'Q');
    frame.put_u32(sql.len() as u32 + 5);
    frame.put_slice(sql.as_bytes());
    frame.put_u8(0);
    frame
}

/// The client's startup parameters as one statement, or `None` when there are none.
/// `options` (`-c name=value`, `--name=value`, `\ ` for a space) is unfolded.
fn settings_statement(startup: &[(String, String)]) -> Option<String> {
    let mut settings: Vec<(String, String)> = Vec::new();
    for (name, value) in startup {
        match name.as_str() {
            "user" | "database" | "replication" => {}
            // The lease is the proxy's (`leases`), not a setting for the server.
            "options" => settings.extend(
                parse_options(value)
                    .into_iter()
                    .filter(|(name, _)| name != crate::leases::LEASE_OPTION),
            ),
            _ => settings.push((name.clone(), value.clone())),
        }
    }
    if settings.is_empty() {
        return None;
    }
    let calls: Vec<String> = settings
        .iter()
        .map(|(name, value)| {
            format!(
                "pg_catalog.set_config({}, {}, false)",
                escape_literal(name),
                escape_literal(value)
            )
        })
        .collect();
    Some(format!("SELECT {}", calls.join(", ")))
}

pub(crate) fn parse_options(options: &str) -> Vec<(String, String)> {
    pg_wire::startup::option_settings(options)
}

/// Relays one client's session. `Some(status)` when the session ended at rest (the last
/// ReadyForQuery's transaction status), `None` when it did not.
async fn relay(
    client: &mut TcpStream,
    upstream: &mut Upstream,
    startup: &[(String, String)],
    shown: Option<CancelKey>,
) -> Result<Option<u8>, Error> {
    let to_client = |e| Error::io("failed to write to the client", e);
    let to_server = |e| Error::io("failed to write to the server", e);
    client
        .write_all(&upstream.greeting_with_key(shown))
        .await
        .map_err(to_client)?;
    client.flush().await.map_err(to_client)?;
    // ReadyForQuery messages the server still owes, and how many of them answer the
    // proxy's own statement (swallowed) rather than the client's.
    let (mut owed, mut swallow) = (0usize, 0usize);
    if let Some(statement) = settings_statement(startup) {
        upstream
            .stream
            .write_all(&query(&statement))
            .await
            .map_err(to_server)?;
        upstream.stream.flush().await.map_err(to_server)?;
        (owed, swallow) = (1, 1);
    }
    let mut unsynced = false;
    let mut status = b'I';
    let (mut from_client, mut from_server) = (BytesMut::new(), BytesMut::new());
    loop {
        tokio::select! {
            read = client.read_buf(&mut from_client) => {
                if read.map_err(|e| Error::io("failed to read from the client", e))? == 0 {
                    break;
                }
                let mut out = BytesMut::new();
                let mut terminated = false;
                while let Some(length) = frame_length(&from_client)? {
                    let frame = from_client.split_to(length);
                    match frame[0] {
                        b'X' => {
                            terminated = true;
                            break;
                        }
                        b'Q' | b'F' => owed += 1,
                        b'S' => {
                            owed += 1;
                            unsynced = false;
                        }
                        b'P' | b'B' | b'E' | b'D' | b'C' | b'H' => unsynced = true,
                        _ => {}
                    }
                    out.extend_from_slice(&frame);
                }
                // Flushed, or the TLS records the write made can wait in rustls's buffer
                // for a write that never comes (a COPY's last data and CopyDone, when the
                // tunnel's window was full): the server then waits for ever.
                upstream.stream.write_all(&out).await.map_err(to_server)?;
                upstream.stream.flush().await.map_err(to_server)?;
                if terminated {
                    break;
                }
            }
            read = upstream.stream.read_buf(&mut from_server) => {
                if read.map_err(|e| Error::io("failed to read from the server", e))? == 0 {
                    return Err(Error::Protocol("the server closed the session".into()));
                }
                let mut out = BytesMut::new();
                while let Some(length) = frame_length(&from_server)? {
                    let frame = from_server.split_to(length);
                    if frame[0] == b'Z' {
                        owed = owed.saturating_sub(1);
                        status = frame.get(5).copied().unwrap_or(b'E');
                    }
                    if swallow == 0 {
                        out.extend_from_slice(&frame);
                        continue;
                    }
                    match frame[0] {
                        // A changed reported parameter: the client should know it.
                        b'S' => out.extend_from_slice(&frame),
                        b'E' => {
                            let error = error_of(frame);
                            let message = format!("a startup parameter could not be applied: {error}");
                            let _ = client
                                .write_all(&wire::error_response("FATAL", SqlState::INVALID_PARAMETER_VALUE.code(), &message))
                                .await;
                            return Ok(None);
                        }
                        b'Z' => swallow -= 1,
                        _ => {}
                    }
                }
                client.write_all(&out).await.map_err(to_client)?;
                client.flush().await.map_err(to_client)?;
            }
        }
    }
    // A client that leaves right after its last statement (a teardown sent without
    // waiting) leaves answers owed: wait for them briefly, as the server finishes the
    // statement anyway; a longer one costs the session.
    if owed > 0 && !unsynced {
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some(frame) = next_frame(&mut upstream.stream, &mut from_server).await? {
                if frame[0] == b'Z' {
                    owed -= 1;
                    status = frame.get(5).copied().unwrap_or(b'E');
                    if owed == 0 {
                        return Ok::<bool, Error>(from_server.is_empty());
                    }
                }
            }
            Ok(false)
        })
        .await;
        return Ok(matches!(drained, Ok(Ok(true))).then_some(status));
    }
    let at_rest = owed == 0 && !unsynced && from_server.is_empty();
    Ok(at_rest.then_some(status))
}

/// What a reset left.
enum Reset {
    /// At rest, holding a slot: ready for the next client.
    Kept,
    /// At rest, holding a slot, and another proxy waits for one.
    OthersWait,
    /// Another proxy took every free slot in the instant `DISCARD ALL` had released this
    /// session's.
    SlotLost,
}

/// Brings a session back to a fresh one's state: `ROLLBACK` when a transaction was left
/// open, then `DISCARD ALL`, then its slot taken again (`DISCARD ALL` released it), all in
/// one round trip; each must succeed and leave it idle.
async fn reset(upstream: &mut Upstream, status: u8, budget: &Budget) -> Result<Reset, Error> {
    let claim = budget.claim_statement(upstream.slot);
    let statements: &[&str] = if status == b'I' {
        &["DISCARD ALL", &claim]
    } else {
        &["ROLLBACK", "DISCARD ALL", &claim]
    };
    let (row, status) = pipeline(&mut upstream.stream, statements).await?;
    if status != b'I' {
        return Err(Error::Protocol(
            "the session is not idle after its reset".into(),
        ));
    }
    let (slot, others_wait) = claimed(&row)?;
    Ok(match slot {
        None => Reset::SlotLost,
        Some(slot) => {
            upstream.slot = slot;
            if others_wait {
                Reset::OthersWait
            } else {
                Reset::Kept
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_options_become_one_statement() {
        let startup = [
            ("user".to_owned(), "app".to_owned()),
            ("database".to_owned(), "db".to_owned()),
            ("application_name".to_owned(), "it's".to_owned()),
            (
                "options".to_owned(),
                r"-c search_path=p_1,public -cstatement_timeout=5s --lock-timeout=1s -c x=a\ b -cpgharness.lease=t:3"
                    .to_owned(),
            ),
        ];
        assert_eq!(
            settings_statement(&startup).unwrap(),
            "SELECT pg_catalog.set_config('application_name', 'it''s', false), \
             pg_catalog.set_config('search_path', 'p_1,public', false), \
             pg_catalog.set_config('statement_timeout', '5s', false), \
             pg_catalog.set_config('lock_timeout', '1s', false), \
             pg_catalog.set_config('x', 'a b', false)"
        );
        assert_eq!(settings_statement(&startup[..2]), None);
    }

    #[test]
    fn frames_are_found_whole_or_not_at_all() {
        let frame = query("SELECT 1");
        assert_eq!(frame_length(&frame[..4]).unwrap(), None);
        assert_eq!(frame_length(&frame[..frame.len() - 1]).unwrap(), None);
        assert_eq!(frame_length(&frame).unwrap(), Some(frame.len()));
        assert!(frame_length(&[b'Q', 0, 0, 0, 2]).is_err());
    }
}
