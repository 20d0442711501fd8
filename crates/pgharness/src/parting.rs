//! A teardown sent and not waited for: the statements that finish a test's schema, and
//! Terminate, written on the test's control connection in one write as its `TestDb` drops.
//! The server runs them after the test has moved on (or its process has exited), so the
//! reset of the schema is off the test's path and never waits on anything inside the
//! test's runtime.
//!
//! Written on a duplicate of the connection's socket rather than through tokio-postgres:
//! tokio-postgres sends Terminate only once every answer it is owed has arrived, so a
//! query sent through it and not awaited would still keep the connection (and a process
//! that exits at once would cut it before the query was even written).
//!
//! The message is built here, sans IO ([`message`]); [`Parting::send`] is the one write,
//! made only once the session is at rest: the gate of the client's stream
//! ([`crate::lend::Gate::quiesce`]) stops tokio-postgres's writes at a message boundary and
//! waits until the server owes it no answer (`pg_wire::exchange`). The server flushes an
//! answer (a dropped statement's CloseComplete and ReadyForQuery) as soon as it has one; to a
//! client that has exited by then, that write fails and the server ends the session before
//! it reads the parting behind it. A COPY left open is failed first; a statement still
//! running after a second is cancelled.
//!
//! **What the server sees.** To a server: each statement as Parse, Bind and Execute with no
//! Sync, then Terminate. Without Sync the server sends nothing: its answers wait in its
//! output buffer (a few hundred bytes, never flushed), `COMMIT` commits at its own Execute,
//! and Terminate ends the session without writing them. So a client that is gone by then
//! costs no `could not send data to client` line in the server's log, as a simple Query
//! would (its ReadyForQuery is always flushed, and on a Unix socket that write fails once
//! the client has closed). Notices are flushed at once, so the first statement turns them
//! off for the session (`client_min_messages = error`). An error is flushed too, and ends
//! the rest of the message: the finish catches its own errors and records them in the
//! acquire log (`finish_detached` in `ledger.sql`).
//!
//! Through the RDS proxy ([`Shape::Query`]): one simple Query, then Terminate. The proxy
//! keeps its upstream session: it reads the owed ReadyForQuery itself (rds-iam's
//! `DRAIN_TIMEOUT`), and a session left inside an unsynced extended-protocol exchange
//! could not be lent again.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use postgres_protocol::IsNull;
use postgres_protocol::message::frontend;

use crate::lend::{Gate, Quiet};

/// How the parting statements are framed (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Shape {
    /// Parse, Bind, Execute per statement, no Sync: for a server.
    Unsynced,
    /// One simple Query with every statement: for the RDS proxy, which drains its answer.
    Query,
}

/// The bytes of a parting: `statements` framed as `shape` says, then Terminate.
pub(crate) fn message(statements: &[String], shape: Shape) -> std::io::Result<Vec<u8>> {
    let mut buf = BytesMut::new();
    match shape {
        Shape::Unsynced => {
            for statement in statements {
                frontend::parse("", statement, std::iter::empty(), &mut buf)?;
                frontend::bind(
                    "",
                    "",
                    std::iter::empty(),
                    std::iter::empty::<()>(),
                    |(), _| Ok(IsNull::No),
                    std::iter::empty(),
                    &mut buf,
                )
                .map_err(|_| std::io::Error::other("failed to frame a Bind"))?;
                frontend::execute("", 0, &mut buf)?;
            }
        }
        Shape::Query => {
            let joined: Vec<&str> = statements
                .iter()
                .map(|s| s.trim_end().trim_end_matches(';'))
                .collect();
            frontend::query(&format!("{};", joined.join(";\n")), &mut buf)?;
        }
    }
    frontend::terminate(&mut buf);
    Ok(buf.to_vec())
}

/// How long a parting waits for the session to owe its client nothing (the answers to a
/// dropped statement's Close, a query that just finished) before it cancels what runs.
const QUIET_TIMEOUT: Duration = Duration::from_secs(1);

/// How long it waits after a CancelRequest or a CopyFail.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(5);

