//! Whether the websocket under a data channel still carries anything, sans IO.
//!
//! TCP does not tell: behind a NAT that forgot the connection, a VPN that dropped, or a
//! laptop that slept, a socket stays ESTABLISHED while every byte written to it is lost, and
//! a blocked write or an empty read can last for a quarter of an hour. So the link is
//! declared dead by what the peer says back: when something is owed an answer (stream data
//! awaiting its acknowledgement, or a websocket ping awaiting its pong) and nothing at all has
//! come from the peer for `dead_after`, the link is dead and the session should be resumed on
//! a new websocket. An idle link is probed with a ping every `ping_every`, so a dead idle link
//! is found too, within `ping_every + dead_after`.
//!
//! The official client pings every 5 minutes and never checks the answer; the agent side
//! pings every 54 s and expects a pong within 60 s (ssm-protocol.md §3). Every websocket
//! peer answers pings (RFC 6455 §5.5.2), so probing more often costs a few bytes and needs
//! nothing of the service.

use std::time::{Duration, Instant};

/// How a link is probed and when it is given up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Ping the peer after this long without hearing from it.
    pub ping_every: Duration,
    /// The link is dead when an answer is owed and the peer has said nothing for this long.
    pub dead_after: Duration,
}

impl Default for LivenessConfig {
    fn default() -> LivenessConfig {
        LivenessConfig {
            ping_every: Duration::from_secs(10),
            dead_after: Duration::from_secs(15),
        }
    }
}

/// What the driver should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LivenessAction {
    /// Send a websocket ping (its pong, or anything else, counts as an answer).
    Ping,
    /// Nothing has come back for `silent_for` while an answer was owed: give the websocket
    /// up and resume the session on a new one.
    Dead {
        /// How long the peer has been silent.
        silent_for: Duration,
    },
}

/// The liveness of one websocket.
#[derive(Clone, Debug)]
pub struct Liveness {
    config: LivenessConfig,
    last_heard: Instant,
    /// Since when an answer has been owed (data unacknowledged or a ping unanswered).
    owed_since: Option<Instant>,
    ping_unanswered: bool,
}

impl Liveness {
    /// A link opened at `now` (the open counts as hearing from the peer).
    pub fn new(config: LivenessConfig, now: Instant) -> Liveness {
        Liveness {
            config,
            last_heard: now,
            owed_since: None,
            ping_unanswered: false,
        }
    }

    /// A new websocket replaced the old one at `now`: nothing is owed on it yet.
    pub fn reset(&mut self, now: Instant) {
        *self = Liveness::new(self.config, now);
    }

    /// Anything came from the peer: a data frame, an ack, a ping or a pong.
    pub fn heard(&mut self, now: Instant) {
        self.last_heard = now;
        self.ping_unanswered = false;
    }

    /// Whether stream data is waiting for its acknowledgement, as of `now`.
    pub fn awaiting_acks(&mut self, now: Instant, awaiting: bool) {
        if awaiting || self.ping_unanswered {
            self.owed_since.get_or_insert(now);
        } else {
            self.owed_since = None;
        }
    }

    /// When `poll` has something to say next.
    pub fn poll_timeout(&self) -> Instant {
        match self.owed_since {
            Some(since) => since.max(self.last_heard) + self.config.dead_after,
            None => self.last_heard + self.config.ping_every,
        }
    }

