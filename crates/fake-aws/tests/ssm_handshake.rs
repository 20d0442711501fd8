//! What a client of the fake SSM receives on the data channel, decoded from the bytes by a
//! raw client (aws-sdk-ssm for StartSession, a bare websocket, ssm-proto's decoder): the
//! handshake carries the StartSession parameters as the agent's does (ssm-protocol.md §5).

use std::sync::Arc;

use fake_aws::ssm::{SsmConfig, SsmService};
use fake_aws::{CredentialStore, KeyPair};
use futures_util::{SinkExt, StreamExt};
use ssm_proto::message::{Message, PayloadType};
use tokio_tungstenite::tungstenite::Message as Ws;

/// An SDK client for an SSM endpoint, as AWS's CLI would be configured for it.
fn sdk_client(
    endpoint: &str,
    region: &str,
    credentials: aws_credential_types::Credentials,
) -> aws_sdk_ssm::Client {
    let config = aws_sdk_ssm::Config::builder()
        .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
        .region(aws_sdk_ssm::config::Region::new(region.to_owned()))
        .endpoint_url(endpoint)
        .credentials_provider(credentials)
        .build();
    aws_sdk_ssm::Client::from_conf(config)
}

/// A fake SSM service in this process, and a client for it.
async fn service() -> (SsmService, aws_sdk_ssm::Client) {
    let keys = KeyPair::random_temporary();
    let ssm = SsmService::start(
        SsmConfig::default(),
        Arc::new(CredentialStore::new([keys.clone()])),
    )
    .await
    .unwrap();
    let client = sdk_client(&ssm.endpoint_url(), "eu-west-2", keys.to_credentials());
    (ssm, client)
}

type Channel =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Opens a session's data channel: the websocket, and the open frame with its token (§2).
async fn open_channel(
    output: &aws_sdk_ssm::operation::start_session::StartSessionOutput,
) -> Channel {
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
    ws
}

async fn start_session(
    parameters: &[(&str, &str)],
    document: &str,
) -> (SsmService, serde_json::Value) {
    let (ssm, client) = service().await;
    let mut request = client
        .start_session()
        .target("i-0fake0jumphost0")
        .document_name(document);
    for (name, value) in parameters {
        request = request.parameters(*name, vec![(*value).to_owned()]);
    }
    let output = request.send().await.expect("StartSession");
    let mut ws = open_channel(&output).await;
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
async fn the_data_channel_socket_sends_without_nagle() {
    let (ssm, client) = service().await;
    let output = client
        .start_session()
        .target("i-0fake0jumphost0")
        .document_name("AWS-StartPortForwardingSession")
        .parameters("portNumber", vec!["5432".to_owned()])
        .send()
        .await
        .expect("StartSession");
    let _ws = open_channel(&output).await;
    let (accepted, without_nagle) = ssm.accepted_sockets();
    assert!(accepted >= 2, "the API call and the websocket: {accepted}");
    assert_eq!(
        without_nagle, accepted,
        "every accepted socket has TCP_NODELAY"
    );
}

#[tokio::test]
async fn without_a_local_port_the_handshake_names_none() {
    let (_ssm, request) =
        start_session(&[("portNumber", "5432")], "AWS-StartPortForwardingSession").await;
    let properties = &request["RequestedClientActions"][0]["ActionParameters"]["Properties"];
    assert_eq!(properties["portNumber"], "5432");
    assert!(properties.get("localPortNumber").is_none(), "{properties}");
}

/// The fake-aws binary with `--ssm` and these flags; its KEY=value lines and the process.
fn binary(
    flags: &[&str],
) -> (
    std::process::Child,
    std::collections::HashMap<String, String>,
) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fake-aws"))
        .args(["--backend", "127.0.0.1:9", "--ssm"])
        .args(flags)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("fake-aws starts");
    let mut values = std::collections::HashMap::new();
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    while !values.contains_key("FAKE_AWS_SSM_TARGET") {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "fake-aws exited early"
        );
        if let Some((key, value)) = line.trim().split_once('=') {
            values.insert(key.to_owned(), value.to_owned());
        }
    }
    (child, values)
}

fn client_for(values: &std::collections::HashMap<String, String>) -> aws_sdk_ssm::Client {
    let credentials = aws_credential_types::Credentials::new(
        &values["AWS_ACCESS_KEY_ID"],
        &values["AWS_SECRET_ACCESS_KEY"],
        Some(values["AWS_SESSION_TOKEN"].clone()),
        None,
        "fake-aws",
    );
    sdk_client(
        &values["AWS_ENDPOINT_URL_SSM"],
        &values["AWS_REGION"],
        credentials,
    )
}

