//! The port-forwarding handshake (ssm-protocol.md §5, §6): what the client answers, and
//! which mode the session runs in.

use std::cmp::Ordering;

use serde_json::Value;

use crate::payload::{
    HandshakeRequest, HandshakeResponse, ProcessedClientAction, compare_versions,
};

/// The version this client announces: ≥ 1.1.70 selects mux mode, > 1.2.331.0 makes the
/// agent turn smux keepalive off.
pub const CLIENT_VERSION: &str = "1.2.677.0";

/// How streams are carried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// smux v1: many streams at once. `keepalive`: the client must send a NOP every 10 s
    /// (agents up to 3.1.1511.0 keep smux keepalive on).
    Mux {
        /// Send NOPs.
        keepalive: bool,
    },
    /// One connection at a time, raw bytes, `DisconnectToPort` when it ends.
    Basic,
}

/// What the agent asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortSession {
    /// The agent's version.
    pub agent_version: String,
    /// `portNumber`: the remote port.
    pub port_number: String,
    /// `host`: the remote host (absent for AWS-StartPortForwardingSession).
    pub host: Option<String>,
    /// `localPortNumber`: the local port the user asked for, if any.
    pub local_port_number: Option<String>,
    /// `type`: `LocalPortForwarding`.
    pub forwarding_type: String,
    /// The mode both sides will use.
    pub mode: Mode,
    /// HandshakeComplete's CustomerMessage (empty until then, and when the service sends
    /// none); AWS's plugin prints a non-empty one.
    pub customer_message: String,
}

/// The mode for an agent version, forwarding type and client version.
pub fn select_mode(agent_version: &str, forwarding_type: &str, client_version: &str) -> Mode {
    let agent_new_enough = compare_versions(agent_version, "3.0.196.0") == Some(Ordering::Greater);
    let client_new_enough = matches!(
        compare_versions(client_version, "1.1.70.0"),
        Some(Ordering::Greater | Ordering::Equal)
    );
    if forwarding_type == "LocalPortForwarding" && agent_new_enough && client_new_enough {
        let agent_keepalive_off =
            compare_versions(agent_version, "3.1.1511.0") == Some(Ordering::Greater);
        Mode::Mux {
            keepalive: !agent_keepalive_off,
        }
    } else {
        Mode::Basic
    }
}

/// Why a handshake request describes no port-forwarding session.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// The request has no `SessionType` action.
    #[error("the agent asked for no SessionType")]
    NoSessionType,
    /// The session is not port forwarding (an interactive shell, a command).
    #[error("session type {0} is not Port")]
    NotPort(String),
}

/// The client's answer to a handshake request, and the session it describes. Actions it
/// does not know are answered as the official client does (status 0, result 3).
pub fn respond(
    request: &HandshakeRequest,
) -> (HandshakeResponse, Result<PortSession, HandshakeError>) {
    let mut processed = Vec::new();
    let mut errors = Vec::new();
    let mut session = Err(HandshakeError::NoSessionType);
    for action in &request.requested_client_actions {
        if action.action_type == "SessionType" {
            let parameters = &action.action_parameters;
            let text = |v: &Value| v.as_str().map(str::to_owned);
            let properties = &parameters["Properties"];
            if parameters["SessionType"] != "Port" {
                let error = HandshakeError::NotPort(parameters["SessionType"].to_string());
                processed.push(ProcessedClientAction {
                    action_type: action.action_type.clone(),
                    action_status: 2,
                    action_result: Value::Null,
                    error: error.to_string(),
                });
                session = Err(error);
                continue;
            }
            let forwarding_type =
                text(&properties["type"]).unwrap_or_else(|| "LocalPortForwarding".into());
            session = Ok(PortSession {
                agent_version: request.agent_version.clone(),
                port_number: text(&properties["portNumber"]).unwrap_or_default(),
                host: text(&properties["host"]),
                local_port_number: text(&properties["localPortNumber"]),
                mode: select_mode(&request.agent_version, &forwarding_type, CLIENT_VERSION),
                forwarding_type,
                customer_message: String::new(),
            });
            processed.push(ProcessedClientAction {
                action_type: action.action_type.clone(),
                action_status: 1,
                action_result: Value::Null,
                error: String::new(),
            });
        } else {
            let error = format!("Unsupported action {}", action.action_type);
            processed.push(ProcessedClientAction {
                action_type: action.action_type.clone(),
                action_status: 0,
                action_result: Value::from(3),
                error: error.clone(),
            });
            errors.push(error);
        }
    }
    let response = HandshakeResponse {
        client_version: CLIENT_VERSION.into(),
        processed_client_actions: processed,
        errors: (!errors.is_empty()).then_some(errors),
    };
    (response, session)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_follow_the_official_rules() {
        assert_eq!(
            select_mode("3.3.987.0", "LocalPortForwarding", CLIENT_VERSION),
            Mode::Mux { keepalive: false }
        );
        assert_eq!(
            select_mode("3.1.1000.0", "LocalPortForwarding", CLIENT_VERSION),
            Mode::Mux { keepalive: true }
        );
        assert_eq!(
            select_mode("3.0.196.0", "LocalPortForwarding", CLIENT_VERSION),
            Mode::Basic,
            "3.0.196.0 itself is basic"
        );
        assert_eq!(
            select_mode("3.3.987", "LocalPortForwarding", CLIENT_VERSION),
            Mode::Basic,
            "three parts fall back"
        );
        assert_eq!(
            select_mode("3.3.987.0", "Other", CLIENT_VERSION),
            Mode::Basic
        );
        assert_eq!(
            select_mode("3.3.987.0", "LocalPortForwarding", "1.1.69.0"),
            Mode::Basic
        );
    }

    #[test]
    fn answers_the_request_and_reads_the_properties() {
        let request: HandshakeRequest = serde_json::from_str(r#"{"AgentVersion":"3.3.987.0","RequestedClientActions":[{"ActionType":"SessionType","ActionParameters":{"SessionType":"Port","Properties":{"portNumber":"5432","type":"LocalPortForwarding","localPortNumber":"1053","host":"db.example"}}},{"ActionType":"KMSEncryption","ActionParameters":{}}]}"#).unwrap();
        let (response, session) = respond(&request);
        let session = session.unwrap();
        assert_eq!(
            (session.port_number.as_str(), session.host.as_deref()),
            ("5432", Some("db.example"))
        );
        assert_eq!(session.mode, Mode::Mux { keepalive: false });
        assert_eq!(response.processed_client_actions[0].action_status, 1);
        assert_eq!(
            response.processed_client_actions[1].action_result,
            Value::from(3)
        );
        assert_eq!(
            response.errors.unwrap(),
            ["Unsupported action KMSEncryption"]
        );
    }
}
