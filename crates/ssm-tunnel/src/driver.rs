//! The session driver: one task that owns the websocket and pumps the sans-IO core
//! (`ssm_proto::channel`, `handshake`, `mux`, `liveness`). Handles talk to it over channels.
//!
//! It never waits on a write: frames go to the link's writer task, and the driver keeps
//! reading (acks, pongs, data) whatever the network does with them. A link that owes an
//! answer and stays silent for `liveness.dead_after` is given up, and the session is resumed
//! on a new websocket, with every call and every wait of the resume under a deadline.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ssm_proto::channel::{DataChannel, Event, Role};
use ssm_proto::handshake::{self, Mode, PortSession};
use ssm_proto::liveness::{Liveness, LivenessAction, LivenessConfig};
use ssm_proto::message::PayloadType;
use ssm_proto::mux::{Mux, MuxEvent};
use ssm_proto::payload::{Flag, HandshakeRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::tungstenite::Message;

use crate::control::{self, SessionGrant};
use crate::error::{Error, humanize};
use crate::stream::TunnelStream;
use crate::websocket::{self, Link};

/// What handles ask of the driver.
pub(crate) enum Command {
    Open(oneshot::Sender<Result<TunnelStream, Error>>),
    Close(oneshot::Sender<()>),
}

enum Local {
    Data(u32, Vec<u8>),
    Eof(u32),
}

struct Stream {
    to_local: mpsc::UnboundedSender<Vec<u8>>,
    refused: Arc<AtomicBool>,
}

/// Counters a test or the CLI can read.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    /// Websocket reconnects (ResumeSession).
    pub(crate) reconnects: std::sync::atomic::AtomicU64,
    /// Streams opened.
    pub(crate) streams: std::sync::atomic::AtomicU64,
    /// Why the session ended, once it has.
    pub(crate) ended: std::sync::Mutex<Option<String>>,
    /// Woken when it ends.
    pub(crate) ended_notify: tokio::sync::Notify,
}

pub(crate) struct Driver {
    pub(crate) ssm: aws_sdk_ssm::Client,
    pub(crate) grant: SessionGrant,
    pub(crate) client_id: String,
    pub(crate) link: Link,
    /// When a link is declared dead.
    pub(crate) liveness: LivenessConfig,
    /// How long a lost link may take to resume before the session is given up.
    pub(crate) resume_for: Duration,
    /// How long one websocket open may take.
    pub(crate) open_deadline: Duration,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) ready: Option<oneshot::Sender<Result<PortSession, Error>>>,
    pub(crate) chunk_size: usize,
    pub(crate) target: Arc<str>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) pending_session: Option<PortSession>,
}

struct State {
    channel: DataChannel,
    liveness: Liveness,
    mux: Mux,
    mode: Option<Mode>,
    streams: HashMap<u32, Stream>,
    pending: VecDeque<(PayloadType, Vec<u8>)>,
    local_tx: mpsc::Sender<Local>,
    basic_active: Option<u32>,
    basic_waiting: VecDeque<oneshot::Sender<Result<TunnelStream, Error>>>,
    next_basic_id: u32,
    basic_boundary: Boundary,
}

/// Basic mode's boundary between one connection and the next (ssm-protocol.md §6). Basic
/// mode has no connection id: after a DisconnectToPort the agent's output can still carry
/// the closed connection's last bytes, in flight or read just before the agent closed its
/// side (a TLS close_notify, a server's goodbye). They are acknowledged (the channel acks
/// everything) and dropped until the agent acknowledges the next connection's first
/// message: the agent acks a message before it dials for it, and its output is in order,
/// so every byte after that ack belongs to the new connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Boundary {
    /// Output belongs to the active connection.
    Clear,
    /// A connection ended; output is the old one's until `first` (the next connection's
    /// first message, once sent) is acknowledged.
    Draining { first: Option<i64> },
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

impl State {
    fn queue(&mut self, payload_type: PayloadType, bytes: &[u8], chunk: usize) {
        for piece in bytes.chunks(chunk.max(1)) {
            self.pending.push_back((payload_type, piece.to_vec()));
        }
    }

