//! The tunnel against fake-aws's SSM service and agent, in front of a real Postgres.

mod common;

use common::{DB_HOST, TARGET, echo_server, env, pattern, query_over, round_trip};
use ssm_tunnel::{Mode, Tunnel, TunnelConfig};

#[tokio::test]
async fn tokio_postgres_runs_queries_through_the_tunnel() {
    let env = env(|_| {}).await;
    let tunnel = Tunnel::open_with(TunnelConfig::new(TARGET, DB_HOST, 5432), env.client())
        .await
        .expect("the tunnel opens");
    assert_eq!(tunnel.mode(), Mode::Mux { keepalive: false });
    let answer = query_over(tunnel.connect().await.unwrap())
        .await
        .expect("a query through the tunnel");
    assert!(answer.starts_with("through "), "{answer}");
    assert_eq!(env.ssm.start_session_calls(), 1);
    assert_eq!(env.ssm.open_sessions(), 1);
    tunnel.close().await.unwrap();
    assert_eq!(env.ssm.open_sessions(), 0, "close terminates the session");
}

#[tokio::test]
async fn twenty_concurrent_connections_share_one_session() {
    let env = env(|_| {}).await;
    let tunnel = std::sync::Arc::new(
        Tunnel::open_with(TunnelConfig::new(TARGET, DB_HOST, 5432), env.client())
            .await
            .unwrap(),
    );
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let tunnel = tunnel.clone();
            tokio::spawn(async move { query_over(tunnel.connect().await.unwrap()).await })
        })
        .collect();
    for task in tasks {
        task.await.unwrap().expect("every connection works");
    }
    assert_eq!(
        env.ssm.start_session_calls(),
        1,
        "one session for all twenty"
    );
    assert_eq!(env.ssm.sessions()[0].connections, 1, "over one websocket");
}

#[tokio::test]
async fn ten_megabytes_survive_loss_duplication_and_reordering() {
    let echo = echo_server().await;
    let env = env(|config| {
        config.host_map.insert("echo.internal".into(), echo);
        config.pacing = false;
        config.faults = fake_aws::ssm::Faults {
            loss: 0.05,
            duplicate: 0.05,
            reorder: 0.05,
            latency: std::time::Duration::from_millis(2),
            ..Default::default()
        };
    })
    .await;
    let tunnel = Tunnel::open_with(TunnelConfig::new(TARGET, "echo.internal", 7), env.client())
        .await
        .expect("opens despite faults");
    let data = pattern(10 * 1024 * 1024, 42);
    let back = tokio::time::timeout(
        std::time::Duration::from_secs(240),
        round_trip(tunnel.connect().await.unwrap(), data.clone()),
    )
    .await
    .expect("in time");
    assert!(back == data, "the bytes came back corrupted");
    tunnel.close().await.unwrap();
}

#[tokio::test]
async fn a_bye_close_mid_transfer_is_resumed_without_corruption() {
    let echo = echo_server().await;
    let env = env(|config| {
        config.host_map.insert("echo.internal".into(), echo);
        config.pacing = false;
        config.faults = fake_aws::ssm::Faults {
            bye_after_bytes: Some(1024 * 1024),
            ..Default::default()
        };
    })
    .await;
    let tunnel = Tunnel::open_with(TunnelConfig::new(TARGET, "echo.internal", 7), env.client())
        .await
        .unwrap();
    let data = pattern(4 * 1024 * 1024, 7);
    let back = tokio::time::timeout(
        std::time::Duration::from_secs(120),
        round_trip(tunnel.connect().await.unwrap(), data.clone()),
    )
    .await
    .expect("in time");
    assert!(
        back == data,
        "the bytes came back corrupted across the resume"
    );
    assert!(tunnel.reconnects() >= 1, "the websocket was replaced");
    assert_eq!(
        env.ssm.sessions()[0].connections,
        2,
        "ResumeSession and a second websocket"
    );
    assert_eq!(env.ssm.start_session_calls(), 1);
}

