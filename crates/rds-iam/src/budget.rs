//! One budget of upstream sessions for every proxy in front of a cluster: several CI shards
//! on several machines, each with its proxy, together never hold more than
//! [`Budget::sessions`] sessions.
//!
//! The proxies share nothing but the server, so the budget lives there: each upstream session
//! holds one of `sessions` *slot* advisory locks (`pg_try_advisory_lock(lock_space, 1..=n)`,
//! taken right after its login and re-taken after each client's `DISCARD ALL`, which releases
//! it). A session that finds no slot free is closed, or, when a client waits for it, kept as
//! the proxy's one connection that polls for a slot and raises the *waiting flag* (a shared
//! advisory lock on key 0 of the same space); a proxy that sees the flag of another gives back
//! the slots of its idle sessions. Advisory locks are per database, so the budget is per
//! database too.
//!
//! What the server can see at most, then: `sessions` sessions holding slots, plus, for each
//! proxy, [`Budget::logins_without_slot`] logins that have not taken one yet.

use std::time::Duration;

/// The upstream sessions that all proxies sharing a lock space may hold at once, and how long
/// a client waits for one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// The most upstream sessions all proxies on this budget hold at once.
    pub sessions: u32,
    /// Key 1 of the slots' two-key advisory locks: proxies with the same space share the
    /// budget. [`Budget::LOCK_SPACE`] unless two budgets must stay apart on one server.
    pub lock_space: i32,
    /// How long a client waits for a session before it is refused with `53300`.
    pub wait: Duration,
    /// Logins a proxy runs at once before their session holds a slot: the margin each proxy
    /// may add to `sessions` for an instant, and how fast a burst of clients gets sessions
    /// (a login is about five round trips of the link).
    pub logins_without_slot: u32,
}

impl Budget {
    /// The slots' lock space: `"pgh"` and 3 (pgharness's own locks use 0 to 2).
    pub const LOCK_SPACE: i32 = 0x7067_6803;
    /// How long a client waits by default: well under a test runner's timeout (nextest's
    /// slow-timeout kills at 120 s in our profiles), so that a test told `53300` names the
    /// budget instead of being killed without a word.
    pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);
    /// Logins at once before their session holds a slot, by default.
    pub const DEFAULT_LOGINS_WITHOUT_SLOT: u32 = 8;

    /// A budget of `sessions` (at least 1) on the default lock space.
    pub fn new(sessions: u32) -> Budget {
        Budget {
            sessions: sessions.max(1),
            lock_space: Budget::LOCK_SPACE,
            wait: Budget::DEFAULT_WAIT,
            logins_without_slot: Budget::DEFAULT_LOGINS_WITHOUT_SLOT,
        }
    }

    /// One statement that takes a free slot, trying `first` first and then the next ones in
    /// turn, and answers the slot taken (or NULL when all are held) and whether another
    /// session waits for one (its flag is up). `LIMIT 1` stops the scan at the first lock
    /// taken, so a session never holds two slots.
    pub(crate) fn claim_statement(&self, first: u32) -> String {
        let (space, n) = (self.lock_space, self.sessions);
        let start = first.saturating_sub(1) % n;
        format!(
            "SELECT (SELECT 1 + (s + {start}) % {n} FROM generate_series(0, {last}) s \
             WHERE pg_catalog.pg_try_advisory_lock({space}, 1 + (s + {start}) % {n}) LIMIT 1), {waiting}",
            last = n - 1,
            waiting = self.others_waiting(),
        )
    }

    /// Whether another session's waiting flag is up, as an SQL expression.
    pub(crate) fn others_waiting(&self) -> String {
        format!(
            "EXISTS (SELECT 1 FROM pg_catalog.pg_locks WHERE locktype = 'advisory' AND granted \
             AND classid = {space} AND objid = 0 AND objsubid = 2 AND pid <> pg_catalog.pg_backend_pid())",
            space = self.lock_space
        )
    }

    /// Raises this session's waiting flag.
    pub(crate) fn raise_flag(&self) -> String {
        format!(
            "SELECT pg_catalog.pg_advisory_lock_shared({}, 0)",
            self.lock_space
        )
    }

    /// Lowers it again.
    pub(crate) fn lower_flag(&self) -> String {
        format!(
            "SELECT pg_catalog.pg_advisory_unlock_shared({}, 0)",
            self.lock_space
        )
    }
}

impl Default for Budget {
    /// 64 sessions: within the `max_connections` of the smallest Aurora Serverless v2
    /// capacity (0.5 ACU, 189) with room for the app and its admins.
    fn default() -> Budget {
        Budget::new(64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_starts_at_the_slot_asked_for_and_wraps() {
        let budget = Budget {
            sessions: 3,
            lock_space: 7,
            wait: Duration::ZERO,
            logins_without_slot: 1,
        };
        let sql = budget.claim_statement(3);
        assert!(
            sql.starts_with(
                "SELECT (SELECT 1 + (s + 2) % 3 FROM generate_series(0, 2) s \
                 WHERE pg_catalog.pg_try_advisory_lock(7, 1 + (s + 2) % 3) LIMIT 1), EXISTS"
            ),
            "{sql}"
        );
        // Slot 0 is the flag, never a slot; a stale slot number beyond the budget wraps.
        assert!(budget.claim_statement(0).contains("(s + 0) % 3"));
        assert!(budget.claim_statement(5).contains("(s + 1) % 3"));
        assert_eq!(Budget::new(0).sessions, 1);
    }
}
