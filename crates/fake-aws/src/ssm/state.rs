//! The service's shared state: the sessions it knows and what the control plane, the
//! websocket endpoint and the agents all read (its own module, so that `api`, `agent` and
//! `service` each depend on it rather than on one another).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use tokio::sync::mpsc;

use super::service::{SessionRecord, SsmConfig};
use crate::credentials::CredentialStore;

/// One session as the service holds it: its record, its tokens and its agent's channels.
pub(crate) struct SessionSlot {
    pub(crate) record: SessionRecord,
    pub(crate) token: String,
    /// Tokens this session was given before `token` (one per resume).
    pub(crate) earlier_tokens: Vec<String>,
    pub(crate) attach: mpsc::UnboundedSender<super::agent::Attachment>,
    pub(crate) control: mpsc::UnboundedSender<super::agent::Control>,
    pub(crate) cell: u32,
}

/// Everything the service's parts share.
pub(crate) struct State {
    pub(crate) config: Mutex<SsmConfig>,
    pub(crate) credentials: Arc<CredentialStore>,
    pub(crate) sessions: Mutex<HashMap<String, SessionSlot>>,
    pub(crate) start_sessions: Mutex<u64>,
    pub(crate) addr: SocketAddr,
    /// Accepted sockets, and those of them the kernel reports with TCP_NODELAY.
    pub(crate) accepted: (AtomicU64, AtomicU64),
}