    /// What to do at `now`, if anything.
    pub fn poll(&mut self, now: Instant) -> Option<LivenessAction> {
        if let Some(since) = self.owed_since {
            let quiet_from = since.max(self.last_heard);
            return (now >= quiet_from + self.config.dead_after).then(|| LivenessAction::Dead {
                silent_for: now.saturating_duration_since(self.last_heard),
            });
        }
        if now >= self.last_heard + self.config.ping_every {
            self.ping_unanswered = true;
            self.owed_since = Some(now);
            return Some(LivenessAction::Ping);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONFIG: LivenessConfig = LivenessConfig {
        ping_every: Duration::from_secs(10),
        dead_after: Duration::from_secs(15),
    };

    /// Runs the clock from wake-up to wake-up until `until`, answering nothing; returns
    /// the actions with the time each came.
    fn run_silent(
        live: &mut Liveness,
        start: Instant,
        until: Duration,
    ) -> Vec<(Duration, LivenessAction)> {
        let mut now = start;
        let mut actions = Vec::new();
        while now <= start + until {
            if let Some(action) = live.poll(now) {
                actions.push((now - start, action));
                if matches!(action, LivenessAction::Dead { .. }) {
                    break;
                }
            }
            now = live.poll_timeout().max(now + Duration::from_millis(1));
        }
        actions
    }

    #[test]
    fn an_idle_link_is_pinged_and_declared_dead_when_the_pong_never_comes() {
        let start = Instant::now();
        let mut live = Liveness::new(CONFIG, start);
        let actions = run_silent(&mut live, start, Duration::from_secs(60));
        assert_eq!(
            actions,
            vec![
                (Duration::from_secs(10), LivenessAction::Ping),
                (
                    Duration::from_secs(25),
                    LivenessAction::Dead {
                        silent_for: Duration::from_secs(25)
                    }
                ),
            ]
        );
    }

    #[test]
    fn an_idle_link_that_answers_its_pings_lives_for_ever() {
        let start = Instant::now();
        let mut live = Liveness::new(CONFIG, start);
        let mut now = start;
        let mut pings = 0;
        for _ in 0..1000 {
            now = live.poll_timeout();
            match live.poll(now) {
                Some(LivenessAction::Ping) => {
                    pings += 1;
                    // The pong comes back 30 ms later.
                    now += Duration::from_millis(30);
                    live.heard(now);
                    live.awaiting_acks(now, false);
                }
                Some(dead) => panic!("declared {dead:?} at {:?}", now - start),
                None => {}
            }
        }
        assert_eq!(pings, 1000);
        assert!(now - start >= Duration::from_secs(10_000));
    }

    #[test]
    fn unacknowledged_data_and_a_silent_peer_is_dead_after_dead_after() {
        let start = Instant::now();
        let mut live = Liveness::new(CONFIG, start);
        let sent = start + Duration::from_secs(3);
        live.awaiting_acks(sent, true);
        // No ping while data is owed an ack: the ack is the probe.
        assert_eq!(live.poll(sent + Duration::from_secs(14)), None);
        assert_eq!(
            live.poll(sent + Duration::from_secs(15)),
            Some(LivenessAction::Dead {
                silent_for: Duration::from_secs(18)
            })
        );
    }

    #[test]
    fn a_peer_that_keeps_talking_is_alive_while_acks_are_owed() {
        let start = Instant::now();
        let mut live = Liveness::new(CONFIG, start);
        live.awaiting_acks(start, true);
        // A long upload: acks trickle in every 5 s and more is always outstanding.
        for step in 1..=100u64 {
            let now = start + Duration::from_secs(5 * step);
            assert_eq!(live.poll(now), None, "at {}s", 5 * step);
            live.heard(now);
            live.awaiting_acks(now, true);
        }
        // Then it stops answering.
        let last = start + Duration::from_secs(500);
        assert_eq!(live.poll(last + Duration::from_secs(14)), None);
        assert!(matches!(
            live.poll(last + Duration::from_secs(15)),
            Some(LivenessAction::Dead { .. })
        ));
    }

    #[test]
    fn a_reset_forgives_the_old_link() {
        let start = Instant::now();
        let mut live = Liveness::new(CONFIG, start);
        live.awaiting_acks(start, true);
        let resumed = start + Duration::from_secs(14);
        live.reset(resumed);
        assert_eq!(live.poll(start + Duration::from_secs(16)), None);
        assert_eq!(live.poll_timeout(), resumed + CONFIG.ping_every);
    }
}
