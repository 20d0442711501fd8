//! An Aurora Serverless v2 cluster with min capacity 0: after an idle period it pauses; the
//! next connection starts a resume, and until it is done connections fail as a resuming
//! cluster's do (reset, or `28000 no pg_hba.conf entry`).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// When the cluster pauses and how long it takes to come back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PauseConfig {
    /// Pause after this long with no connection open.
    pub idle_after: Duration,
    /// A resume takes this long.
    pub resume_takes: Duration,
}

#[derive(Debug)]
enum State {
    Running { idle_since: Option<Instant> },
    Resuming { until: Instant },
}

/// What a new connection meets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Admission {
    /// The cluster is up.
    Admit,
    /// The cluster is resuming: reset the connection.
    Reset,
    /// The cluster is resuming: answer `28000 no pg_hba.conf entry`.
    PgHba,
}

/// The cluster's state, shared by all connections.
#[derive(Debug)]
pub(crate) struct Pauser {
    config: Option<PauseConfig>,
    state: Mutex<(State, u32, u64)>, // (state, open connections, resumes so far)
}

impl Pauser {
    pub(crate) fn new(config: Option<PauseConfig>) -> Pauser {
        Pauser {
            config,
            state: Mutex::new((
                State::Running {
                    idle_since: Some(Instant::now()),
                },
                0,
                0,
            )),
        }
    }

    /// Decides for a new connection at `now`; admitted connections must call `closed`.
    pub(crate) fn admit(&self, now: Instant) -> Admission {
        let Some(config) = self.config else {
            self.state.lock().unwrap_or_else(|p| p.into_inner()).1 += 1;
            return Admission::Admit;
        };
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (state, open, resumes) = &mut *guard;
        match state {
            State::Running {
                idle_since: Some(since),
            } if *open == 0 && now.duration_since(*since) >= config.idle_after => {
                *state = State::Resuming {
                    until: now + config.resume_takes,
                };
                *resumes += 1;
                tracing::info!(takes = ?config.resume_takes, "fake Aurora: paused cluster starts resuming");
                Admission::Reset
            }
            State::Resuming { until } if now < *until => {
                // Alternate the two ways a resuming cluster turns clients away.
                if (until.duration_since(now).as_millis() / 250) % 2 == 0 {
                    Admission::PgHba
                } else {
                    Admission::Reset
                }
            }
            _ => {
                *state = State::Running { idle_since: None };
                *open += 1;
                Admission::Admit
            }
        }
    }

    /// An admitted connection ended.
    pub(crate) fn closed(&self, now: Instant) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        guard.1 = guard.1.saturating_sub(1);
        if guard.1 == 0 {
            guard.0 = State::Running {
                idle_since: Some(now),
            };
        }
    }

    /// Pauses the cluster now (if nothing is connected).
    pub(crate) fn pause_now(&self) {
        let mut guard = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if guard.1 == 0 {
            let long_ago = Instant::now()
                .checked_sub(Duration::from_secs(86_400))
                .unwrap_or_else(Instant::now);
            guard.0 = State::Running {
                idle_since: Some(long_ago),
            };
        }
    }

    /// How many resumes have started.
    pub(crate) fn resumes(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idle_pause_resume_cycle() {
        let config = PauseConfig {
            idle_after: Duration::from_secs(10),
            resume_takes: Duration::from_secs(5),
        };
        let pauser = Pauser::new(Some(config));
        let t0 = Instant::now();
        assert_eq!(
            pauser.admit(t0),
            Admission::Admit,
            "not idle long enough yet"
        );
        pauser.closed(t0);
        let later = t0 + Duration::from_secs(11);
        assert_eq!(
            pauser.admit(later),
            Admission::Reset,
            "the first connection after idling starts a resume"
        );
        assert_ne!(
            pauser.admit(later + Duration::from_secs(2)),
            Admission::Admit
        );
        assert_eq!(
            pauser.admit(later + Duration::from_secs(6)),
            Admission::Admit
        );
        assert_eq!(pauser.resumes(), 1);
        assert_eq!(
            pauser.admit(later + Duration::from_secs(60)),
            Admission::Admit,
            "busy clusters do not pause"
        );
    }

    #[test]
    fn without_config_it_never_pauses() {
        let pauser = Pauser::new(None);
        pauser.pause_now();
        assert_eq!(
            pauser.admit(Instant::now() + Duration::from_secs(1_000_000)),
            Admission::Admit
        );
    }
}
