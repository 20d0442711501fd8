//! The emulated SSM agent of one session (ssm-protocol.md §4–§7). A task per session owns
//! the data channel, so the session survives its websocket being replaced (ResumeSession):
//! websockets attach to it; the handshake, acks, retransmission, smux server, dials of the
//! remote host, chunking, pacing, faults, idle timeout and `channel_closed` all live here.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ssm_proto::channel::{DataChannel, Event, Role};
use ssm_proto::handshake::{Mode, select_mode};
use ssm_proto::message::{self, Message, PayloadType};
use ssm_proto::mux::{Mux, MuxEvent};
use ssm_proto::payload::{
    ChannelClosed, Flag, HandshakeComplete, HandshakeRequest, HandshakeResponse,
    RequestedClientAction,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use super::faults::Faults;
use super::service::SsmConfig;
use super::state::State;

/// A frame from the websocket, or its end.
#[derive(Debug)]
pub(crate) enum WsIn {
    Binary(Vec<u8>),
    Closed,
}

/// What to write to the websocket.
#[derive(Debug)]
pub(crate) enum WsOut {
    Binary(Vec<u8>),
    Close(u16, String),
}

/// A websocket attaching to the session.
#[derive(Debug)]
pub(crate) struct Attachment {
    pub(crate) incoming: mpsc::UnboundedReceiver<WsIn>,
    pub(crate) outgoing: mpsc::UnboundedSender<WsOut>,
}

/// Orders from the control plane.
#[derive(Debug)]
pub(crate) enum Control {
    Terminate,
}

enum Remote {
    Data(u32, Vec<u8>),
    Closed(u32),
    DialFailed(u32),
}

#[derive(PartialEq)]
enum Handshake {
    NotStarted,
    Requested,
    Complete,
}

pub(crate) struct SessionTask {
    pub(crate) state: Arc<State>,
    pub(crate) id: String,
    pub(crate) target: String,
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The handshake's Properties: the StartSession parameters and the forwarding type.
    pub(crate) properties: serde_json::Map<String, serde_json::Value>,
    pub(crate) config: SsmConfig,
    pub(crate) attach: mpsc::UnboundedReceiver<Attachment>,
    pub(crate) control: mpsc::UnboundedReceiver<Control>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

struct Agent {
    channel: DataChannel,
    faults: Faults,
    rng: StdRng,
    out: Option<mpsc::UnboundedSender<WsOut>>,
    delayed_in: mpsc::UnboundedSender<Vec<u8>>,
    pending: VecDeque<(PayloadType, Vec<u8>)>,
    chunk_size: usize,
    pacing: bool,
    /// When the next paced message may go (pacing by deadline, so timer overshoot does not
    /// add up).
    next_send: Instant,
}

/// The agent's pace: it sleeps 1 ms after each 1 KiB write, which with the write itself
/// measured 0.70 MB/s downloads through AWS's own Go code (ssm-protocol.md §6), i.e. one
/// message per 1.46 ms. A plain 1 ms tokio sleep per message overshoots to ~2.5 ms.
const AGENT_WRITE_INTERVAL: Duration = Duration::from_micros(1460);

/// How far pacing may fall behind its deadlines and still catch up (a few messages).
const PACING_SLACK: Duration = Duration::from_millis(5);

impl Agent {
    /// Sends what the channel has for the wire, through the outbound faults.
    fn flush(&mut self) {
        while let Some(frame) = self.channel.poll_transmit() {
            let Some(out) = self.out.clone() else {
                continue;
            };
            if self.faults.lossy() {
                if self.rng.random_bool(self.faults.loss) {
                    continue;
                }
                let copies = if self.rng.random_bool(self.faults.duplicate) {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let mut delay = self.faults.latency;
                    if self.rng.random_bool(self.faults.reorder) {
                        delay += Duration::from_millis(self.rng.random_range(1..40));
                    }
                    let (out, frame) = (out.clone(), frame.clone());
                    tokio::spawn(async move {
                        tokio::time::sleep(delay).await;
                        let _ = out.send(WsOut::Binary(frame));
                    });
                }
            } else {
                let _ = out.send(WsOut::Binary(frame));
            }
        }
    }

    /// Takes a frame from the client through the inbound faults.
    fn inbound(&mut self, frame: Vec<u8>) -> Option<Vec<u8>> {
        if !self.faults.lossy() {
            return Some(frame);
        }
        if self.rng.random_bool(self.faults.loss) {
            return None;
        }
        if self.rng.random_bool(self.faults.duplicate) {
            let _ = self.delayed_in.send(frame.clone());
        }
        let mut delay = self.faults.latency;
        if self.rng.random_bool(self.faults.reorder) {
            delay += Duration::from_millis(self.rng.random_range(1..40));
        }
        let delayed = self.delayed_in.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = delayed.send(frame);
        });
        None
    }

    /// Queues stream data, split into chunks.
    fn queue(&mut self, payload_type: PayloadType, bytes: &[u8]) {
        for chunk in bytes.chunks(self.chunk_size.max(1)) {
            self.pending.push_back((payload_type, chunk.to_vec()));
        }
    }

    async fn send_pending(&mut self) {
        while self.channel.can_send() {
            let Some((payload_type, payload)) = self.pending.pop_front() else {
                break;
            };
            if self.pacing {
                let now = Instant::now();
                // A timer that fires late is made up for by the next, shorter waits (tokio's
                // timer has 1 ms granularity); after a quiet spell the pace starts afresh,
                // with no burst to catch up.
                if self.next_send + PACING_SLACK < now {
                    self.next_send = now;
                }
                tokio::time::sleep_until(self.next_send.into()).await;
                self.next_send += AGENT_WRITE_INTERVAL;
            }
            let _ = self.channel.send(Instant::now(), payload_type, payload);
            self.flush();
        }
    }
}

