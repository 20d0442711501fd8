//! Native SSM Session Manager port forwarding: what `aws ssm start-session` +
//! session-manager-plugin do for `AWS-StartPortForwardingSessionToRemoteHost`, as a library
//! and a scriptable CLI. The protocol itself lives, without I/O, in `ssm-proto`; this crate
//! is the thin tokio layer: the SSM API calls, the websocket and the session driver.
#![warn(missing_docs)]

pub mod control;
mod driver;
mod error;
mod stream;
mod tunnel;
mod websocket;

pub use error::{BoxError, Error};
pub use ssm_proto::handshake::Mode;
pub use stream::TunnelStream;
pub use tunnel::{LivenessConfig, Tunnel, TunnelConfig};
