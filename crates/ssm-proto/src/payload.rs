//! The JSON payloads of the data channel (ssm-protocol.md §2, §4, §5, §7) and flags.

use serde::{Deserialize, Serialize};

/// The first text frame on a new or resumed websocket.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct OpenDataChannel {
    /// "1.0".
    pub message_schema_version: String,
    /// A new UUID v4 per open.
    pub request_id: String,
    /// The session token from StartSession or ResumeSession. Never log it.
    pub token_value: String,
    /// One UUID v4 per client process.
    pub client_id: String,
    /// The client's version, `x.y.z.w`.
    pub client_version: String,
}

/// An action the agent asks the client to take in the handshake.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct RequestedClientAction {
    /// "SessionType" for port forwarding.
    pub action_type: String,
    /// For SessionType: `{"SessionType":"Port","Properties":{…}}`.
    #[serde(default)]
    pub action_parameters: serde_json::Value,
}

/// PayloadType 5, agent → client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeRequest {
    /// E.g. "3.3.987.0".
    pub agent_version: String,
    /// What the client must do.
    #[serde(default)]
    pub requested_client_actions: Vec<RequestedClientAction>,
}

/// One processed action in the client's response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ProcessedClientAction {
    /// The action's type.
    pub action_type: String,
    /// 1 success, 2 failed, 3 unsupported (the official client also sends 0 with
    /// ActionResult 3 for unknown actions).
    pub action_status: i32,
    /// Usually null.
    #[serde(default)]
    pub action_result: serde_json::Value,
    /// "" when fine.
    #[serde(default)]
    pub error: String,
}

/// PayloadType 6, client → agent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeResponse {
    /// The client's version: ≥ 1.1.70 selects mux, > 1.2.331.0 turns smux keepalive off.
    pub client_version: String,
    /// One entry per requested action.
    pub processed_client_actions: Vec<ProcessedClientAction>,
    /// null, or a list of messages.
    #[serde(default)]
    pub errors: Option<Vec<String>>,
}

/// PayloadType 7, agent → client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HandshakeComplete {
    /// Nanoseconds the handshake took.
    pub handshake_time_to_complete: i64,
    /// Printed when not empty.
    #[serde(default)]
    pub customer_message: String,
}

/// The payload of an `acknowledge` message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Acknowledge {
    /// The type of the message acknowledged.
    pub acknowledged_message_type: String,
    /// Its id, lower-case hyphenated.
    pub acknowledged_message_id: String,
    /// Its sequence number: what acks are matched on.
    pub acknowledged_message_sequence_number: i64,
    /// Always true.
    pub is_sequential_message: bool,
}

/// The payload of `channel_closed` (CreatedDate is a string, SchemaVersion a number).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ChannelClosed {
    /// The message's id.
    #[serde(default)]
    pub message_id: String,
    /// When, as text.
    #[serde(default)]
    pub created_date: String,
    /// The target.
    #[serde(default)]
    pub destination_id: String,
    /// The session.
    #[serde(default)]
    pub session_id: String,
    /// "channel_closed".
    #[serde(default)]
    pub message_type: String,
    /// 1.
    #[serde(default)]
    pub schema_version: i64,
    /// Why, for people.
    #[serde(default)]
    pub output: String,
}

/// Flag payloads (PayloadType 10): a 4-byte big-endian number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flag {
    /// 1: client, basic mode: the local connection ended.
    DisconnectToPort,
    /// 2: client: end the session.
    TerminateSession,
    /// 3: agent, mux mode: dialing the remote port failed.
    ConnectToPortError,
    /// Anything else.
    Other(u32),
}

impl Flag {
    /// The 4-byte payload.
    pub fn to_payload(self) -> Vec<u8> {
        let value = match self {
            Flag::DisconnectToPort => 1,
            Flag::TerminateSession => 2,
            Flag::ConnectToPortError => 3,
            Flag::Other(value) => value,
        };
        u32::to_be_bytes(value).to_vec()
    }