#[tokio::test]
async fn a_refused_dial_fails_only_its_own_stream() {
    let env = env(|_| {}).await;
    // Port 9 on 127.0.0.1: nothing listens there.
    let tunnel = Tunnel::open_with(TunnelConfig::new(TARGET, "127.0.0.1", 9), env.client())
        .await
        .unwrap();
    let mut refused = tunnel.connect().await.unwrap();
    let mut buffer = [0u8; 16];
    use tokio::io::AsyncReadExt;
    let error = refused
        .read(&mut buffer)
        .await
        .expect_err("the stream reports the refusal");
    assert_eq!(
        error.kind(),
        std::io::ErrorKind::ConnectionRefused,
        "{error}"
    );
    assert!(error.to_string().contains("127.0.0.1:9"), "{error}");
    assert!(tunnel.ended().is_none(), "the session survives");
}

#[tokio::test]
async fn old_agents_get_basic_mode_one_connection_at_a_time() {
    let env = env(|config| config.agent_version = "3.0.196.0".into()).await;
    let tunnel = Tunnel::open_with(TunnelConfig::new(TARGET, DB_HOST, 5432), env.client())
        .await
        .unwrap();
    assert_eq!(tunnel.mode(), Mode::Basic);
    for _ in 0..3 {
        let answer = query_over(tunnel.connect().await.unwrap())
            .await
            .expect("a query in basic mode");
        assert!(answer.starts_with("through "));
    }
}

/// A server whose every connection ends with a message of its own: it answers `hello-k`
/// with `hi-k`, and when the client's side closes it says `bye-k` (as a TLS server answers
/// close_notify). Returns its address and how many goodbyes it has sent.
async fn goodbye_server() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let goodbyes = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = goodbyes.clone();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            let counter = counter.clone();
            tokio::spawn(async move {
                let mut socket = BufReader::new(socket);
                let mut line = String::new();
                socket.read_line(&mut line).await?;
                let k = line.trim().trim_start_matches("hello-").to_owned();
                socket
                    .get_mut()
                    .write_all(format!("hi-{k}\n").as_bytes())
                    .await?;
                let mut rest = Vec::new();
                socket.read_to_end(&mut rest).await?;
                socket
                    .get_mut()
                    .write_all(format!("bye-{k}\n").as_bytes())
                    .await?;
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::io::Result::Ok(())
            });
        }
    });
    (address, goodbyes)
}

#[tokio::test]
async fn basic_mode_never_hands_a_closed_connections_late_bytes_to_the_next() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (server, goodbyes) = goodbye_server().await;
    // The late-bytes fault forwards each connection's goodbye after the client's
    // DisconnectToPort, when the client has already moved on to its next connection.
    let env = env(|config| {
        config.agent_version = "3.0.196.0".into();
        config.faults.late_bytes = true;
        config.host_map.insert(DB_HOST.into(), server);
    })
    .await;
    let tunnel = Tunnel::open_with(TunnelConfig::new(TARGET, DB_HOST, 5432), env.client())
        .await
        .unwrap();
    assert_eq!(tunnel.mode(), Mode::Basic);
    const CONNECTIONS: usize = 25;
    for k in 0..CONNECTIONS {
        let mut stream = tunnel.connect().await.unwrap();
        stream
            .write_all(format!("hello-{k}\n").as_bytes())
            .await
            .unwrap();
        let expected = format!("hi-{k}\n");
        let mut reply = vec![0; expected.len()];
        stream.read_exact(&mut reply).await.unwrap();
        assert_eq!(
            String::from_utf8_lossy(&reply),
            expected,
            "connection {k} was handed another connection's bytes"
        );
    }
    assert!(
        goodbyes.load(std::sync::atomic::Ordering::SeqCst) >= CONNECTIONS - 1,
        "the server said goodbye to every closed connection, so late bytes did cross the \
         tunnel: {goodbyes:?}"
    );
    tunnel.close().await.unwrap();
}