    fn send_pending(&mut self) {
        while self.channel.can_send() {
            let Some((payload_type, payload)) = self.pending.pop_front() else {
                break;
            };
            let sent = self.channel.send(Instant::now(), payload_type, payload);
            if let (Ok(seq), PayloadType::Output, Boundary::Draining { first: None }) =
                (sent, payload_type, self.basic_boundary)
            {
                self.basic_boundary = Boundary::Draining { first: Some(seq) };
            }
        }
    }

    /// A stream for the user; its bytes come back to the driver as `Local` events.
    fn attach(&mut self, id: u32, target: &Arc<str>) -> TunnelStream {
        let (user, driver) = tokio::io::duplex(256 * 1024);
        let (mut read, mut write) = tokio::io::split(driver);
        let (to_local, mut from_driver) = mpsc::unbounded_channel::<Vec<u8>>();
        let refused = Arc::new(AtomicBool::new(false));
        tokio::spawn(async move {
            while let Some(bytes) = from_driver.recv().await {
                if write.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            let _ = write.shutdown().await;
        });
        let local_tx = self.local_tx.clone();
        tokio::spawn(async move {
            let mut buffer = vec![0; 32 * 1024];
            loop {
                match read.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        if local_tx
                            .send(Local::Data(id, buffer[..n].to_vec()))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                }
            }
            let _ = local_tx.send(Local::Eof(id)).await;
        });
        self.streams.insert(
            id,
            Stream {
                to_local,
                refused: refused.clone(),
            },
        );
        TunnelStream::new(user, refused, target.clone())
    }
}

impl Driver {
    /// Hands what the channel has for the wire to the link's writer; `false` when the link
    /// can no longer be written.
    fn transmit(&mut self, state: &mut State) -> bool {
        while let Some(frame) = state.channel.poll_transmit() {
            if !self.link.send(Message::Binary(frame.into())) {
                return false;
            }
        }
        !self.link.broken()
    }

    /// ResumeSession and a new websocket, retried with backoff for up to `resume_for` (each
    /// call under its own deadline); unacknowledged data is then resent in order.
    async fn reconnect(&mut self, state: &mut State, why: &str) -> Result<(), Error> {
        tracing::info!(session = %self.grant.session_id, why, "the data channel is lost; resuming");
        let give_up_at = tokio::time::Instant::now() + self.resume_for;
        let mut last = String::from("no attempt finished");
        for attempt in 0u32.. {
            let backoff = Duration::from_millis(100 << attempt.min(5)).min(Duration::from_secs(2));
            if tokio::time::Instant::now() + backoff >= give_up_at {
                break;
            }
            tokio::time::sleep(backoff).await;
            let grant = match control::resume(&self.ssm, &self.grant.session_id).await {
                Ok(grant) => grant,
                Err(error) if error.is_unreachable() || error.is_timeout() => {
                    tracing::debug!(%error, attempt, "ResumeSession failed; trying again");
                    last = error.to_string();
                    continue;
                }
                Err(error) => return Err(error),
            };
            if grant.token.is_empty() {
                return Err(Error::SessionClosed(format!(
                    "Session: {} timed out.",
                    self.grant.session_id
                )));
            }
            // Use the returned StreamUrl when there is one (the official client does not).
            let url = if grant.stream_url.is_empty() {
                self.grant.stream_url.clone()
            } else {
                grant.stream_url.clone()
            };
            match websocket::open(
                &url,
                &grant.token,
                &self.client_id,
                handshake::CLIENT_VERSION,
                self.open_deadline,
            )
            .await
            {
                Ok(link) => {
                    self.link = link;
                    self.grant = SessionGrant {
                        stream_url: url,
                        ..grant
                    };
                    state.channel.reconnected(Instant::now());
                    state.liveness.reset(Instant::now());
                    self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(session = %self.grant.session_id, attempts = attempt + 1, "data channel resumed");
                    return Ok(());
                }
                Err(error) => {
                    tracing::debug!(%error, attempt, "the resumed websocket did not open; trying again");
                    last = error.to_string();
                }
            }
        }
        Err(Error::Channel(format!(
            "could not resume the session within {} ({why}); last: {last}",
            humanize(self.resume_for)
        )))
    }

