//! Faults the fake SSM session can inject, per session, in both directions.

use std::time::Duration;

/// What goes wrong on a session's data channel (all off by default).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Faults {
    /// Added one-way delay per message (half an RTT).
    pub latency: Duration,
    /// Probability a message is dropped.
    pub loss: f64,
    /// Probability a message is delivered twice.
    pub duplicate: f64,
    /// Probability a message is held back 1–40 ms (reordering it).
    pub reorder: f64,
    /// Close the first websocket with `1000 Bye` right after the frame that brings the
    /// client→agent bytes to this many.
    pub bye_after_bytes: Option<u64>,
    /// Close the first websocket with `1000 Bye` after this long.
    pub bye_after: Option<Duration>,
    /// Wait this long before sending the handshake request.
    pub slow_handshake: Duration,
    /// Basic mode's late bytes, made certain: on DisconnectToPort the agent closes only its
    /// sending half to the remote host, forwards whatever the host still sends until it
    /// closes (a TLS close_notify, a goodbye message) after acknowledging the flag, and
    /// only then reads the client's next message. A real agent forwards bytes it read just
    /// before it handled the flag, and bytes in flight arrive after the flag was sent; a
    /// client must never hand them to its next connection (ssm-protocol.md §6).
    pub late_bytes: bool,
}

impl Faults {
    /// Whether any per-message fault is on.
    pub(crate) fn lossy(&self) -> bool {
        self.loss > 0.0 || self.duplicate > 0.0 || self.reorder > 0.0 || !self.latency.is_zero()
    }
}
