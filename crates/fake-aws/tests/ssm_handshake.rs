//! What a client of the fake SSM receives on the data channel, decoded from the bytes by a
//! raw client (aws-sdk-ssm for StartSession, a bare websocket, ssm-proto's decoder): the
//! handshake carries the StartSession parameters as the agent's does (ssm-protocol.md §5).

use std::sync::Arc;

use fake_aws::ssm::{SsmConfig, SsmService};
use fake_aws::{CredentialStore, KeyPair};
use futures_util::{SinkExt, StreamExt};
use ssm_proto::message::{Message, PayloadType};
use tokio_tungstenite::tungstenite::Message as Ws;

async fn start_session(
    parameters: &[(&str, &str)],
    document: &str,
) -> (SsmService, serde_json::Value) {
    let keys = KeyPair::random_temporary();
    let ssm = SsmService::start(
        SsmConfig::default(),
        Arc::new(CredentialStore::new([keys.clone()])),
    )
    .await
    .unwrap();
    let config = aws_sdk_ssm::Config::builder()
        .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
        .region(aws_sdk_ssm::config::Region::new("eu-west-2"))
        .endpoint_url(ssm.endpoint_url())
        .credentials_provider(keys.to_credentials())
        .build();
    let client = aws_sdk_ssm::Client::from_conf(config);
    let mut request = client
        .start_session()
        .target("i-0fake0jumphost0")
        .document_name(document);
    for (name, value) in parameters {
        request = request.parameters(*name, vec![(*value).to_owned()]);
    }
    let output = request.send().await.expect("StartSession");
    let (mut ws, _) = tokio_tungstenite::connect_async(output.stream_url().unwrap())
        .await
        .expect("the data channel opens");
    let open = serde_json::json!({
        "MessageSchemaVersion": "1.0",
        "RequestId": uuid::Uuid::new_v4().to_string(),
        "TokenValue": output.token_value().unwrap(),
        "ClientId": uuid::Uuid::new_v4().to_string(),
        "ClientVersion": "1.2.677.0",
    });
    ws.send(Ws::Text(open.to_string().into())).await.unwrap();
    while let Some(frame) = ws.next().await {
        if let Ws::Binary(bytes) = frame.unwrap() {
            let message = Message::decode(&bytes).expect("a valid message");
            if message.message_type == "output_stream_data"
                && message.payload_type == PayloadType::HandshakeRequest
            {
                let request: serde_json::Value = serde_json::from_slice(&message.payload).unwrap();
                return (ssm, request);
            }
        }
    }
    panic!("no handshake request arrived");
}

#[tokio::test]
async fn the_handshake_carries_every_start_session_parameter_as_a_string() {
    let (_ssm, request) = start_session(
        &[
            ("host", "db.example"),
            ("portNumber", "5432"),
            ("localPortNumber", "1053"),
        ],
        "AWS-StartPortForwardingSessionToRemoteHost",
    )
    .await;
    let action = &request["RequestedClientActions"][0];
    assert_eq!(action["ActionType"], "SessionType");
    assert_eq!(action["ActionParameters"]["SessionType"], "Port");
    assert_eq!(
        action["ActionParameters"]["Properties"],
        serde_json::json!({
            "host": "db.example",
            "portNumber": "5432",
            "localPortNumber": "1053",
            "type": "LocalPortForwarding",
        })
    );
    assert!(request["AgentVersion"].is_string());
}

#[tokio::test]
async fn without_a_local_port_the_handshake_names_none() {
    let (_ssm, request) =
        start_session(&[("portNumber", "5432")], "AWS-StartPortForwardingSession").await;
    let properties = &request["RequestedClientActions"][0]["ActionParameters"]["Properties"];
    assert_eq!(properties["portNumber"], "5432");
    assert!(properties.get("localPortNumber").is_none(), "{properties}");
}