    fn open_stream(
        &mut self,
        state: &mut State,
        reply: oneshot::Sender<Result<TunnelStream, Error>>,
    ) {
        match state.mode {
            Some(Mode::Mux { .. }) => {
                let id = state.mux.open();
                let stream = state.attach(id, &self.target);
                self.stats.streams.fetch_add(1, Ordering::Relaxed);
                let _ = reply.send(Ok(stream));
            }
            Some(Mode::Basic) if state.basic_active.is_none() => {
                state.next_basic_id += 1;
                let id = state.next_basic_id;
                state.basic_active = Some(id);
                let stream = state.attach(id, &self.target);
                self.stats.streams.fetch_add(1, Ordering::Relaxed);
                let _ = reply.send(Ok(stream));
            }
            Some(Mode::Basic) => state.basic_waiting.push_back(reply),
            None => {
                let _ = reply.send(Err(Error::Channel(
                    "the handshake has not completed".into(),
                )));
            }
        }
    }

    fn handle_local(&mut self, state: &mut State, local: Local) {
        match (state.mode, local) {
            (Some(Mode::Mux { .. }), Local::Data(id, bytes)) => state.mux.write(id, &bytes),
            (Some(Mode::Mux { .. }), Local::Eof(id)) => {
                state.mux.close(id);
                state.streams.remove(&id);
            }
            (Some(Mode::Basic), Local::Data(id, bytes)) if state.basic_active == Some(id) => {
                state.queue(PayloadType::Output, &bytes, self.chunk_size)
            }
            (Some(Mode::Basic), Local::Eof(id)) if state.basic_active == Some(id) => {
                state.streams.remove(&id);
                state.basic_active = None;
                state.queue(
                    PayloadType::Flag,
                    &Flag::DisconnectToPort.to_payload(),
                    self.chunk_size,
                );
                state.basic_boundary = Boundary::Draining { first: None };
                if let Some(next) = state.basic_waiting.pop_front() {
                    self.open_stream(state, next);
                }
            }
            _ => {}
        }
    }