/// A duplicate of a control connection's socket, kept to write its parting on, and the gate
/// of its client's stream, which says when the session is at rest.
pub(crate) struct Parting {
    socket: OwnedFd,
    gate: Arc<Gate>,
    /// The client's stream is the socket itself (not a relay's in-memory stream), so that
    /// the parting may write on it in the client's place (a CopyFail).
    direct: bool,
    unix: bool,
}

impl std::fmt::Debug for Parting {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parting")
            .field("socket", &self.socket)
            .field("direct", &self.direct)
            .finish_non_exhaustive()
    }
}

impl Parting {
    /// Keeps a duplicate of `socket` (a connected TCP or Unix stream, `unix` saying which)
    /// whose client's stream is held at `gate`; `direct` when that stream is the socket.
    pub(crate) fn of(
        socket: &impl AsFd,
        gate: Arc<Gate>,
        direct: bool,
        unix: bool,
    ) -> std::io::Result<Parting> {
        Ok(Parting {
            socket: socket.as_fd().try_clone_to_owned()?,
            gate,
            direct,
            unix,
        })
    }

    /// Writes `bytes` whole once the session is at rest: the client's writes are stopped at
    /// a message boundary, the answers still owed to it are read (by its connection task,
    /// when `reader_alive`), a COPY it left open is failed and a statement still running
    /// is cancelled. The server would otherwise flush those answers to a client that may
    /// have exited by then, and end the session before it ran the parting.
    ///
    /// The socket is non-blocking (tokio's): a full send buffer is waited for, up to
    /// `timeout`. An error or a timeout means the parting was not (or not wholly) sent, and
    /// the caller must not trust the schema's finish to have been: a later sweep finishes
    /// it once the session is gone.
    pub(crate) fn send(
        self,
        statements: &[String],
        shape: Shape,
        timeout: Duration,
        reader_alive: bool,
    ) -> std::io::Result<()> {
        let first_wait = if reader_alive {
            QUIET_TIMEOUT
        } else {
            Duration::ZERO
        };
        let mut quiet = self.gate.quiesce(first_wait);
        if quiet == Quiet::CopyOpen && self.direct {
            let mut fail = BytesMut::new();
            frontend::copy_fail("the test ended", &mut fail)?;
            frontend::sync(&mut fail);
            self.gate.wrote_on_session(&fail);
            self.write(&fail, timeout)?;
            quiet = self.gate.quiesce(if reader_alive {
                CANCEL_TIMEOUT
            } else {
                Duration::ZERO
            });
        }
        if let Quiet::Owed(_) = quiet
            && reader_alive
        {
            self.cancel();
            quiet = self.gate.quiesce(CANCEL_TIMEOUT);
        }
        match quiet {
            // A transaction the test left open (or failed in) is rolled back first: in a
            // failed one, every statement of the parting would be refused.
            Quiet::AtRest => {
                let rollback = self.gate.in_transaction().then(|| "ROLLBACK".to_owned());
                let statements: Vec<String> = rollback
                    .into_iter()
                    .chain(statements.iter().cloned())
                    .collect();
                self.write(&message(&statements, shape)?, timeout)
            }
            Quiet::CopyOpen => Err(std::io::Error::other(
                "a COPY the test started on its control connection is still open",
            )),
            Quiet::Owed(n) => Err(std::io::Error::other(format!(
                "the server still owes the test's control connection {n} answer(s) (a statement still running, or a connection that stopped reading)"
            ))),
        }
    }

    /// Whether the session was in a transaction when its client last heard from it.
    pub(crate) fn in_transaction(&self) -> bool {
        self.gate.in_transaction()
    }

