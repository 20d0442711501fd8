//! Sessions granted together, so that clients cannot deadlock on the budget.
//!
//! A test holds one session (its client) and then asks for more (its pool). With every
//! session of the budget held by tests that each wait for one more, nobody ever gets one:
//! hold-and-wait. So a client may wait for the budget only while its test holds nothing:
//! - A client that names its test (`-c pgharness.lease=<id>:<n>` in its startup options,
//!   as every connection of a pgharness test process does on the rds backend, its
//!   `connection_string()` included) gets `n` sessions reserved at once when it is its test's
//!   first: it waits for all `n` together, holding none while it waits. The test's later
//!   clients draw on the reservation and never wait.
//! - One beyond the reservation (a second `TestDb`, an app's own pool) takes a free session
//!   if there is one, else waits for one while its test holds others. That can deadlock, but
//!   only when every reserved session belongs to a test that waits like this (a single kind of
//!   resource: a deadlock is exactly "every holder waits"), so that is checked while it waits,
//!   and then the waiters are refused with `53300` at once, naming `max_sessions`, instead of
//!   all of them waiting out the budget's wait together.
//! - A client that names no test (psql, a tool) reserves its one session alone.
//!
//! The reservations end with their test's last client. They count the sessions lent to
//! clients, at most the budget's: whatever is reserved can always be served by an idle
//! session, a new one, or one closed elsewhere.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::Error;
use crate::sessions::Sessions;

/// The startup option (`-c pgharness.lease=<id>:<n>`) a client names its test with.
pub const LEASE_OPTION: &str = "pgharness.lease";

/// What a client asks for: its test's id and how many sessions the test holds at most.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Request {
    pub(crate) test: String,
    pub(crate) sessions: u32,
}

impl Request {
    /// `<id>:<n>` (as in the option's value).
    pub(crate) fn parse(value: &str) -> Option<Request> {
        let (test, sessions) = value.rsplit_once(':')?;
        let sessions = sessions.parse().ok().filter(|n| *n >= 1)?;
        (!test.is_empty()).then(|| Request {
            test: test.to_owned(),
            sessions,
        })
    }
}

/// The lease a client's startup options ask for (`-c pgharness.lease=<id>:<n>`), read with
/// the parser that applies the other options (`sessions::parse_options`, which also leaves
/// this one out: it is the proxy's, not the server's).
pub(crate) fn request_of(params: &[(String, String)]) -> Option<Request> {
    let (_, options) = params.iter().find(|(name, _)| name == "options")?;
    crate::sessions::parse_options(options)
        .into_iter()
        .find(|(name, _)| name == LEASE_OPTION)
        .and_then(|(_, value)| Request::parse(&value))
}

/// How often a client waiting beyond its test's reservation checks for a deadlock.
const DEADLOCK_CHECK: Duration = Duration::from_millis(50);

enum Joined {
    Lease(Lease),
    MustWait,
    First,
}

struct Group {
    permits: OwnedSemaphorePermit,
    clients: u32,
    /// Clients of the test waiting for a session beyond its reservation.
    waiting: u32,
}

/// The reservations of one proxy.
pub(crate) struct Leases {
    permits: Arc<Semaphore>,
    sessions: u32,
    wait: Duration,
    groups: Mutex<HashMap<String, Group>>,
}

/// A client's share of a reservation; ends with the client.
pub(crate) struct Lease {
    leases: Arc<Leases>,
    test: Option<String>,
    _own: Option<OwnedSemaphorePermit>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let Some(test) = &self.test else { return };
        let mut groups = self.leases.groups.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(group) = groups.get_mut(test) {
            group.clients = group.clients.saturating_sub(1);
            if group.clients == 0 {
                groups.remove(test);
            }
        }
    }
}

impl Leases {
    /// Reservations of at most `sessions` sessions; a client waits at most `wait` for its own.
    pub(crate) fn new(sessions: u32, wait: Duration) -> Arc<Leases> {
        Arc::new(Leases {
            permits: Arc::new(Semaphore::new(sessions as usize)),
            sessions,
            wait,
            groups: Mutex::default(),
        })
    }

    /// Sessions reserved now.
    #[cfg(test)]
    pub(crate) fn reserved(&self) -> usize {
        self.sessions as usize - self.permits.available_permits()
    }