    /// Handles what the agent said; `Err` ends the session.
    fn handle_events(&mut self, state: &mut State) -> Result<(), Error> {
        while let Some(event) = state.channel.poll_event() {
            match event {
                Event::Stream {
                    payload_type: PayloadType::HandshakeRequest,
                    payload,
                } => {
                    let request: HandshakeRequest = serde_json::from_slice(&payload)
                        .map_err(|e| Error::Channel(format!("bad handshake request: {e}")))?;
                    let (response, session) = handshake::respond(&request);
                    state.queue(
                        PayloadType::HandshakeResponse,
                        &serde_json::to_vec(&response).unwrap_or_default(),
                        usize::MAX,
                    );
                    match session {
                        Ok(session) => {
                            state.mode = Some(session.mode);
                            // Ready is announced on HandshakeComplete.
                            self.pending_session = Some(session);
                        }
                        Err(error) => {
                            return Err(Error::Channel(format!(
                                "the agent asked for something else than port forwarding: {error}"
                            )));
                        }
                    }
                }
                Event::Stream {
                    payload_type: PayloadType::HandshakeComplete,
                    payload,
                } => {
                    let complete: ssm_proto::payload::HandshakeComplete = serde_json::from_slice(
                        &payload,
                    )
                    .unwrap_or(ssm_proto::payload::HandshakeComplete {
                        handshake_time_to_complete: 0,
                        customer_message: String::new(),
                    });
                    if !complete.customer_message.is_empty() {
                        tracing::info!(message = %complete.customer_message, "message from the SSM agent");
                    }
                    if let (Some(ready), Some(mut session)) =
                        (self.ready.take(), self.pending_session.clone())
                    {
                        session.customer_message = complete.customer_message;
                        let _ = ready.send(Ok(session));
                    }
                }
                Event::Stream {
                    payload_type: PayloadType::Output,
                    payload,
                } => match state.mode {
                    Some(Mode::Mux { .. }) => {
                        let events = state.mux.handle_input(&payload).map_err(|e| {
                            Error::Channel(format!("broken smux stream from the agent: {e}"))
                        })?;
                        for event in events {
                            match event {
                                MuxEvent::Data(id, bytes) => {
                                    if let Some(stream) = state.streams.get(&id) {
                                        let _ = stream.to_local.send(bytes);
                                    }
                                }
                                MuxEvent::Closed(id) => {
                                    state.streams.remove(&id);
                                }
                                MuxEvent::Refused(id) => {
                                    if let Some(stream) = state.streams.remove(&id) {
                                        stream.refused.store(true, Ordering::Release);
                                    }
                                }
                                MuxEvent::Opened(_) | MuxEvent::Nop => {}
                            }
                        }
                    }
                    Some(Mode::Basic) => {
                        if state.basic_boundary != Boundary::Clear {
                            tracing::debug!(
                                bytes = payload.len(),
                                "dropped output of a closed basic-mode connection"
                            );
                        } else if let Some(stream) =
                            state.basic_active.and_then(|id| state.streams.get(&id))
                        {
                            let _ = stream.to_local.send(payload);
                        }
                    }
                    None => {}
                },
                Event::Acknowledged(seq) => {
                    if state.basic_boundary == (Boundary::Draining { first: Some(seq) }) {
                        state.basic_boundary = Boundary::Clear;
                    }
                }
                Event::Stream {
                    payload_type: PayloadType::Flag,
                    payload,
                } => {
                    if Flag::from_payload(&payload) == Some(Flag::ConnectToPortError) {
                        match state.mode {
                            Some(Mode::Basic) => {
                                if let Some(stream) =
                                    state.basic_active.and_then(|id| state.streams.remove(&id))
                                {
                                    stream.refused.store(true, Ordering::Release);
                                }
                            }
                            _ => state.mux.connect_error(),
                        }
                    }
                }
                Event::ChannelClosed(closed) => {
                    let reason = if closed.output.is_empty() {
                        format!("Exiting session with sessionId: {}.", closed.session_id)
                    } else {
                        closed.output
                    };
                    return Err(Error::SessionClosed(reason));
                }
                Event::Malformed(error) => {
                    tracing::debug!(%error, "dropped a malformed message from the agent")
                }
                Event::Stream { .. } | Event::PausePublication | Event::StartPublication => {}
            }
        }
        Ok(())
    }

    /// Ends the session: Flag TerminateSession as stream data, then the TerminateSession API,
    /// then a close frame after what is queued (waiting a moment for it to go).
    async fn terminate(&mut self, state: &mut State) {
        state.pending.clear();
        let _ = state.channel.send(
            Instant::now(),
            PayloadType::Flag,
            Flag::TerminateSession.to_payload(),
        );
        self.transmit(state);
        if let Err(error) = control::terminate(&self.ssm, &self.grant.session_id).await {
            tracing::warn!(%error, "TerminateSession failed");
        }
        self.link.close(Duration::from_secs(2)).await;
    }