    /// Asks the server to cancel what the session runs (a CancelRequest on a new connection
    /// to the same server). Best effort: the wait after it says whether it worked.
    fn cancel(&self) {
        let Some((pid, secret)) = self.gate.cancel_key() else {
            return;
        };
        let mut request = BytesMut::new();
        frontend::cancel_request(pid, secret, &mut request);
        let sent = self.socket.try_clone().and_then(|fd| {
            use std::io::Write;
            if self.unix {
                let peer = std::os::unix::net::UnixStream::from(fd).peer_addr()?;
                let path = peer
                    .as_pathname()
                    .ok_or_else(|| std::io::Error::other("the server's socket has no path"))?;
                std::os::unix::net::UnixStream::connect(path)?.write_all(&request)
            } else {
                let peer = std::net::TcpStream::from(fd).peer_addr()?;
                std::net::TcpStream::connect_timeout(&peer, Duration::from_secs(2))?
                    .write_all(&request)
            }
        });
        match sent {
            Ok(()) => tracing::debug!(
                pid,
                "pgharness: cancelled what the test's control session still ran, to part from it"
            ),
            Err(error) => {
                tracing::debug!(pid, %error, "pgharness: failed to cancel what the test's control session still ran")
            }
        }
    }

    /// Writes `bytes` whole on the duplicate, waiting for a full send buffer up to `timeout`.
    fn write(&self, bytes: &[u8], timeout: Duration) -> std::io::Result<()> {
        use nix::errno::Errno;
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let deadline = Instant::now() + timeout;
        let mut rest = bytes;
        while !rest.is_empty() {
            match nix::unistd::write(&self.socket, rest) {
                Ok(n) => rest = &rest[n..],
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(std::io::ErrorKind::TimedOut.into());
                    }
                    let millis = u16::try_from(left.as_millis()).unwrap_or(u16::MAX);
                    let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLOUT)];
                    match poll(&mut fds, PollTimeout::from(millis)) {
                        Ok(_) | Err(Errno::EINTR) => {}
                        Err(errno) => return Err(errno.into()),
                    }
                }
                Err(errno) => return Err(errno.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The messages of a buffer: (tag, body).
    fn frames(mut bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut frames = Vec::new();
        while !bytes.is_empty() {
            let tag = bytes[0];
            let length = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]) as usize;
            frames.push((tag, bytes[5..1 + length].to_vec()));
            bytes = &bytes[1 + length..];
        }
        frames
    }

    #[test]
    fn an_unsynced_parting_is_parse_bind_execute_per_statement_then_terminate_and_no_sync() {
        let statements = [
            "BEGIN".to_owned(),
            "SELECT 1".to_owned(),
            "COMMIT".to_owned(),
        ];
        let bytes = message(&statements, Shape::Unsynced).unwrap();
        let tags: Vec<u8> = frames(&bytes).iter().map(|(tag, _)| *tag).collect();
        assert_eq!(tags, b"PBEPBEPBEX".to_vec());
        let parse = &frames(&bytes)[3];
        // Unnamed statement, the text, no parameter types.
        assert_eq!(parse.1, b"\0SELECT 1\0\0\0".to_vec());
    }

    #[test]
    fn a_query_parting_is_one_simple_query_then_terminate() {
        let statements = [
            "BEGIN;".to_owned(),
            "SELECT 1".to_owned(),
            "COMMIT;".to_owned(),
        ];
        let bytes = message(&statements, Shape::Query).unwrap();
        let frames = frames(&bytes);
        assert_eq!(frames.len(), 2);
        assert_eq!(frames[0].0, b'Q');
        assert_eq!(frames[0].1, b"BEGIN;\nSELECT 1;\nCOMMIT;\0".to_vec());
        assert_eq!(frames[1], (b'X', Vec::new()));
    }

    #[test]
    fn a_parting_is_written_whole_on_the_duplicate() {
        use std::io::Read;
        let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let parting = Parting::of(&ours, Arc::default(), true, true).unwrap();
        drop(ours);
        // Larger than a Unix socket's buffer: the write waits for the reader.
        let statement = format!("SELECT '{}'", "x".repeat(1_000_000));
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            theirs.read_to_end(&mut got).unwrap();
            got
        });
        parting
            .send(
                std::slice::from_ref(&statement),
                Shape::Query,
                Duration::from_secs(10),
                true,
            )
            .unwrap();
        assert_eq!(
            reader.join().unwrap(),
            message(&[statement], Shape::Query).unwrap()
        );
    }
}
