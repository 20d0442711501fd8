//! The data channel's reliability layer (ssm-protocol.md §4), sans IO: sequencing,
//! selective acknowledgements, re-acking duplicates, out-of-order buffering, retransmission
//! with an RFC 6298-style RTO, and backpressure instead of evicting unacknowledged data.
//!
//! Time comes in as `now`; frames go out through `poll_transmit`; what the peer sent comes
//! out, in order, through `poll_event`. Both ends use it: `Role::Client` sends
//! `input_stream_data`, `Role::Agent` sends `output_stream_data`.
//!
//! Where the official client falls short, this does not copy it: duplicates are re-acked,
//! unacknowledged data is never evicted (`send` refuses instead), every message past its RTO
//! is resent on a tick (not only the oldest), and sends survive a reconnect.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::message::{self, DecodeError, FLAG_SYN, Message, PayloadType};
use crate::payload::{Acknowledge, ChannelClosed};

/// The retransmission timer's period.
pub const TICK: Duration = Duration::from_millis(100);
const INITIAL_RTT: Duration = Duration::from_millis(100);
const INITIAL_RTO: Duration = Duration::from_millis(200);
const MAX_RTO: Duration = Duration::from_secs(1);
const MIN_RTTVAR_TERM: Duration = Duration::from_millis(10);
/// At most this many messages are resent per tick.
const RESEND_PER_TICK: usize = 256;

/// Which end this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// The session-manager-plugin side.
    Client,
    /// The agent side (fake-aws).
    Agent,
}

/// What the peer sent, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A stream-data message, delivered exactly once and in sequence.
    Stream {
        /// Its payload type.
        payload_type: PayloadType,
        /// Its payload.
        payload: Vec<u8>,
    },
    /// `channel_closed`: the session is over.
    ChannelClosed(ChannelClosed),
    /// `pause_publication` (the agent should stop sending; clients may ignore it).
    PausePublication,
    /// `start_publication`.
    StartPublication,
    /// A frame that failed validation; it was dropped without an acknowledgement.
    Malformed(DecodeError),
    /// The peer acknowledged the stream-data message with this sequence number, for the
    /// first time. Reported in arrival order among the other events, which is what a
    /// basic-mode client needs: the protocol has no connection id there, and the agent's
    /// ack of a new connection's first message is the one mark in its output that comes
    /// after every byte of the previous connection (ssm-protocol.md §6).
    Acknowledged(i64),
}

/// `send` refused: too much is unacknowledged. Wait for acks (`can_send`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0} messages are unacknowledged; wait for acknowledgements")]
pub struct Backpressure(pub usize);

#[derive(Debug)]
struct Sent {
    frame: Vec<u8>,
    sent_at: Instant,
    resent: bool,
}

/// One end of a data channel.
#[derive(Debug)]
pub struct DataChannel {
    role: Role,
    started: Instant,
    started_unix_ms: u64,
    ids: u64,
    next_seq: i64,
    expected: i64,
    sent: BTreeMap<i64, Sent>,
    received: BTreeMap<i64, (PayloadType, Vec<u8>)>,
    transmit: VecDeque<Vec<u8>>,
    events: VecDeque<Event>,
    rtt: Duration,
    rttvar: Duration,
    rto: Duration,
    next_tick: Option<Instant>,
    max_unacked: usize,
    resends: u64,
}

impl DataChannel {
    /// A channel starting at `now`, when the wall clock reads `unix_ms`; `seed` makes
    /// message ids reproducible. At most `max_unacked` messages may be in flight.
    pub fn new(
        role: Role,
        now: Instant,
        unix_ms: u64,
        seed: u64,
        max_unacked: usize,
    ) -> DataChannel {
        DataChannel {
            role,
            started: now,
            started_unix_ms: unix_ms.max(1),
            ids: seed,
            next_seq: 0,
            expected: 0,
            sent: BTreeMap::new(),
            received: BTreeMap::new(),
            transmit: VecDeque::new(),
            events: VecDeque::new(),
            rtt: INITIAL_RTT,
            rttvar: Duration::ZERO,
            rto: INITIAL_RTO,
            next_tick: None,
            max_unacked: max_unacked.max(1),
            resends: 0,
        }
    }