    /// Reads a flag payload; `None` if it is not 4 bytes.
    pub fn from_payload(payload: &[u8]) -> Option<Flag> {
        let bytes: [u8; 4] = payload.try_into().ok()?;
        Some(match u32::from_be_bytes(bytes) {
            1 => Flag::DisconnectToPort,
            2 => Flag::TerminateSession,
            3 => Flag::ConnectToPortError,
            other => Flag::Other(other),
        })
    }
}

/// Compares dotted versions the way the official client does: only when both have exactly
/// four numeric parts; otherwise `None` (which selects the conservative behaviour).
pub fn compare_versions(a: &str, b: &str) -> Option<std::cmp::Ordering> {
    let parse = |v: &str| -> Option<Vec<u64>> {
        let parts: Vec<u64> = v
            .split('.')
            .map(|p| p.parse().ok())
            .collect::<Option<_>>()?;
        (parts.len() == 4).then_some(parts)
    };
    Some(parse(a)?.cmp(&parse(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cmp::Ordering;

    #[test]
    fn handshake_request_as_the_agent_sends_it() {
        let json = r#"{"AgentVersion":"3.3.987.0","RequestedClientActions":[{"ActionType":"SessionType","ActionParameters":{"SessionType":"Port","Properties":{"portNumber":"5432","type":"LocalPortForwarding","localPortNumber":"1053","host":"db.example"}}}]}"#;
        let request: HandshakeRequest = serde_json::from_str(json).unwrap();
        assert_eq!(request.agent_version, "3.3.987.0");
        let properties = &request.requested_client_actions[0].action_parameters["Properties"];
        assert_eq!(properties["type"], "LocalPortForwarding");
        assert_eq!(properties["host"], "db.example");
    }

    #[test]
    fn acks_and_responses_use_the_wire_names() {
        let ack = Acknowledge {
            acknowledged_message_type: "output_stream_data".into(),
            acknowledged_message_id: "dd01e56b-ff48-483e-a508-b5f073f31b16".into(),
            acknowledged_message_sequence_number: 7,
            is_sequential_message: true,
        };
        assert_eq!(
            serde_json::to_string(&ack).unwrap(),
            r#"{"AcknowledgedMessageType":"output_stream_data","AcknowledgedMessageId":"dd01e56b-ff48-483e-a508-b5f073f31b16","AcknowledgedMessageSequenceNumber":7,"IsSequentialMessage":true}"#
        );
        let response = HandshakeResponse {
            client_version: "1.2.677.0".into(),
            processed_client_actions: vec![ProcessedClientAction {
                action_type: "SessionType".into(),
                action_status: 1,
                action_result: serde_json::Value::Null,
                error: String::new(),
            }],
            errors: None,
        };
        assert_eq!(
            serde_json::to_string(&response).unwrap(),
            r#"{"ClientVersion":"1.2.677.0","ProcessedClientActions":[{"ActionType":"SessionType","ActionStatus":1,"ActionResult":null,"Error":""}],"Errors":null}"#
        );
    }

    #[test]
    fn the_official_clients_answer_to_an_unknown_action_is_tolerated() {
        let json = r#"{"ClientVersion":"1.2.677.0","ProcessedClientActions":[{"ActionType":"X","ActionStatus":0,"ActionResult":3,"Error":"Unsupported action X"}],"Errors":["Unsupported action X"]}"#;
        let response: HandshakeResponse = serde_json::from_str(json).unwrap();
        assert_eq!(response.errors.unwrap(), ["Unsupported action X"]);
    }

    #[test]
    fn flags_and_versions() {
        assert_eq!(Flag::TerminateSession.to_payload(), [0, 0, 0, 2]);
        assert_eq!(
            Flag::from_payload(&[0, 0, 0, 3]),
            Some(Flag::ConnectToPortError)
        );
        assert_eq!(Flag::from_payload(&[0, 3]), None);
        assert_eq!(
            compare_versions("3.3.987.0", "3.0.196.0"),
            Some(Ordering::Greater)
        );
        assert_eq!(
            compare_versions("3.0.196.0", "3.0.196.0"),
            Some(Ordering::Equal)
        );
        assert_eq!(
            compare_versions("3.3.987", "3.0.196.0"),
            None,
            "three parts fall back"
        );
        assert_eq!(compare_versions("3.x.1.0", "3.0.196.0"), None);
    }
}
