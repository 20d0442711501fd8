//! Nothing but tests: `tests/suite.rs` holds the 40 + 40 trivial tests whose wall time
//! `cargo xtask bench` compares (`suite_overhead_per_test_ms`). They are `#[ignore]`d, so
//! that only the bench runs them (`--run-ignored only`).