    fn outgoing_type(&self) -> &'static str {
        match self.role {
            Role::Client => message::INPUT_STREAM_DATA,
            Role::Agent => message::OUTPUT_STREAM_DATA,
        }
    }

    fn incoming_type(&self) -> &'static str {
        match self.role {
            Role::Client => message::OUTPUT_STREAM_DATA,
            Role::Agent => message::INPUT_STREAM_DATA,
        }
    }

    fn created(&self, now: Instant) -> u64 {
        self.started_unix_ms + now.saturating_duration_since(self.started).as_millis() as u64
    }

    fn next_id(&mut self) -> Uuid {
        // splitmix64: reproducible, well spread ids; version 4 bits set.
        let mut next = || {
            self.ids = self.ids.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.ids;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let value = ((next() as u128) << 64) | next() as u128;
        uuid::Builder::from_random_bytes(value.to_be_bytes()).into_uuid()
    }

    /// Whether `send` would accept a message now.
    pub fn can_send(&self) -> bool {
        self.sent.len() < self.max_unacked
    }

    /// Messages sent and not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.sent.len()
    }

    /// Messages resent so far.
    pub fn resends(&self) -> u64 {
        self.resends
    }

    /// The current retransmission timeout.
    pub fn rto(&self) -> Duration {
        self.rto
    }

    /// Queues a stream-data message with the next sequence number.
    pub fn send(
        &mut self,
        now: Instant,
        payload_type: PayloadType,
        payload: Vec<u8>,
    ) -> Result<i64, Backpressure> {
        if !self.can_send() {
            return Err(Backpressure(self.sent.len()));
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let id = self.next_id();
        let mut message = Message::new(
            self.outgoing_type(),
            seq,
            payload_type,
            payload,
            self.created(now),
            id,
        );
        if self.role == Role::Agent && seq == 0 {
            message.flags = FLAG_SYN;
        }
        let frame = message.to_bytes();
        self.transmit.push_back(frame.clone());
        self.sent.insert(
            seq,
            Sent {
                frame,
                sent_at: now,
                resent: false,
            },
        );
        self.next_tick.get_or_insert(now + TICK);
        Ok(seq)
    }

    fn acknowledge(&mut self, now: Instant, message: &Message) {
        let ack = Acknowledge {
            acknowledged_message_type: message.message_type.clone(),
            acknowledged_message_id: message.message_id.hyphenated().to_string(),
            acknowledged_message_sequence_number: message.sequence_number,
            is_sequential_message: true,
        };
        let payload = serde_json::to_vec(&ack).unwrap_or_default();
        let id = self.next_id();
        let mut reply = Message::new(
            message::ACKNOWLEDGE,
            0,
            PayloadType::Undefined,
            payload,
            self.created(now),
            id,
        );
        reply.flags = 3;
        self.transmit.push_back(reply.to_bytes());
    }

    /// Takes in one websocket binary frame from the peer.
    pub fn handle_frame(&mut self, now: Instant, frame: &[u8]) {
        let message = match Message::decode(frame) {
            Ok(message) => message,
            Err(error) => {
                self.events.push_back(Event::Malformed(error));
                return;
            }
        };
        match message.message_type.as_str() {
            t if t == self.incoming_type() => self.handle_stream(now, message),
            message::ACKNOWLEDGE => self.handle_ack(now, &message),
            message::CHANNEL_CLOSED => {
                let closed = serde_json::from_slice(&message.payload).unwrap_or(ChannelClosed {
                    message_id: String::new(),
                    created_date: String::new(),
                    destination_id: String::new(),
                    session_id: String::new(),
                    message_type: message::CHANNEL_CLOSED.into(),
                    schema_version: 1,
                    output: String::from_utf8_lossy(&message.payload).into_owned(),
                });
                self.events.push_back(Event::ChannelClosed(closed));
            }
            message::PAUSE_PUBLICATION => self.events.push_back(Event::PausePublication),
            message::START_PUBLICATION => self.events.push_back(Event::StartPublication),
            _ => {} // unknown types are ignored, unacknowledged
        }
    }

    fn handle_stream(&mut self, now: Instant, message: Message) {
        let seq = message.sequence_number;
        // Every stream message is acknowledged, duplicates included (the sender would
        // otherwise resend it for ever).
        self.acknowledge(now, &message);
        if seq < self.expected || self.received.contains_key(&seq) {
            return;
        }
        self.received
            .insert(seq, (message.payload_type, message.payload));
        while let Some((payload_type, payload)) = self.received.remove(&self.expected) {
            self.events.push_back(Event::Stream {
                payload_type,
                payload,
            });
            self.expected += 1;
        }
    }

    fn handle_ack(&mut self, now: Instant, message: &Message) {
        let Ok(ack) = serde_json::from_slice::<Acknowledge>(&message.payload) else {
            return;
        };
        let seq = ack.acknowledged_message_sequence_number;
        let Some(sent) = self.sent.remove(&seq) else {
            return;
        };
        self.events.push_back(Event::Acknowledged(seq));
        if !sent.resent {
            // Karn: only messages sent once give RTT samples.
            let sample = now.saturating_duration_since(sent.sent_at);
            let delta = self.rtt.abs_diff(sample);
            self.rttvar = self.rttvar * 3 / 4 + delta / 4;
            self.rtt = self.rtt * 7 / 8 + sample / 8;
            self.rto = (self.rtt + (self.rttvar * 4).max(MIN_RTTVAR_TERM)).min(MAX_RTO);
        }
        if self.sent.is_empty() {
            self.next_tick = None;
        }
    }

    /// The next frame to write to the websocket.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.transmit.pop_front()
    }

    /// The next thing the peer said.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.next_tick
    }

    /// The retransmission tick: resends every message older than the RTO (oldest first,
    /// a bounded number per tick).
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(tick) = self.next_tick else { return };
        if now < tick {
            return;
        }
        let rto = self.rto;
        let mut resent = 0;
        for sent in self.sent.values_mut() {
            if resent == RESEND_PER_TICK {
                break;
            }
            if now.saturating_duration_since(sent.sent_at) >= rto {
                self.transmit.push_back(sent.frame.clone());
                sent.sent_at = now;
                sent.resent = true;
                resent += 1;
            }
        }
        self.resends += resent as u64;
        self.next_tick = (!self.sent.is_empty()).then_some(now + TICK);
    }

    /// The websocket was replaced (ResumeSession): drop frames queued for the old one and
    /// resend everything unacknowledged, in order. Sequence numbers carry on.
    pub fn reconnected(&mut self, now: Instant) {
        self.transmit.clear();
        for sent in self.sent.values_mut() {
            self.transmit.push_back(sent.frame.clone());
            sent.sent_at = now;
            sent.resent = true;
        }
        if !self.sent.is_empty() {
            self.next_tick = Some(now + TICK);
        }
    }
}
