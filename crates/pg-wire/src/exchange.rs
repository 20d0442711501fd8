//! What a Postgres session owes its client, read off the bytes that pass, sans IO: the
//! answers (ReadyForQuery) still to come for what the client sent, whether a COPY from the
//! client is open, and whether the client's stream stopped in the middle of a message.
//!
//! pgharness's control connection gate feeds it every byte tokio-postgres writes and reads,
//! so that a teardown sent on the same session goes out only once the session is at rest:
//! after the answers to a dropped statement's Close and Sync, say, which the server would
//! otherwise flush to a client that has exited, and die of it before it ran the teardown.
//!
//! Messages are never buffered: a [`Scanner`] keeps a message's 5-byte header and skips its
//! body, so a 1 GB DataRow costs nothing.

use std::collections::VecDeque;

/// What a [`Scanner`] sees pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// A message of this type begins (its header is whole).
    Message(u8),
    /// The first byte of the body of a message of this type.
    FirstByte(u8, u8),
}

/// Walks a stream of typed messages (after the startup packet), one byte slice at a time.
#[derive(Clone, Debug, Default)]
pub struct Scanner {
    header: [u8; 5],
    /// Header bytes seen of the current message (0 between messages).
    have: usize,
    /// Body bytes of the current message still to come.
    skip: usize,
    /// The current message's type, and whether its first body byte is still to come.
    kind: u8,
    first_pending: bool,
}

