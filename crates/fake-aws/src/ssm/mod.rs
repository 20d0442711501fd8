//! The SSM side: the control plane (AWS JSON 1.1 over HTTP, SigV4-verified) and the data
//! channel websocket where an emulated agent forwards ports (ssm-protocol.md).

mod agent;
mod api;
mod faults;
mod service;
mod state;

pub use faults::Faults;
pub use service::{SessionRecord, SsmConfig, SsmService};
