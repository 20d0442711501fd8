//! The connection budget: how many tests may run at once on a server without running it
//! out of connection slots (`53300 too many clients`).

/// Connections one test may hold: its control client plus its pool.
pub fn per_test_connections(pool_size: usize) -> u32 {
    pool_size as u32 + 1
}

/// Connections kept free for everything that is not a test: the janitor, the run lock,
/// a developer's psql, and the server's reserved superuser slots.
pub const RESERVED: u32 = 6;

/// How many tests may run at once: the slots left after `in_use` and the reserve,
/// divided by what one test may take; at least one.
pub fn max_parallel_tests(
    max_connections: u32,
    reserved_for_superuser: u32,
    in_use: u32,
    pool_size: usize,
) -> u32 {
    let free = max_connections.saturating_sub(reserved_for_superuser + in_use + RESERVED);
    (free / per_test_connections(pool_size)).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_hundred_slots_fit_thirty_tests_of_pool_two() {
        // 100 - 3 reserved for superusers - 1 in use - 6 = 90 slots, 3 per test.
        assert_eq!(max_parallel_tests(100, 3, 1, 2), 30);
        assert!(
            max_parallel_tests(100, 3, 1, 2) * per_test_connections(2) + 3 + 1 + RESERVED <= 100
        );
    }

    #[test]
    fn never_zero() {
        assert_eq!(max_parallel_tests(10, 3, 20, 8), 1);
    }
}