    /// The client's lease: from its test's reservation, or a reservation made now.
    /// `sessions` counts the clients that wait.
    pub(crate) async fn acquire(
        self: &Arc<Leases>,
        request: Option<Request>,
        sessions: &Sessions,
    ) -> Result<Lease, Error> {
        let Some(request) = request else {
            let permit = match self.permits.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    let _waiting = sessions.start_waiting();
                    tokio::time::timeout(self.wait, self.permits.clone().acquire_owned())
                        .await
                        .map_err(|_| self.exhausted(1))?
                        .map_err(|_| self.exhausted(1))?
                }
            };
            return Ok(Lease {
                leases: self.clone(),
                test: None,
                _own: Some(permit),
            });
        };
        if request.sessions > self.sessions {
            return Err(Error::OverBudget {
                asked: request.sessions,
                holding: 0,
                sessions: self.sessions,
            });
        }
        match self.join(&request) {
            Joined::Lease(lease) => return Ok(lease),
            Joined::MustWait => return self.wait_beyond(request, sessions).await,
            Joined::First => {}
        }
        // The test's first client: wait for all of its sessions at once, holding none.
        let permits = match self
            .permits
            .clone()
            .try_acquire_many_owned(request.sessions)
        {
            Ok(permits) => permits,
            Err(_) => {
                let _waiting = sessions.start_waiting();
                tokio::time::timeout(
                    self.wait,
                    self.permits.clone().acquire_many_owned(request.sessions),
                )
                .await
                .map_err(|_| self.exhausted(request.sessions))?
                .map_err(|_| self.exhausted(request.sessions))?
            }
        };
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        match groups.get_mut(&request.test) {
            // Two first clients of one test raced: one reservation of both.
            Some(group) => {
                group.permits.merge(permits);
                group.clients += 1;
            }
            None => {
                groups.insert(
                    request.test.clone(),
                    Group {
                        permits,
                        clients: 1,
                        waiting: 0,
                    },
                );
            }
        }
        Ok(self.lease(&request.test))
    }

    /// A later client of a test with a reservation: within it, or one more session if one
    /// is free right now.
    fn join(self: &Arc<Leases>, request: &Request) -> Joined {
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let Some(group) = groups.get_mut(&request.test) else {
            return Joined::First;
        };
        if group.clients as usize >= group.permits.num_permits() {
            match self.permits.clone().try_acquire_owned() {
                Ok(more) => group.permits.merge(more),
                Err(_) => return Joined::MustWait,
            }
        }
        group.clients += 1;
        Joined::Lease(self.lease(&request.test))
    }

    fn lease(self: &Arc<Leases>, test: &str) -> Lease {
        Lease {
            leases: self.clone(),
            test: Some(test.to_owned()),
            _own: None,
        }
    }

    /// Whether every reserved session belongs to a test that waits for more: then none
    /// will ever be given back.
    fn deadlocked(&self) -> bool {
        let groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let held_by_waiters: usize = groups
            .values()
            .filter(|g| g.waiting > 0)
            .map(|g| g.permits.num_permits())
            .sum();
        held_by_waiters > 0 && held_by_waiters >= self.sessions as usize
    }

    /// One session beyond the test's reservation, while the test holds its reservation:
    /// waits for a free one unless that deadlocks.
    async fn wait_beyond(
        self: &Arc<Leases>,
        request: Request,
        sessions: &Sessions,
    ) -> Result<Lease, Error> {
        let holding = {
            let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
            groups.get_mut(&request.test).map(|group| {
                group.waiting += 1;
                group.clients
            })
        };
        let Some(holding) = holding else {
            // Its test's last client left meanwhile: it is the first again.
            return Box::pin(self.acquire(Some(request), sessions)).await;
        };
        let _waiting = sessions.start_waiting();
        let outcome = async {
            let deadline = tokio::time::Instant::now() + self.wait;
            let mut checks = tokio::time::interval(DEADLOCK_CHECK);
            loop {
                tokio::select! {
                    permit = self.permits.clone().acquire_owned() => {
                        return permit.map_err(|_| self.exhausted(1));
                    }
                    _ = checks.tick() => {
                        if self.deadlocked() {
                            return Err(Error::OverBudget {
                                asked: holding + 1,
                                holding,
                                sessions: self.sessions,
                            });
                        }
                        if tokio::time::Instant::now() >= deadline {
                            return Err(self.exhausted(1));
                        }
                    }
                }
            }
        }
        .await;
        drop(_waiting);
        let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
        let group = groups.get_mut(&request.test);
        match (outcome, group) {
            (Ok(more), Some(group)) => {
                group.waiting -= 1;
                group.permits.merge(more);
                group.clients += 1;
                Ok(self.lease(&request.test))
            }
            (Err(error), Some(group)) => {
                group.waiting -= 1;
                Err(error)
            }
            // The test's other clients all left while this one waited (they hold the
            // group); what it got is its own.
            (Ok(more), None) => {
                groups.insert(
                    request.test.clone(),
                    Group {
                        permits: more,
                        clients: 1,
                        waiting: 0,
                    },
                );
                Ok(self.lease(&request.test))
            }
            (Err(error), None) => Err(error),
        }
    }

    fn exhausted(&self, asked: u32) -> Error {
        Error::BudgetExhausted {
            sessions: self.sessions,
            asked,
            waited: self.wait,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl Leases {
        async fn acquire_for_test(
            self: &Arc<Leases>,
            request: Option<Request>,
        ) -> Result<Lease, Error> {
            let sessions = Sessions::new(crate::Budget::new(self.sessions));
            self.acquire(request, &sessions).await
        }
    }

    fn request(test: &str, sessions: u32) -> Option<Request> {
        Some(Request {
            test: test.into(),
            sessions,
        })
    }

    #[test]
    fn the_option_names_a_test_and_its_sessions() {
        assert_eq!(Request::parse("t-1:3"), request("t-1", 3));
        assert_eq!(Request::parse("a:b:2"), request("a:b", 2));
        assert_eq!(Request::parse("t:0"), None);
        assert_eq!(Request::parse(":2"), None);
        assert_eq!(Request::parse("t"), None);
    }

    #[test]
    fn the_lease_option_is_read_from_the_startup_options() {
        let params = |options: &str| {
            vec![
                ("user".to_owned(), "app".to_owned()),
                ("options".to_owned(), options.to_owned()),
            ]
        };
        assert_eq!(
            request_of(&params("-csearch_path=t_a,public -cpgharness.lease=abc:3")),
            super::tests::request("abc", 3)
        );
        assert_eq!(
            request_of(&params("-c pgharness.lease=abc:2")),
            super::tests::request("abc", 2)
        );
        assert_eq!(request_of(&params("-cstatement_timeout=5s")), None);
        assert_eq!(request_of(&params("")[..1]), None);
    }

    #[tokio::test]
    async fn a_test_waits_for_all_of_its_sessions_at_once_and_its_later_clients_never_wait() {
        let leases = Leases::new(4, Duration::from_millis(200));
        let a1 = leases.acquire_for_test(request("a", 3)).await.unwrap();
        assert_eq!(leases.reserved(), 3);
        // b asks for 3: only 1 is free, so b waits, holding nothing, and is refused in time.
        let refused = leases
            .acquire_for_test(request("b", 3))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(refused, Error::BudgetExhausted { asked: 3, .. }),
            "{refused}"
        );
        assert_eq!(leases.reserved(), 3, "b holds nothing after its wait");
        // a's later clients come from its reservation, at once.
        let a2 = leases.acquire_for_test(request("a", 3)).await.unwrap();
        let a3 = leases.acquire_for_test(request("a", 3)).await.unwrap();
        assert_eq!(leases.reserved(), 3);
        // A fourth is beyond the reservation: the free session is taken without waiting.
        let a4 = leases.acquire_for_test(request("a", 3)).await.unwrap();
        assert_eq!(leases.reserved(), 4);
        // A fifth finds the budget full: refused at once, never waits while a holds four.
        let started = std::time::Instant::now();
        let error = leases
            .acquire_for_test(request("a", 3))
            .await
            .err()
            .unwrap();
        assert!(started.elapsed() < Duration::from_millis(100));
        assert!(
            matches!(
                error,
                Error::OverBudget {
                    holding: 4,
                    sessions: 4,
                    ..
                }
            ),
            "{error}"
        );
        // The reservation ends with a's last client; then b gets its three.
        drop((a1, a2, a3));
        assert_eq!(leases.reserved(), 4, "a still has a client");
        drop(a4);
        assert_eq!(leases.reserved(), 0);
        let _b = leases.acquire_for_test(request("b", 3)).await.unwrap();
        assert_eq!(leases.reserved(), 3);
    }

    #[tokio::test]
    async fn many_tests_on_a_small_budget_all_finish() {
        // Budget 8, 32 tests of 3 sessions each, every test holding its first session while
        // it opens the other two: without reservations this deadlocks.
        let leases = Leases::new(8, Duration::from_secs(30));
        let tasks: Vec<_> = (0..32)
            .map(|k| {
                let leases = leases.clone();
                tokio::spawn(async move {
                    let id = format!("t{k}");
                    let first = leases.acquire_for_test(request(&id, 3)).await?;
                    tokio::task::yield_now().await;
                    let second = leases.acquire_for_test(request(&id, 3)).await?;
                    let third = leases.acquire_for_test(request(&id, 3)).await?;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    drop((first, second, third));
                    Ok::<_, Error>(())
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap().expect("every test gets its sessions");
        }
        assert_eq!(leases.reserved(), 0);
    }

    #[tokio::test]
    async fn beyond_its_reservation_a_test_waits_for_a_session_another_test_gives_back() {
        let leases = Leases::new(4, Duration::from_secs(30));
        let a = leases.acquire_for_test(request("a", 2)).await.unwrap();
        let a2 = leases.acquire_for_test(request("a", 2)).await.unwrap();
        let b = leases.acquire_for_test(request("b", 2)).await.unwrap();
        // a's third client waits (b holds the rest and waits for nothing: no deadlock)…
        let waiter = tokio::spawn({
            let leases = leases.clone();
            async move { leases.acquire_for_test(request("a", 2)).await.map(|_| ()) }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!waiter.is_finished(), "it waits while b's test runs");
        // …until b's test ends.
        drop(b);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("given b's session")
            .unwrap()
            .unwrap();
        drop((a, a2));
    }

    #[tokio::test]
    async fn two_tests_waiting_on_each_other_are_refused_not_left_waiting() {
        let leases = Leases::new(4, Duration::from_secs(30));
        let mut holders = HashMap::new();
        for test in ["a", "b"] {
            let first = leases.acquire_for_test(request(test, 2)).await.unwrap();
            let second = leases.acquire_for_test(request(test, 2)).await.unwrap();
            holders.insert(test, (first, second));
        }
        let started = std::time::Instant::now();
        let mut waiters: HashMap<_, _> = ["a", "b"]
            .into_iter()
            .map(|test| {
                let leases = leases.clone();
                let waiter = tokio::spawn(async move {
                    leases.acquire_for_test(request(test, 2)).await.map(drop)
                });
                (test, waiter)
            })
            .collect();
        // Each waits for a session the other holds: one of them (or both) is refused at
        // once, rather than both waiting out the budget's 30 s.
        let refused = loop {
            if let Some(test) = waiters
                .iter()
                .find(|(_, w)| w.is_finished())
                .map(|(t, _)| *t)
            {
                break test;
            }
            assert!(started.elapsed() < Duration::from_secs(1), "nobody refused");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let error = waiters
            .remove(refused)
            .unwrap()
            .await
            .unwrap()
            .err()
            .unwrap();
        assert!(
            matches!(
                error,
                Error::OverBudget {
                    holding: 2,
                    sessions: 4,
                    ..
                }
            ),
            "{error}"
        );
        // The refused test fails and ends; the other, if still waiting, gets its session.
        holders.remove(refused);
        for (_, waiter) in waiters {
            let outcome = tokio::time::timeout(Duration::from_secs(1), waiter)
                .await
                .expect("the other test does not wait on")
                .unwrap();
            assert!(matches!(outcome, Ok(()) | Err(Error::OverBudget { .. })));
        }
    }

    #[tokio::test]
    async fn a_test_that_asks_for_more_than_the_budget_is_told_at_once() {
        let leases = Leases::new(2, Duration::from_secs(30));
        let error = leases
            .acquire_for_test(request("a", 3))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(
                error,
                Error::OverBudget {
                    asked: 3,
                    sessions: 2,
                    ..
                }
            ),
            "{error}"
        );
    }
}