    pub(crate) async fn run(mut self) {
        let (local_tx, mut local_rx) = mpsc::channel(64);
        let mut state = State {
            channel: DataChannel::new(Role::Client, Instant::now(), unix_ms(), rand_seed(), 1024),
            liveness: Liveness::new(self.liveness, Instant::now()),
            mux: Mux::default(),
            mode: None,
            streams: HashMap::new(),
            pending: VecDeque::new(),
            local_tx,
            basic_active: None,
            basic_waiting: VecDeque::new(),
            next_basic_id: 0,
            basic_boundary: Boundary::Clear,
        };
        let mut keepalive = tokio::time::interval(Duration::from_secs(10));
        let outcome: Result<(), Error> = loop {
            if !self.transmit(&mut state) {
                if let Err(error) = self.reconnect(&mut state, "a write failed").await {
                    break Err(error);
                }
                continue;
            }
            let now = Instant::now();
            state
                .liveness
                .awaiting_acks(now, state.channel.unacked() > 0);
            let liveness_at = tokio::time::Instant::from_std(state.liveness.poll_timeout());
            let timer = state
                .channel
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            let may_take_local =
                state.pending.is_empty() && state.channel.can_send() && state.mode.is_some();
            let keepalive_on = matches!(state.mode, Some(Mode::Mux { keepalive: true }));
            let mut lost: Option<String> = None;
            tokio::select! {
                frame = self.link.next() => {
                    if matches!(frame, Some(Ok(_))) {
                        state.liveness.heard(Instant::now());
                    }
                    match frame {
                        Some(Ok(Message::Binary(bytes))) => state.channel.handle_frame(Instant::now(), &bytes),
                        Some(Ok(Message::Close(frame))) => {
                            lost = Some(format!("the websocket was closed ({frame:?})"));
                        }
                        Some(Ok(_)) => {}
                        Some(Err(error)) => lost = Some(format!("the websocket failed: {error}")),
                        None => lost = Some("the websocket ended".into()),
                    }
                },
                command = self.commands.recv() => match command {
                    Some(Command::Open(reply)) => self.open_stream(&mut state, reply),
                    Some(Command::Close(reply)) => {
                        self.terminate(&mut state).await;
                        let _ = reply.send(());
                        break Ok(());
                    }
                    None => {
                        self.terminate(&mut state).await;
                        break Ok(());
                    }
                },
                Some(local) = local_rx.recv(), if may_take_local => self.handle_local(&mut state, local),
                _ = async { tokio::time::sleep_until(timer.unwrap_or_else(tokio::time::Instant::now)).await }, if timer.is_some() => {
                    state.channel.handle_timeout(Instant::now());
                }
                _ = tokio::time::sleep_until(liveness_at) => match state.liveness.poll(Instant::now()) {
                    Some(LivenessAction::Ping) => {
                        self.link.send(Message::Ping(b"keepalive".to_vec().into()));
                    }
                    Some(LivenessAction::Dead { silent_for }) => {
                        tracing::warn!(
                            session = %self.grant.session_id,
                            silent_for = %humanize(silent_for),
                            unacked = state.channel.unacked(),
                            "the data channel stopped answering; resuming the session on a new websocket"
                        );
                        lost = Some(format!("nothing came back for {}", humanize(silent_for)));
                    }
                    None => {}
                },
                _ = keepalive.tick(), if keepalive_on => state.mux.keepalive(),
            }
            if let Some(why) = lost
                && let Err(error) = self.reconnect(&mut state, &why).await
            {
                break Err(error);
            }
            if let Err(error) = self.handle_events(&mut state) {
                break Err(error);
            }
            let output = state.mux.take_output();
            state.queue(PayloadType::Output, &output, self.chunk_size);
            state.send_pending();
        };
        let reason = ended_reason(&outcome);
        *self.stats.ended.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
        self.stats.ended_notify.notify_waiters();
        if let Err(error) = outcome {
            tracing::warn!(%error, session = %self.grant.session_id, "the SSM session ended");
            if let Some(ready) = self.ready.take() {
                let _ = ready.send(Err(error));
            }
            for (_, stream) in state.streams.drain() {
                drop(stream);
            }
        }
    }
}

fn rand_seed() -> u64 {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    nanos ^ (std::process::id() as u64).rotate_left(32)
}

/// Why a session ended, as `Tunnel::ended` says it: the agent's own words when it closed the
/// session (they are wrapped in `Error::SessionClosed` once more by whoever reports it, and
/// must not already say "the session ended"), else the error.
fn ended_reason(outcome: &Result<(), Error>) -> String {
    match outcome {
        Ok(()) => "closed".to_owned(),
        Err(Error::SessionClosed(reason)) => reason.clone(),
        Err(error) => error.to_string(),
    }
}

#[cfg(test)]
mod ended_tests {
    use super::*;

    #[test]
    fn a_session_the_agent_closed_says_so_once_when_reported() {
        let outcome = Err(Error::SessionClosed("Session: s-1 timed out.".into()));
        let reason = ended_reason(&outcome);
        let reported = Error::SessionClosed(reason).to_string();
        assert_eq!(reported, "the session ended: Session: s-1 timed out.");
        assert_eq!(ended_reason(&Ok(())), "closed");
    }
}
