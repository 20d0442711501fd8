//! Upstream sessions kept across the proxy's clients: each is opened once (a stream through
//! the dialer, TLS verified, an IAM login) and then lent to one client after another, so a
//! client's connection costs no upstream round trip.
//!
//! A client is shown the session's own greeting (its ParameterStatus messages and real
//! BackendKeyData, so cancel requests reach the right backend); its startup parameters
//! (`options=-c…`, `application_name`, …) are applied with one `set_config` statement sent
//! ahead of its first query, whose answer the proxy swallows. When the client leaves, the
//! session goes back only if it is at rest (no query in flight after a short wait for the
//! answers owed, no unsynchronised extended protocol) and a `ROLLBACK` (when a transaction was left open) and `DISCARD ALL` (which also
//! releases advisory locks, so pgharness's owner locks end with the client's connection, as
//! they do without the proxy) succeed; otherwise it is closed.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use postgres_protocol::escape::escape_literal;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_postgres::error::SqlState;
use tokio_rustls::client::TlsStream;

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

/// An upstream session through its login, at rest.
pub(crate) struct Upstream {
    stream: TlsStream<BoxStream>,
    /// From AuthenticationOk to the first ReadyForQuery: what each client is shown.
    greeting: BytesMut,
    database: String,
    _open: OpenGuard,
}

/// Counts a session for as long as it is open.
struct OpenGuard(Arc<AtomicUsize>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The idle sessions, by database, and what happened to sessions so far.
#[derive(Default)]
pub(crate) struct Sessions {
    idle: Mutex<HashMap<String, Vec<Upstream>>>,
    open: Arc<AtomicUsize>,
    /// Upstream logins (sessions opened).
    pub(crate) logins: AtomicU64,
    /// Clients served by an idle session, opened before they came: no upstream round trip
    /// on their path.
    pub(crate) from_pool: AtomicU64,
    /// Sessions closed instead of reused (a client left mid-query, a reset failed).
    pub(crate) discarded: AtomicU64,
}

impl std::fmt::Debug for Sessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sessions")
            .field("open", &self.open.load(Ordering::Relaxed))
            .field("logins", &self.logins.load(Ordering::Relaxed))
            .field("from_pool", &self.from_pool.load(Ordering::Relaxed))
            .finish()
    }
}

impl Sessions {
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
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        let list = idle.entry(upstream.database.clone()).or_default();
        if list.len() < MAX_IDLE {
            list.push(upstream);
        }
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

    /// Sessions open now, idle or lent.
    pub(crate) fn open_now(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Opens a session to `database`: a neutral startup (user, database, UTF8), so that a
    /// reset brings it back to the same defaults for every client.
    pub(crate) async fn open(
        &self,
        target: &RdsTarget,
        database: &str,
        dialer: &dyn Dialer,
        tokens: &TokenCache,
    ) -> Result<Upstream, Error> {
        let mut target = target.clone();
        target.database = database.to_owned();
        let params = [("client_encoding".to_owned(), "UTF8".to_owned())];
        let (stream, greeting) = connect::open_raw(&target, &params, dialer, tokens, &|waiting| {
            tracing::info!("proxy: {waiting}")
        })
        .await?;
        self.open.fetch_add(1, Ordering::Relaxed);
        self.logins.fetch_add(1, Ordering::Relaxed);
        Ok(Upstream {
            stream,
            greeting,
            database: database.to_owned(),
            _open: OpenGuard(self.open.clone()),
        })
    }

    /// Serves one client on `upstream`, then gives the session back if it can be reset.
    pub(crate) async fn serve_client(
        &self,
        client: &mut TcpStream,
        mut upstream: Upstream,
        startup: &[(String, String)],
    ) -> Result<(), Error> {
        let outcome = relay(client, &mut upstream, startup).await;
        match outcome {
            Ok(Some(status)) => {
                match tokio::time::timeout(RESET_TIMEOUT, reset(&mut upstream, status)).await {
                    Ok(Ok(())) => self.give_back(upstream),
                    Ok(Err(error)) => {
                        tracing::info!(%error, "proxy: an upstream session could not be reset; closing it");
                        self.discarded.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        tracing::info!(
                            "proxy: an upstream session took too long to reset; closing it"
                        );
                        self.discarded.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            }
            Ok(None) => {
                self.discarded.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                self.discarded.fetch_add(1, Ordering::Relaxed);
                Err(error)
            }
        }
    }
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
            "options" => settings.extend(parse_options(value)),
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

fn parse_options(options: &str) -> Vec<(String, String)> {
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
    let mut settings = Vec::new();
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        let setting = if word == "-c" {
            words.next()
        } else {
            word.strip_prefix("-c")
                .or_else(|| word.strip_prefix("--"))
                .map(str::to_owned)
        };
        if let Some((name, value)) = setting.as_deref().and_then(|s| s.split_once('=')) {
            settings.push((name.replace('-', "_"), value.to_owned()));
        }
    }
    settings
}

/// Relays one client's session. `Some(status)` when the session ended at rest (the last
/// ReadyForQuery's transaction status), `None` when it did not.
async fn relay(
    client: &mut TcpStream,
    upstream: &mut Upstream,
    startup: &[(String, String)],
) -> Result<Option<u8>, Error> {
    let to_client = |e| Error::io("failed to write to the client", e);
    let to_server = |e| Error::io("failed to write to the server", e);
    client
        .write_all(&upstream.greeting)
        .await
        .map_err(to_client)?;
    // ReadyForQuery messages the server still owes, and how many of them answer the
    // proxy's own statement (swallowed) rather than the client's.
    let (mut owed, mut swallow) = (0usize, 0usize);
    if let Some(statement) = settings_statement(startup) {
        upstream
            .stream
            .write_all(&query(&statement))
            .await
            .map_err(to_server)?;
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
                upstream.stream.write_all(&out).await.map_err(to_server)?;
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

/// Brings a session back to a fresh one's state: `ROLLBACK` when a transaction was left
/// open, then `DISCARD ALL`; both must succeed and leave it idle.
async fn reset(upstream: &mut Upstream, status: u8) -> Result<(), Error> {
    let mut statements = BytesMut::new();
    let mut owed = 1;
    if status != b'I' {
        statements.extend_from_slice(&query("ROLLBACK"));
        owed += 1;
    }
    statements.extend_from_slice(&query("DISCARD ALL"));
    upstream
        .stream
        .write_all(&statements)
        .await
        .map_err(|e| Error::io("failed to reset a session", e))?;
    let mut buffer = BytesMut::new();
    while let Some(frame) = next_frame(&mut upstream.stream, &mut buffer).await? {
        match frame[0] {
            b'E' => return Err(error_of(frame)),
            b'Z' => {
                owed -= 1;
                if owed == 0 {
                    return if frame.get(5) == Some(&b'I') && buffer.is_empty() {
                        Ok(())
                    } else {
                        Err(Error::Protocol(
                            "the session is not idle after its reset".into(),
                        ))
                    };
                }
            }
            _ => {}
        }
    }
    Err(Error::Protocol("the server closed the session".into()))
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
                r"-c search_path=p_1,public -cstatement_timeout=5s --lock-timeout=1s -c x=a\ b"
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
