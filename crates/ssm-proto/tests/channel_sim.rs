//! The reliability layer under a simulated network: latency, loss, duplication and
//! reordering from a seeded RNG, and a clock that jumps to the next wake-up, so that
//! 10 MB cross a lossy link in milliseconds of real time, deterministically.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use ssm_proto::channel::{self, DataChannel, Event, Role};
use ssm_proto::liveness::{Liveness, LivenessAction, LivenessConfig};
use ssm_proto::message::PayloadType;

#[derive(Clone, Copy)]
struct Faults {
    latency: Duration,
    loss: f64,
    duplicate: f64,
    reorder: f64,
}

/// A frame on the wire: (deliver at, tie-breaker, to the agent?, bytes).
type InFlight = Reverse<(Instant, u64, bool, Vec<u8>)>;

struct Sim {
    now: Instant,
    rng: StdRng,
    faults: Faults,
    wire: BinaryHeap<InFlight>,
    counter: u64,
    client: DataChannel,
    agent: DataChannel,
    cut: bool,
    /// When a frame last reached the client.
    client_heard: Option<Instant>,
}

impl Sim {
    fn new(seed: u64, faults: Faults) -> Sim {
        let now = Instant::now();
        Sim {
            now,
            rng: StdRng::seed_from_u64(seed),
            faults,
            wire: BinaryHeap::new(),
            counter: 0,
            client: DataChannel::new(Role::Client, now, 1_700_000_000_000, seed, 512),
            agent: DataChannel::new(Role::Agent, now, 1_700_000_000_000, seed ^ 1, 512),
            cut: false,
            client_heard: None,
        }
    }

    fn put(&mut self, to_agent: bool, frame: Vec<u8>) {
        if self.cut || self.rng.random_bool(self.faults.loss) {
            return;
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
            self.counter += 1;
            self.wire.push(Reverse((
                self.now + delay,
                self.counter,
                to_agent,
                frame.clone(),
            )));
        }
    }

    /// Moves frames onto the wire, delivers what is due, runs timers; returns events.
    fn step(&mut self) -> (Vec<Event>, Vec<Event>) {
        while let Some(frame) = self.client.poll_transmit() {
            self.put(true, frame);
        }
        while let Some(frame) = self.agent.poll_transmit() {
            self.put(false, frame);
        }
        while let Some(Reverse((at, _, _, _))) = self.wire.peek() {
            if *at > self.now {
                break;
            }
            let Reverse((_, _, to_agent, frame)) = self.wire.pop().unwrap();
            if to_agent {
                self.agent.handle_frame(self.now, &frame);
            } else {
                self.client.handle_frame(self.now, &frame);
                self.client_heard = Some(self.now);
            }
        }
        self.client.handle_timeout(self.now);
        self.agent.handle_timeout(self.now);
        let drain = |channel: &mut DataChannel| {
            std::iter::from_fn(|| channel.poll_event()).collect::<Vec<_>>()
        };
        (drain(&mut self.client), drain(&mut self.agent))
    }

