//! pgharness's run lifecycle as a library: what `cargo pgharness test` does around
//! cargo-nextest, for any workspace and any command layer (cargo-nextest's runner emits
//! events to a reporter in the same way).
//!
//! - [`run::TestRun`]: the runs lock, the server started or joined once
//!   ([`servers`]), stale schemas reaped, nextest's DB test group sized from the server's
//!   connection budget ([`nextest`]), the [`janitor::Janitor`] recycling and warming while
//!   the tests run, the summary, teardown by the last run to end ([`runs`]).
//! - [`servers::up_local`], [`servers::stop_all`], [`reap`]: `up`, `down`, `reap`.
//! - With the `rds` feature: the background RDS proxy ([`rds`]) and the emulated AWS
//!   ([`emulator`]); without it nothing of the AWS SDK, the tunnel or fake-aws is built.
//! - With the `container` feature: the Postgres image built from Debian packages ([`image`]).
//!
//! Everything is reported as [`events::RunEvent`]s; nothing here prints.
//!
//! The RDS proxy and the emulator run as background processes of **this very program**:
//! a binary using this crate for the rds backend must mount the hidden commands
//! [`RDS_PROXY_COMMAND`] and [`FAKE_AWS_COMMAND`] (`cargo_pgharness::Command` does).

#[cfg(feature = "rds")]
pub mod emulator;
pub mod error;
pub mod events;
#[cfg(feature = "container")]
pub mod image;
pub mod janitor;
pub mod nextest;
#[cfg(feature = "rds")]
pub mod rds;
pub mod reap;
pub mod run;
pub mod runs;
pub mod servers;

use std::path::PathBuf;

pub use error::{Error, ErrorKind, Result};
pub use events::{Reporter, RunEvent};
pub use run::{EmulatorOptions, TestRun};

/// The hidden command that runs the background RDS proxy.
pub const RDS_PROXY_COMMAND: &str = "__rds-proxy";
/// The hidden command that runs fake-aws (the emulated AWS), with fake-aws's own arguments.
pub const FAKE_AWS_COMMAND: &str = "__fake-aws";

/// This very program, to start its background processes: a build during the run (tests of
/// a command layer build its binary) replaces the file, after which `current_exe()` names a
/// deleted path, while `/proc/self/exe` still runs this image.
pub fn self_exe() -> PathBuf {
    let proc_exe = PathBuf::from("/proc/self/exe");
    if proc_exe.exists() {
        return proc_exe;
    }
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("cargo-pgharness"))
}

/// An error and its causes on one line, each said once: a cause whose text its parent's
/// message already carries (libraries that put the cause in their message and also return
/// it from `source()`) is not repeated.
pub fn render(error: &(dyn std::error::Error + 'static)) -> String {
    let mut said = String::new();
    for cause in std::iter::successors(Some(error), |e| e.source()) {
        let text = cause.to_string();
        if text.is_empty() || said.contains(&text) {
            continue;
        }
        if !said.is_empty() {
            said.push_str(": ");
        }
        said.push_str(&text);
    }
    said
}

#[cfg(test)]
mod render_tests {
    #[derive(Debug)]
    struct Leaf;
    impl std::fmt::Display for Leaf {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connection refused")
        }
    }
    impl std::error::Error for Leaf {}

    /// A message that embeds its cause and also returns it.
    #[derive(Debug)]
    struct Embeds(Leaf);
    impl std::fmt::Display for Embeds {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "failed to log in: {}", self.0)
        }
    }
    impl std::error::Error for Embeds {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let error = Embeds(Leaf);
        assert_eq!(
            format!("{error}: {}", Leaf)
                .matches("connection refused")
                .count(),
            1 + 1,
            "the chain printed naively repeats the cause"
        );
        assert_eq!(
            super::render(&error),
            "failed to log in: connection refused"
        );
    }
}