impl Scanner {
    /// Feeds `bytes`, saying what it sees to `on`.
    pub fn feed(&mut self, mut bytes: &[u8], mut on: impl FnMut(Seen)) {
        while !bytes.is_empty() {
            if self.skip > 0 {
                if self.first_pending {
                    on(Seen::FirstByte(self.kind, bytes[0]));
                    self.first_pending = false;
                }
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (5 - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == 5 {
                let length = i32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.have = 0;
                self.kind = self.header[0];
                self.skip = usize::try_from(length).unwrap_or(0).saturating_sub(4);
                self.first_pending = self.skip > 0;
                on(Seen::Message(self.kind));
            }
        }
    }

    /// Whether the stream is between two messages.
    pub fn at_boundary(&self) -> bool {
        self.have == 0 && self.skip == 0
    }

    /// How many more bytes may be written before the stream is at a boundary or, inside a
    /// header, before the message's length is known: 0 at a boundary.
    pub fn rest(&self) -> usize {
        if self.have > 0 {
            5 - self.have
        } else {
            self.skip
        }
    }
}

/// The exchanges a client has open on its session.
#[derive(Clone, Debug, Default)]
pub struct Exchange {
    written: Scanner,
    read: Scanner,
    /// One entry per ReadyForQuery owed, oldest first: `b'S'` (a Sync ends an extended
    /// exchange) or `b'Q'`/`b'F'` (a simple Query, a FunctionCall).
    owed: VecDeque<u8>,
    /// The server is waiting for the client's COPY data.
    copy_in: bool,
    /// The transaction status of the last ReadyForQuery (`I`, `T` or `E`).
    status: Option<u8>,
}

impl Exchange {
    /// The client wrote `bytes`.
    pub fn wrote(&mut self, bytes: &[u8]) {
        let owed = &mut self.owed;
        self.written.feed(bytes, |seen| {
            if let Seen::Message(kind @ (b'S' | b'Q' | b'F')) = seen {
                owed.push_back(kind);
            }
        });
    }

    /// The client read `bytes`.
    pub fn read(&mut self, bytes: &[u8]) {
        let (owed, copy_in, status) = (&mut self.owed, &mut self.copy_in, &mut self.status);
        self.read.feed(bytes, |seen| match seen {
            Seen::Message(b'Z') => {
                owed.pop_front();
                *copy_in = false;
            }
            Seen::FirstByte(b'Z', transaction) => *status = Some(transaction),
            // CopyInResponse. A COPY run by an extended exchange ignores the Sync the client
            // sent after its Execute: that exchange's ReadyForQuery comes after the Sync
            // that follows CopyDone or CopyFail.
            Seen::Message(b'G') => {
                *copy_in = true;
                if owed.front() == Some(&b'S') {
                    owed.pop_front();
                }
            }
            _ => {}
        });
    }

    /// How many ReadyForQuery messages the server still owes.
    pub fn owed(&self) -> usize {
        self.owed.len()
    }

    /// Whether the session was in a transaction (or a failed one) at its last ReadyForQuery.
    pub fn in_transaction(&self) -> bool {
        matches!(self.status, Some(b'T' | b'E'))
    }

    /// Whether a COPY from the client is open.
    pub fn copy_in(&self) -> bool {
        self.copy_in
    }

    /// Whether the client's stream is between two messages.
    pub fn written_whole(&self) -> bool {
        self.written.at_boundary()
    }

    /// Bytes the client may still write to end the message it is in (0 at a boundary).
    pub fn rest_of_message(&self) -> usize {
        self.written.rest()
    }

    /// Whether the session is at rest: nothing owed, no COPY open, no message half written.
    pub fn at_rest(&self) -> bool {
        self.owed.is_empty() && !self.copy_in && self.written.at_boundary()
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use postgres_protocol::message::frontend;

    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![kind];
        out.extend_from_slice(&(body.len() as i32 + 4).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    fn ready() -> Vec<u8> {
        message(b'Z', b"I")
    }

    /// Feeds `bytes` one byte at a time, then whole: the outcome must not depend on how the
    /// stream was cut.
    fn read_both_ways(exchange: &Exchange, bytes: &[u8]) -> Exchange {
        let mut whole = exchange.clone();
        whole.read(bytes);
        let mut bytewise = exchange.clone();
        for byte in bytes {
            bytewise.read(std::slice::from_ref(byte));
        }
        assert_eq!(whole.owed(), bytewise.owed());
        assert_eq!(whole.copy_in(), bytewise.copy_in());
        whole
    }

    #[test]
    fn a_dropped_statement_s_close_and_sync_is_owed_until_its_ready_for_query() {
        let mut buf = BytesMut::new();
        frontend::close(b'S', "s1", &mut buf).unwrap();
        frontend::sync(&mut buf);
        let mut exchange = Exchange::default();
        exchange.wrote(&buf);
        assert_eq!(exchange.owed(), 1);
        assert!(!exchange.at_rest());
        let mut answer = message(b'3', b"");
        answer.extend(ready());
        let exchange = read_both_ways(&exchange, &answer);
        assert!(exchange.at_rest());
    }

    #[test]
    fn pipelined_exchanges_are_owed_one_ready_for_query_each() {
        let mut buf = BytesMut::new();
        frontend::query("SELECT 1", &mut buf).unwrap();
        frontend::parse("", "SELECT 2", std::iter::empty(), &mut buf).unwrap();
        frontend::sync(&mut buf);
        let mut exchange = Exchange::default();
        exchange.wrote(&buf);
        assert_eq!(exchange.owed(), 2);
        // A large DataRow passes without being buffered.
        let mut answer = message(b'D', &vec![7; 100_000]);
        answer.extend(ready());
        let exchange = read_both_ways(&exchange, &answer);
        assert_eq!(exchange.owed(), 1);
    }

    #[test]
    fn a_half_written_message_is_not_at_rest_and_says_how_much_is_left() {
        let mut buf = BytesMut::new();
        frontend::query("SELECT 1", &mut buf).unwrap();
        let mut exchange = Exchange::default();
        exchange.wrote(&buf[..3]);
        assert!(!exchange.written_whole());
        assert_eq!(
            exchange.rest_of_message(),
            2,
            "the rest of the header first"
        );
        exchange.wrote(&buf[3..5]);
        assert_eq!(exchange.rest_of_message(), buf.len() - 5);
        exchange.wrote(&buf[5..]);
        assert!(exchange.written_whole());
        assert_eq!(exchange.rest_of_message(), 0);
        assert_eq!(exchange.owed(), 1);
    }

    #[test]
    fn an_extended_copy_in_is_answered_after_the_sync_that_follows_its_copy_done() {
        // tokio-postgres's copy_in: Bind, Execute, Sync; the server's BindComplete and
        // CopyInResponse; CopyData; CopyDone and Sync; then one ReadyForQuery.
        let mut exchange = Exchange::default();
        let mut buf = BytesMut::new();
        frontend::execute("", 0, &mut buf).unwrap();
        frontend::sync(&mut buf);
        exchange.wrote(&buf);
        let mut answer = message(b'2', b"");
        answer.extend(message(b'G', &[0, 0, 0]));
        let mut exchange = read_both_ways(&exchange, &answer);
        assert!(exchange.copy_in());
        assert!(!exchange.at_rest());
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        frontend::sync(&mut buf);
        exchange.wrote(&message(b'd', b"1\n"));
        exchange.wrote(&buf);
        let mut answer = message(b'C', b"COPY 1\0");
        answer.extend(ready());
        let exchange = read_both_ways(&exchange, &answer);
        assert!(exchange.at_rest(), "{exchange:?}");
    }

    #[test]
    fn a_simple_copy_in_is_answered_after_its_copy_done() {
        let mut exchange = Exchange::default();
        let mut buf = BytesMut::new();
        frontend::query("COPY t FROM STDIN", &mut buf).unwrap();
        exchange.wrote(&buf);
        let mut exchange = read_both_ways(&exchange, &message(b'G', &[0, 0, 0]));
        assert_eq!(exchange.owed(), 1);
        let mut buf = BytesMut::new();
        frontend::copy_done(&mut buf);
        exchange.wrote(&buf);
        let exchange = read_both_ways(&exchange, &ready());
        assert!(exchange.at_rest());
    }
}

#[cfg(test)]
mod status {
    use super::*;

    #[test]
    fn the_last_ready_for_query_says_whether_a_transaction_is_open_however_the_bytes_were_cut() {
        let mut bytes = vec![b'Z', 0, 0, 0, 5, b'T'];
        bytes.extend([b'C', 0, 0, 0, 9, b'B', b'E', b'G', b'I', b'N']);
        bytes.extend([b'Z', 0, 0, 0, 5, b'E']);
        for cut in 0..bytes.len() {
            let mut exchange = Exchange::default();
            exchange.read(&bytes[..cut]);
            exchange.read(&bytes[cut..]);
            assert!(exchange.in_transaction(), "cut at {cut}");
            assert_eq!(exchange.status, Some(b'E'), "cut at {cut}");
        }
        let mut exchange = Exchange::default();
        exchange.read(&[b'Z', 0, 0, 0, 5, b'I']);
        assert!(!exchange.in_transaction());
    }
}
