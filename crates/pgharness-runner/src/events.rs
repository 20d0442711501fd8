//! What a run reports while it goes, as cargo-nextest's runner reports to its reporter:
//! typed events, rendered by the command layer (`cargo pgharness`'s spinner and lines) or
//! by anything else that wants them. The runner itself never prints.

use std::time::Duration;

use pgharness::BackendKind;
use pgharness::events::Event;
use pgharness::ledger::RunSummary;

/// One step of a run, or one fact about it worth telling the user.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum RunEvent {
    /// A long step starts (a spinner on a terminal).
    StepStarted(String),
    /// What the step under way is doing now, from pgharness or the RDS proxy.
    Step(Event),
    /// A line of progress of the step under way (an image build's output).
    StepProgress(String),
    /// The step under way ended.
    StepFinished(String),
    /// Schemas older runs left behind were dropped before the tests.
    Reaped {
        /// How many.
        schemas: usize,
    },
    /// How many database tests may run at once, and why.
    Budget {
        /// The server's `max_connections`.
        max_connections: u32,
        /// The RDS proxy's session budget (`rds.max_sessions`), on the rds backend.
        rds_sessions: Option<u32>,
        /// Connections each test's pool may open.
        pool_size: usize,
        /// Database tests at once (nextest's `@tool:pgharness:db` group).
        threads: u32,
    },
    /// Through the RDS path the run uses as many test threads as the budget allows.
    LatencyBoundThreads {
        /// How many.
        threads: u32,
    },
    /// The schema pool was filled while the tests built, before they ran.
    PoolReady {
        /// Ready schemas.
        ready: u64,
        /// How long the build and the filling took together.
        waited: Duration,
    },
    /// nextest runs now.
    NextestStarted,
    /// Ctrl-C reached nextest; the run waits for it, then cleans up.
    Interrupted,
    /// The server went away during the run (its ledger with it): no summary.
    ServerWentAway {
        /// The backend.
        kind: BackendKind,
        /// Where it was.
        server: String,
    },
    /// The RDS proxy died during the run.
    ProxyDied {
        /// Its pid.
        pid: i32,
        /// Its log file.
        log: String,
    },
    /// The run's figures from the ledger.
    Summary(Box<RunSummary>),
    /// A schema kept for inspection (a failed test), and how to look at it.
    KeptSchema {
        /// The schema.
        schema: String,
        /// The test that used it.
        test: String,
        /// A psql command that opens it (no password on it).
        psql: String,
    },
    /// A test's teardown failed on the server after the test had moved on (recorded in the
    /// acquire log); its schema is left for the janitor or the reaper.
    TeardownFailed {
        /// The test.
        test: String,
        /// `failed: <SQLSTATE> <message>`.
        outcome: String,
    },
    /// The server stays up for the kept schemas.
    ServerKeptForSchemas {
        /// The backend.
        kind: BackendKind,
        /// A native server's idle stop.
        idle_stop: Option<Duration>,
    },
    /// Another run still uses the server; the last one to end stops it.
    ServerStillShared {
        /// The backend.
        kind: BackendKind,
    },
    /// The rds backend runs the workspace without pgharness's own integration tests.
    RdsDefaultSelection,
    /// The RDS proxy (and the emulator) stay up for the kept schemas.
    ProxyKeptForSchemas {
        /// Whether the emulator stays up too.
        emulated: bool,
    },
    /// A proxy an earlier `up` started stays up after the run.
    ProxyOfUpKept,
    /// The RDS proxy already runs.
    ProxyRunning {
        /// Its pid.
        pid: i32,
    },
    /// What fake-aws counted for this run.
    EmulatorSessions {
        /// StartSession calls of this run.
        start_sessions: u64,
        /// Of them, still open after the run.
        open: usize,
    },
    /// Something the run started was stopped.
    Stopped(String),
    /// A Postgres image is missing and will be built from Debian packages.
    BuildingImage {
        /// The image.
        tag: String,
        /// Why the backend did not start.
        because: String,
    },
    /// Something worth a warning that does not stop the run.
    Warning(String),
}

/// Where a run's events go: the command layer's renderer, a test's collector.
pub type Reporter<'a> = &'a (dyn Fn(RunEvent) + Sync);

/// A reporter that only logs, through `tracing`.
pub fn log_only(event: RunEvent) {
    tracing::info!(?event, "pgharness run");
}
