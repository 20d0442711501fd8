//! Lifecycle events. The library reports what it is waiting for; the caller decides how to
//! show it (xtask draws progress bars, tests leave it to `tracing`).

use std::time::Duration;

/// Something a long wait is doing. Every event is also logged with `tracing`. Events
/// serialise (serde), so that a background process can report them to the one that
/// started it (`pgharness-rds`'s proxy to `cargo pgharness up`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum Event {
    /// Looking for a usable backend.
    Probing {
        /// The backend being tried.
        backend: String,
    },
    /// A container is being created from an image.
    CreatingContainer {
        /// Container name.
        name: String,
        /// Image reference.
        image: String,
    },
    /// An existing container is joined.
    JoinedContainer {
        /// Container name.
        name: String,
    },
    /// A native server's data directory is being initialised.
    InitialisingCluster {
        /// The data directory.
        data_dir: String,
    },
    /// A native server is starting.
    StartingServer {
        /// Where it listens: its Unix socket, or `127.0.0.1:<port>` (`native_tcp`).
        listen: String,
    },
    /// Still waiting for the server to accept connections.
    WaitingForServer {
        /// Why the last attempt failed.
        reason: String,
        /// Time spent waiting so far.
        waited: Duration,
    },
    /// The server answered `SELECT 1`.
    ServerReady {
        /// Time from the first attempt.
        after: Duration,
    },
    /// An SSM session to the database host is being opened (rds backend).
    OpeningTunnel {
        /// The jumphost's instance id.
        target: String,
        /// The database host and port, as the jumphost dials them.
        host: String,
        /// Its port.
        port: u16,
    },
    /// The SSM session of an RDS proxy that died (killed, or its machine slept) was left
    /// open, with its database sessions and their locks behind it: it was terminated.
    EndedStaleSession {
        /// The session id.
        session: String,
        /// The dead proxy's pid.
        pid: i32,
    },
    /// The SSM session is open.
    TunnelOpen {
        /// Its session id.
        session: String,
    },
    /// Logging in to the database with an IAM token (rds backend).
    LoggingIn {
        /// The endpoint.
        host: String,
        /// The IAM database user.
        user: String,
    },
    /// The database does not accept connections yet (an Aurora cluster resuming, a tunnel
    /// coming up).
    WaitingForDatabase {
        /// Time spent waiting so far.
        waited: Duration,
        /// The last failure.
        reason: String,
    },
}

/// Receives events; `&dyn Fn(Event)` keeps the library free of any UI.
pub type EventSink<'a> = &'a (dyn Fn(Event) + Send + Sync);

/// A sink that only logs.
pub fn log_only(event: Event) {
    tracing::debug!(?event, "pgharness event");
}

/// Reports `event` to `sink`, logging it too (for libraries that report pgharness events,
/// such as `pgharness-rds`).
pub fn emit(sink: EventSink<'_>, event: Event) {
    tracing::debug!(?event, "pgharness event");
    sink(event);
}