async fn dial(
    host_map: &HashMap<String, SocketAddr>,
    host: &str,
    port: u16,
) -> std::io::Result<TcpStream> {
    let connect = async {
        match host_map.get(host) {
            Some(addr) => TcpStream::connect(addr).await,
            None => TcpStream::connect((host, port)).await,
        }
    };
    tokio::time::timeout(Duration::from_secs(5), connect)
        .await
        .unwrap_or_else(|_| {
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "dial timed out",
            ))
        })
}

/// Connects stream `id` to the remote host; its bytes come back as `Remote` events.
fn open_remote(
    id: u32,
    host_map: HashMap<String, SocketAddr>,
    host: String,
    port: u16,
    events: mpsc::Sender<Remote>,
) -> mpsc::UnboundedSender<Vec<u8>> {
    let (writer, mut to_remote) = mpsc::unbounded_channel::<Vec<u8>>();
    tokio::spawn(async move {
        let stream = match dial(&host_map, &host, port).await {
            Ok(stream) => stream,
            Err(error) => {
                tracing::info!(%host, port, %error, "fake SSM agent: dial failed");
                let _ = events.send(Remote::DialFailed(id)).await;
                return;
            }
        };
        stream.set_nodelay(true).ok();
        let (mut read, mut write) = stream.into_split();
        let write_task = tokio::spawn(async move {
            while let Some(bytes) = to_remote.recv().await {
                if write.write_all(&bytes).await.is_err() {
                    break;
                }
            }
            let _ = write.shutdown().await;
        });
        let mut buffer = vec![0; 32 * 1024];
        loop {
            match read.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if events
                        .send(Remote::Data(id, buffer[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = events.send(Remote::Closed(id)).await;
        write_task.abort();
    });
    writer
}

impl SessionTask {
    pub(crate) async fn run(mut self) {
        let reason = self.serve().await;
        tracing::info!(session = %self.id, %reason, "fake SSM: session ended");
        let mut sessions = self
            .state
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = sessions.get_mut(&self.id) {
            slot.record.ended = true;
            slot.record.end_reason.get_or_insert(reason);
        }
    }

    fn record_connection(&self) {
        let mut sessions = self
            .state
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = sessions.get_mut(&self.id) {
            slot.record.connections += 1;
        }
    }

    /// Runs the session; returns why it ended.
    async fn serve(&mut self) -> String {
        let seed = rand::random();
        let (delayed_tx, mut delayed_rx) = mpsc::unbounded_channel();
        let mut agent = Agent {
            channel: DataChannel::new(Role::Agent, Instant::now(), unix_ms(), seed, 4096),
            faults: self.config.faults.clone(),
            rng: StdRng::seed_from_u64(seed),
            out: None,
            delayed_in: delayed_tx,
            pending: VecDeque::new(),
            chunk_size: self.config.chunk_size,
            pacing: self.config.pacing,
            next_send: Instant::now(),
        };
        let (remote_tx, mut remote_rx) = mpsc::channel::<Remote>(64);
        let mut incoming: Option<mpsc::UnboundedReceiver<WsIn>> = None;
        let mut handshake = Handshake::NotStarted;
        let mut handshake_at: Option<tokio::time::Instant> = None;
        let mut handshake_started = Instant::now();
        let mut mode = Mode::Basic;
        let mut mux = Mux::default();
        let mut streams: HashMap<u32, mpsc::UnboundedSender<Vec<u8>>> = HashMap::new();
        let mut basic_id: u32 = 0;
        // Connects a stream to the session's remote host; its bytes come back on `remote_rx`.
        let dial = |id: u32| {
            open_remote(
                id,
                self.config.host_map.clone(),
                self.host.clone(),
                self.port,
                remote_tx.clone(),
            )
        };
        let mut last_activity = Instant::now();
        let mut idle_check = tokio::time::interval(Duration::from_secs(1));

        loop {
            let timer = agent
                .channel
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            let may_take_remote = agent.pending.is_empty()
                && agent.channel.can_send()
                && handshake == Handshake::Complete;
            tokio::select! {
                attachment = self.attach.recv() => {
                    let Some(attachment) = attachment else { return "the service stopped".into() };
                    self.record_connection();
                    if let Some(old) = agent.out.replace(attachment.outgoing) {
                        let _ = old.send(WsOut::Close(1000, "replaced".into()));
                    }
                    incoming = Some(attachment.incoming);
                    if handshake == Handshake::NotStarted {
                        handshake_at = Some(tokio::time::Instant::now() + self.config.faults.slow_handshake);
                    } else {
                        agent.channel.reconnected(Instant::now());
                        agent.flush();
                    }
                }
                frame = async { incoming.as_mut().unwrap().recv().await }, if incoming.is_some() => {
                    match frame {
                        Some(WsIn::Binary(frame)) => {
                            last_activity = Instant::now();
                            if let Some(frame) = agent.inbound(frame) {
                                agent.channel.handle_frame(Instant::now(), &frame);
                            }
                        }
                        Some(WsIn::Closed) | None => {
                            incoming = None;
                            agent.out = None;
                        }
                    }
                }
                Some(frame) = delayed_rx.recv() => agent.channel.handle_frame(Instant::now(), &frame),
                remote = remote_rx.recv(), if may_take_remote => {
                    let Some(remote) = remote else { continue };
                    last_activity = Instant::now();
                    match (mode, remote) {
                        (Mode::Mux { .. }, Remote::Data(id, bytes)) => { mux.write(id, &bytes); }
                        (Mode::Mux { .. }, Remote::Closed(id)) => { streams.remove(&id); mux.close(id); }
                        (Mode::Mux { .. }, Remote::DialFailed(id)) => {
                            streams.remove(&id);
                            agent.queue(PayloadType::Flag, &Flag::ConnectToPortError.to_payload());
                            mux.close(id);
                        }
                        (Mode::Basic, Remote::Data(id, bytes)) => {
                            // Bytes from a connection the client already disconnected are dropped.
                            if streams.contains_key(&id) {
                                agent.queue(PayloadType::Output, &bytes);
                            }
                        }
                        (Mode::Basic, Remote::Closed(id)) => { streams.remove(&id); }
                        (Mode::Basic, Remote::DialFailed(id)) => {
                            if streams.remove(&id).is_some() {
                                agent.queue(PayloadType::Flag, &Flag::ConnectToPortError.to_payload());
                            }
                        }
                    }
                    let output = mux.take_output();
                    agent.queue(PayloadType::Output, &output);
                    agent.send_pending().await;
                }
                control = self.control.recv() => {
                    let reason = match control { Some(Control::Terminate) | None => "terminated".to_owned() };
                    self.close_channel(&mut agent, &reason);
                    return reason;
                }
                _ = async { tokio::time::sleep_until(timer.unwrap()).await }, if timer.is_some() => {
                    agent.channel.handle_timeout(Instant::now());
                }
                _ = async { tokio::time::sleep_until(handshake_at.unwrap()).await }, if handshake_at.is_some() => {
                    handshake_at = None;
                    handshake = Handshake::Requested;
                    handshake_started = Instant::now();
                    let request = HandshakeRequest {
                        agent_version: self.config.agent_version.clone(),
                        requested_client_actions: vec![RequestedClientAction {
                            action_type: "SessionType".into(),
                            action_parameters: serde_json::json!({
                                "SessionType": "Port",
                                "Properties": self.properties,
                            }),
                        }],
                    };
                    agent.queue(PayloadType::HandshakeRequest, &serde_json::to_vec(&request).unwrap_or_default());
                    agent.send_pending().await;
                }
                _ = idle_check.tick() => {
                    if handshake == Handshake::Requested && handshake_started.elapsed() > Duration::from_secs(15) {
                        self.close_channel(&mut agent, "the client did not answer the handshake within 15s");
                        return "handshake timeout".into();
                    }
                    if last_activity.elapsed() >= self.config.idle_timeout {
                        let reason = format!("Session {} timed out after {:?} idle.", self.id, self.config.idle_timeout);
                        self.close_channel(&mut agent, &reason);
                        return "idle timeout".into();
                    }
                }
            }

            while let Some(event) = agent.channel.poll_event() {
                let Event::Stream {
                    payload_type,
                    payload,
                } = event
                else {
                    continue;
                };
                match payload_type {
                    PayloadType::HandshakeResponse if handshake == Handshake::Requested => {
                        let Ok(response) = serde_json::from_slice::<HandshakeResponse>(&payload)
                        else {
                            continue;
                        };
                        mode = select_mode(
                            &self.config.agent_version,
                            "LocalPortForwarding",
                            &response.client_version,
                        );
                        handshake = Handshake::Complete;
                        let complete = HandshakeComplete {
                            handshake_time_to_complete: handshake_started.elapsed().as_nanos()
                                as i64,
                            customer_message: self.config.customer_message.clone(),
                        };
                        agent.queue(
                            PayloadType::HandshakeComplete,
                            &serde_json::to_vec(&complete).unwrap_or_default(),
                        );
                    }
                    // Stream data before the handshake completes is acked and discarded.
                    PayloadType::Output if handshake == Handshake::Complete => match mode {
                        Mode::Mux { .. } => {
                            let events = match mux.handle_input(&payload) {
                                Ok(events) => events,
                                Err(error) => {
                                    let reason = format!("broken smux stream: {error}");
                                    self.close_channel(&mut agent, &reason);
                                    return reason;
                                }
                            };
                            for event in events {
                                match event {
                                    MuxEvent::Opened(id) => {
                                        streams.insert(id, dial(id));
                                    }
                                    MuxEvent::Data(id, bytes) => {
                                        if let Some(writer) = streams.get(&id) {
                                            let _ = writer.send(bytes);
                                        }
                                    }
                                    MuxEvent::Closed(id) | MuxEvent::Refused(id) => {
                                        streams.remove(&id);
                                    }
                                    MuxEvent::Nop => {}
                                }
                            }
                        }
                        Mode::Basic => {
                            // One remote connection at a time, dialed on the first data after a
                            // DisconnectToPort; each gets its own id so late events of the
                            // previous one cannot touch it.
                            if streams.is_empty() {
                                basic_id += 1;
                                streams.insert(basic_id, dial(basic_id));
                            }
                            if let Some(writer) = streams.get(&basic_id) {
                                let _ = writer.send(payload);
                            }
                        }
                    },
                    PayloadType::Flag => match Flag::from_payload(&payload) {
                        Some(Flag::TerminateSession) => {
                            self.close_channel(&mut agent, "terminated by the client");
                            return "terminated by the client".into();
                        }
                        Some(Flag::DisconnectToPort) => {
                            // Dropping the writer closes the sending half to the remote host;
                            // what it still sends is dropped as it arrives, unless the
                            // late-bytes fault forwards it now, after the flag's ack.
                            streams.clear();
                            if self.config.faults.late_bytes && mode == Mode::Basic {
                                agent.flush();
                                let old = basic_id;
                                let drain = async {
                                    while let Some(remote) = remote_rx.recv().await {
                                        match remote {
                                            Remote::Data(id, bytes) if id == old => {
                                                agent.queue(PayloadType::Output, &bytes)
                                            }
                                            Remote::Closed(id) | Remote::DialFailed(id)
                                                if id == old =>
                                            {
                                                break;
                                            }
                                            _ => {}
                                        }
                                    }
                                };
                                let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
                                agent.send_pending().await;
                            }
                        }
                        _ => {}
                    },
                    _ => {}
                }
            }
            let output = mux.take_output();
            agent.queue(PayloadType::Output, &output);
            agent.send_pending().await;
            agent.flush();
        }
    }

    /// Ends the session as the service does: a `channel_closed` message with PayloadType 0,
    /// an ISO-8601 CreatedDate (`2026-12-01T13:58:18.000Z`) and an empty Output; the
    /// websocket is left for the client to close. The reason is only logged here.
    fn close_channel(&self, agent: &mut Agent, reason: &str) {
        agent.flush();
        tracing::info!(session = %self.id, %reason, "fake SSM: channel closed");
        let Some(out) = &agent.out else { return };
        let closed = ChannelClosed {
            message_id: uuid::Uuid::new_v4().to_string(),
            created_date: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            destination_id: self.target.clone(),
            session_id: self.id.clone(),
            message_type: message::CHANNEL_CLOSED.into(),
            schema_version: 1,
            output: String::new(),
        };
        let message = Message::new(
            message::CHANNEL_CLOSED,
            0,
            PayloadType::Undefined,
            serde_json::to_vec(&closed).unwrap_or_default(),
            unix_ms(),
            uuid::Uuid::new_v4(),
        );
        let _ = out.send(WsOut::Binary(message.to_bytes()));
    }
}