    fn advance(&mut self) {
        let next = [
            self.wire.peek().map(|Reverse((at, ..))| *at),
            self.client.poll_timeout(),
            self.agent.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min();
        self.now = match next {
            Some(at) if at > self.now => at,
            _ => self.now + Duration::from_millis(1),
        };
    }
}

fn data(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

/// Collects one side's events: the peer's data, and its acks of this side's messages.
fn received(events: Vec<Event>, into: &mut Vec<u8>, acked: &mut Vec<i64>) {
    for event in events {
        match event {
            Event::Stream {
                payload_type: PayloadType::Output,
                payload,
            } => into.extend_from_slice(&payload),
            Event::Acknowledged(seq) => acked.push(seq),
            other => panic!("unexpected event {other:?}"),
        }
    }
}

/// Every ack reported names a message that was sent, and none is reported twice.
fn each_acked_once(mut acked: Vec<i64>, sent: usize) {
    acked.sort_unstable();
    let before = acked.len();
    acked.dedup();
    assert_eq!(acked.len(), before, "an ack was reported twice");
    assert!(acked.iter().all(|&seq| (0..sent as i64).contains(&seq)));
}

/// Sends `upload` client→agent and `download` agent→client in 1 KiB messages.
fn transfer(
    sim: &mut Sim,
    upload: &[u8],
    download: &[u8],
    mut midway: impl FnMut(&mut Sim, usize),
) -> (Vec<u8>, Vec<u8>) {
    let (mut up, mut down) = (
        upload.chunks(1024).peekable(),
        download.chunks(1024).peekable(),
    );
    let (mut at_agent, mut at_client) = (Vec::new(), Vec::new());
    let (mut client_acked, mut agent_acked) = (Vec::new(), Vec::new());
    let (mut client_sent, mut agent_sent) = (0, 0);
    let mut steps = 0usize;
    while at_agent.len() < upload.len() || at_client.len() < download.len() {
        while sim.client.can_send() {
            let Some(chunk) = up.next() else { break };
            sim.client
                .send(sim.now, PayloadType::Output, chunk.to_vec())
                .unwrap();
            client_sent += 1;
        }
        while sim.agent.can_send() {
            let Some(chunk) = down.next() else { break };
            sim.agent
                .send(sim.now, PayloadType::Output, chunk.to_vec())
                .unwrap();
            agent_sent += 1;
        }
        let (client_events, agent_events) = sim.step();
        received(agent_events, &mut at_agent, &mut agent_acked);
        received(client_events, &mut at_client, &mut client_acked);
        midway(sim, at_agent.len());
        sim.advance();
        steps += 1;
        assert!(steps < 5_000_000, "no progress");
    }
    each_acked_once(client_acked, client_sent);
    each_acked_once(agent_acked, agent_sent);
    (at_agent, at_client)
}

#[test]
fn ten_megabytes_cross_a_lossy_duplicating_reordering_link_intact() {
    for seed in [1, 2] {
        let faults = Faults {
            latency: Duration::from_millis(15),
            loss: 0.05,
            duplicate: 0.05,
            reorder: 0.05,
        };
        let mut sim = Sim::new(seed, faults);
        let upload = data(10 * 1024 * 1024, seed);
        let download = data(512 * 1024, seed + 100);
        let (at_agent, at_client) = transfer(&mut sim, &upload, &download, |_, _| {});
        assert!(at_agent == upload, "upload corrupted (seed {seed})");
        assert!(at_client == download, "download corrupted (seed {seed})");
        assert!(
            sim.client.resends() > 0,
            "losses must have been repaired by resends"
        );
    }
}

#[test]
fn a_cut_link_and_a_reconnect_lose_and_duplicate_nothing() {
    let faults = Faults {
        latency: Duration::from_millis(5),
        loss: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
    };
    let mut sim = Sim::new(7, faults);
    let upload = data(2 * 1024 * 1024, 7);
    let mut done = false;
    let (at_agent, _) = transfer(&mut sim, &upload, &[], |sim, progress| {
        if !done && progress > upload.len() / 3 {
            // The websocket dies: everything in flight is lost, nothing gets through…
            sim.cut = true;
            sim.wire.clear();
            for _ in 0..20 {
                sim.step();
                sim.advance();
            }
            // …then ResumeSession gives a new one.
            sim.cut = false;
            let now = sim.now;
            sim.client.reconnected(now);
            sim.agent.reconnected(now);
            done = true;
        }
    });
    assert!(done);
    assert!(
        at_agent == upload,
        "bytes lost or duplicated across the reconnect"
    );
}

#[test]
fn a_blackholed_link_is_declared_dead_in_bounded_time_and_the_transfer_resumes() {
    let faults = Faults {
        latency: Duration::from_millis(15),
        loss: 0.0,
        duplicate: 0.0,
        reorder: 0.0,
    };
    let config = LivenessConfig {
        ping_every: Duration::from_secs(10),
        dead_after: Duration::from_secs(15),
    };
    let mut sim = Sim::new(11, faults);
    let mut live = Liveness::new(config, sim.now);
    let upload = data(4 * 1024 * 1024, 11);
    let mut found_dead_after = None;
    let (at_agent, _) = transfer(&mut sim, &upload, &[], |sim, progress| {
        if let Some(heard) = sim.client_heard.take() {
            live.heard(heard);
        }
        live.awaiting_acks(sim.now, sim.client.unacked() > 0);
        if found_dead_after.is_some() || progress < upload.len() / 3 {
            return;
        }
        // A blackhole: what is in flight and everything after it vanishes, and the agent
        // stops reading. The client keeps resending into it; its liveness must call it.
        let cut_at = sim.now;
        sim.cut = true;
        sim.wire.clear();
        loop {
            sim.step();
            if let Some(heard) = sim.client_heard.take() {
                live.heard(heard);
            }
            live.awaiting_acks(sim.now, sim.client.unacked() > 0);
            if let Some(LivenessAction::Dead { silent_for }) = live.poll(sim.now) {
                found_dead_after = Some((sim.now - cut_at, silent_for));
                break;
            }
            let next = [sim.client.poll_timeout(), Some(live.poll_timeout())]
                .into_iter()
                .flatten()
                .min()
                .unwrap();
            sim.now = next.max(sim.now + Duration::from_millis(1));
            assert!(
                sim.now - cut_at < Duration::from_secs(600),
                "never declared dead"
            );
        }
        // ResumeSession: a new websocket.
        sim.cut = false;
        let now = sim.now;
        sim.client.reconnected(now);
        sim.agent.reconnected(now);
        live.reset(now);
    });
    let (after_cut, silent_for) = found_dead_after.expect("the blackhole was found");
    // Dead once the peer has been silent for dead_after: its last ack was in flight when
    // the link was cut, so a little less than that after the cut, never much more.
    assert!(
        silent_for >= config.dead_after && silent_for <= config.dead_after + channel::TICK,
        "declared dead after {silent_for:?} of silence"
    );
    assert!(
        after_cut > config.dead_after - Duration::from_millis(100)
            && after_cut <= config.dead_after + Duration::from_secs(1),
        "declared dead {after_cut:?} after the cut"
    );
    assert!(
        at_agent == upload,
        "bytes lost or duplicated across the resume"
    );
}

#[test]
fn backpressure_instead_of_eviction() {
    let now = Instant::now();
    let mut client = DataChannel::new(Role::Client, now, 1, 0, 3);
    for _ in 0..3 {
        client.send(now, PayloadType::Output, vec![1]).unwrap();
    }
    assert!(!client.can_send());
    assert_eq!(
        client
            .send(now, PayloadType::Output, vec![1])
            .unwrap_err()
            .0,
        3
    );
    assert_eq!(client.unacked(), 3, "nothing was evicted");
}

#[test]
fn duplicates_are_acknowledged_again_and_delivered_once() {
    let now = Instant::now();
    let mut client = DataChannel::new(Role::Client, now, 1, 0, 10);
    let mut agent = DataChannel::new(Role::Agent, now, 1, 1, 10);
    agent
        .send(now, PayloadType::Output, b"once".to_vec())
        .unwrap();
    let frame = agent.poll_transmit().unwrap();
    client.handle_frame(now, &frame);
    client.handle_frame(now, &frame);
    let acks: Vec<_> = std::iter::from_fn(|| client.poll_transmit()).collect();
    assert_eq!(acks.len(), 2, "the duplicate is acknowledged too");
    let events: Vec<_> = std::iter::from_fn(|| client.poll_event()).collect();
    assert_eq!(
        events,
        [Event::Stream {
            payload_type: PayloadType::Output,
            payload: b"once".to_vec()
        }]
    );
    for ack in acks {
        agent.handle_frame(now, &ack);
    }
    let events: Vec<_> = std::iter::from_fn(|| agent.poll_event()).collect();
    assert_eq!(
        events,
        [Event::Acknowledged(0)],
        "the first ack is reported, its duplicate is not"
    );
    assert_eq!(agent.unacked(), 0);
    assert_eq!(agent.poll_timeout(), None, "no timer without unacked data");
}

#[test]
fn a_malformed_frame_is_dropped_unacknowledged() {
    let now = Instant::now();
    let mut client = DataChannel::new(Role::Client, now, 1, 0, 10);
    let mut agent = DataChannel::new(Role::Agent, now, 1, 1, 10);
    agent.send(now, PayloadType::Output, b"x".to_vec()).unwrap();
    let mut frame = agent.poll_transmit().unwrap();
    let last = frame.len() - 1;
    frame[last] ^= 0xff;
    client.handle_frame(now, &frame);
    assert!(
        client.poll_transmit().is_none(),
        "no ack for a corrupt message"
    );
    assert!(matches!(client.poll_event(), Some(Event::Malformed(_))));
}

#[test]
fn rto_follows_the_measured_rtt() {
    let start = Instant::now();
    let mut client = DataChannel::new(Role::Client, start, 1, 0, 100);
    let mut agent = DataChannel::new(Role::Agent, start, 1, 1, 100);
    let mut now = start;
    for _ in 0..50 {
        client.send(now, PayloadType::Output, vec![0]).unwrap();
        let frame = client.poll_transmit().unwrap();
        now += Duration::from_millis(20);
        agent.handle_frame(now, &frame);
        let ack = agent.poll_transmit().unwrap();
        now += Duration::from_millis(20);
        client.handle_frame(now, &ack);
    }
    // RTT converges to 40 ms, RTTVAR to ~0: RTO = 40 ms + max(10 ms, 4·RTTVAR).
    let rto = client.rto();
    assert!(
        rto >= Duration::from_millis(45) && rto <= Duration::from_millis(60),
        "{rto:?}"
    );
}