#[tokio::test]
async fn a_disconnected_target_is_a_clear_error_and_no_session_is_left() {
    let env = env(|_| {}).await;
    let error = Tunnel::open_with(
        TunnelConfig::new("i-0notconnected0000", DB_HOST, 5432),
        env.client(),
    )
    .await
    .expect_err("refused");
    assert_eq!(error.api_code(), Some("TargetNotConnected"), "{error}");
    assert!(
        error
            .to_string()
            .contains("is the SSM agent on the instance running"),
        "{error}"
    );
    env.ssm
        .reconfigure(|config| config.refuse_start = Some("AccessDeniedException".into()));
    let error = Tunnel::open_with(TunnelConfig::new(TARGET, DB_HOST, 5432), env.client())
        .await
        .expect_err("refused");
    assert_eq!(error.api_code(), Some("AccessDeniedException"), "{error}");
    assert_eq!(env.ssm.open_sessions(), 0);
}

#[tokio::test]
async fn bad_credentials_are_refused_by_the_signature_check() {
    let env = env(|_| {}).await;
    let mut keys = env.keys.clone();
    keys.secret_access_key = "not-the-secret".into();
    let config = aws_sdk_ssm::Config::builder()
        .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
        .region(aws_sdk_ssm::config::Region::new("eu-west-2"))
        .endpoint_url(env.ssm.endpoint_url())
        .credentials_provider(keys.to_credentials())
        .build();
    let error = Tunnel::open_with(
        TunnelConfig::new(TARGET, DB_HOST, 5432),
        aws_sdk_ssm::Client::from_conf(config),
    )
    .await
    .expect_err("refused");
    assert_eq!(
        error.api_code(),
        Some("InvalidSignatureException"),
        "{error}"
    );
}

#[tokio::test]
async fn an_idle_session_ends_with_channel_closed_and_says_so_as_awss_plugin_does() {
    let env = env(|config| config.idle_timeout = std::time::Duration::from_secs(2)).await;
    let tunnel = Tunnel::open_with(TunnelConfig::new(TARGET, DB_HOST, 5432), env.client())
        .await
        .unwrap();
    let reason = tokio::time::timeout(std::time::Duration::from_secs(15), tunnel.closed())
        .await
        .expect("the agent closes it");
    // The service's channel_closed has an empty Output: the plugin's words, with the id.
    assert!(
        reason.contains("Exiting session with sessionId: ") && reason.contains(tunnel.session_id()),
        "{reason}"
    );
    let error = tunnel.connect().await.expect_err("no more connections");
    assert!(
        matches!(error, ssm_tunnel::Error::SessionClosed(_)),
        "{error}"
    );
    assert_eq!(env.ssm.open_sessions(), 0);
}

#[tokio::test]
async fn a_slow_handshake_is_waited_for_within_the_timeout_and_not_beyond() {
    let env =
        env(|config| config.faults.slow_handshake = std::time::Duration::from_millis(800)).await;
    let tunnel = Tunnel::open_with(TunnelConfig::new(TARGET, DB_HOST, 5432), env.client())
        .await
        .expect("800 ms is fine");
    tunnel.close().await.unwrap();
    let mut config = TunnelConfig::new(TARGET, DB_HOST, 5432);
    config.handshake_timeout = std::time::Duration::from_millis(200);
    let error = Tunnel::open_with(config, env.client())
        .await
        .expect_err("too slow");
    assert!(
        error.is_timeout()
            && error
                .to_string()
                .contains("the SSM agent (its handshake) did not answer"),
        "{error}"
    );
    assert_eq!(
        env.ssm.open_sessions(),
        0,
        "the half-open session was terminated"
    );
}

#[tokio::test]
async fn describe_instance_information_lists_the_online_target() {
    let env = env(|_| {}).await;
    let output = env
        .client()
        .describe_instance_information()
        .send()
        .await
        .expect("DescribeInstanceInformation");
    let list = output.instance_information_list();
    assert_eq!(list.len(), 1);
    assert_eq!(list[0].instance_id(), Some(TARGET));
    assert_eq!(list[0].ping_status().map(|s| s.as_str()), Some("Online"));
}
