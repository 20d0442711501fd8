//! The SSM Session Manager data channel for port forwarding, as spoken on the wire
//! (`shared/ssm-protocol.md`), without any I/O: a codec for the binary messages, smux v1
//! frames, the JSON payloads and the reliability layer (`channel`). It knows nothing of tokio, sockets, clocks or credentials.
#![warn(missing_docs)]

pub mod channel;
pub mod handshake;
pub mod liveness;
pub mod message;
pub mod mux;
pub mod payload;
pub mod smux;

pub use message::{DecodeError, Message, PayloadType};