/// The recipe's StartSession against a fake-aws binary.
async fn start_on_binary(
    values: &std::collections::HashMap<String, String>,
) -> Result<
    aws_sdk_ssm::operation::start_session::StartSessionOutput,
    aws_sdk_ssm::error::SdkError<aws_sdk_ssm::operation::start_session::StartSessionError>,
> {
    client_for(values)
        .start_session()
        .target(&values["FAKE_AWS_SSM_TARGET"])
        .document_name("AWS-StartPortForwardingSessionToRemoteHost")
        .parameters("host", vec!["db.example".into()])
        .parameters("portNumber", vec!["5432".into()])
        .send()
        .await
}

#[tokio::test]
async fn the_binary_injects_faults_from_its_flags() {
    use aws_sdk_ssm::error::ProvideErrorMetadata;
    // A refused StartSession, as a person reproduces it by hand.
    let (mut refusing, values) = binary(&["--refuse-start", "AccessDeniedException"]);
    let error = start_on_binary(&values).await.expect_err("refused");
    assert_eq!(error.code(), Some("AccessDeniedException"), "{error:?}");
    refusing.kill().unwrap();
    refusing.wait().unwrap();

    // The service's `1000 Bye`, at once after the data channel opens.
    let (mut closing, values) = binary(&["--bye-after", "0s"]);
    let output = start_on_binary(&values).await.expect("StartSession");
    let mut ws = open_channel(&output).await;
    let mut close = None;
    while let Some(Ok(frame)) = ws.next().await {
        if let Ws::Close(frame) = frame {
            close = frame;
            break;
        }
    }
    let close = close.expect("a close frame with a code");
    assert_eq!(u16::from(close.code), 1000);
    assert_eq!(close.reason.as_str(), "Bye");
    closing.kill().unwrap();
    closing.wait().unwrap();

    // A probability that is none is an error, not a panic.
    let bad = std::process::Command::new(env!("CARGO_BIN_EXE_fake-aws"))
        .args(["--backend", "127.0.0.1:9", "--ssm", "--loss", "1.5"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("not a probability"));
}

#[tokio::test]
async fn channel_closed_comes_as_the_service_sends_it() {
    let (_ssm, client) = service().await;
    let output = client
        .start_session()
        .target("i-0fake0jumphost0")
        .document_name("AWS-StartPortForwardingSessionToRemoteHost")
        .parameters("host", vec!["db.example".into()])
        .parameters("portNumber", vec!["5432".into()])
        .send()
        .await
        .unwrap();
    let mut ws = open_channel(&output).await;
    // Once the agent has spoken (its handshake request), the session is ended by the API.
    let mut terminated = false;
    let closed = loop {
        let frame = ws.next().await.expect("a frame").unwrap();
        let Ws::Binary(bytes) = frame else { continue };
        let message = Message::decode(&bytes).unwrap();
        if !terminated {
            client
                .terminate_session()
                .session_id(output.session_id().unwrap())
                .send()
                .await
                .unwrap();
            terminated = true;
        }
        if message.message_type == "channel_closed" {
            break message;
        }
    };
    assert_eq!(closed.payload_type, PayloadType::Undefined, "PayloadType 0");
    let body: serde_json::Value = serde_json::from_slice(&closed.payload).unwrap();
    assert_eq!(body["Output"], "");
    assert_eq!(body["SessionId"], output.session_id().unwrap());
    assert_eq!(body["MessageType"], "channel_closed");
    assert!(body["SchemaVersion"].is_number());
    let date = body["CreatedDate"].as_str().unwrap();
    assert!(
        humantime::parse_rfc3339(date).is_ok() && date.ends_with('Z') && date.len() == 24,
        "{date}"
    );
    // The websocket is left for the client to close: it still answers a ping.
    ws.send(Ws::Ping(b"still there?".to_vec().into()))
        .await
        .unwrap();
    loop {
        match ws.next().await.expect("the websocket is open").unwrap() {
            Ws::Pong(data) => {
                assert_eq!(&data[..], b"still there?");
                break;
            }
            Ws::Close(frame) => panic!("the service closed the websocket: {frame:?}"),
            _ => continue,
        }
    }
}
