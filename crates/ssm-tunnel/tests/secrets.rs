//! The session token never reaches a log line, at any level, through a whole session:
//! StartSession, the data channel's open frame, a query through the tunnel, a resume after
//! the service's `1000 Bye`, and TerminateSession (logs captured at TRACE).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};

use common::{DB_HOST, TARGET, env, query_over};
use ssm_tunnel::{Tunnel, TunnelConfig};

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(bytes);
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "current_thread")]
async fn no_session_token_reaches_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    // The first websocket closes with `1000 Bye` once the client has sent 300 bytes: the
    // tunnel resumes (ResumeSession, a new token, a new open frame) and the queries cross
    // the second websocket.
    let env = env(|config| {
        config.faults = fake_aws::ssm::Faults {
            bye_after_bytes: Some(300),
            ..Default::default()
        };
    })
    .await;
    let tunnel = Tunnel::open_with(TunnelConfig::new(TARGET, DB_HOST, 5432), env.client())
        .await
        .expect("the tunnel opens");
    assert!(
        query_over(tunnel.connect().await.unwrap())
            .await
            .unwrap()
            .starts_with("through ")
    );
    assert!(
        query_over(tunnel.connect().await.unwrap())
            .await
            .unwrap()
            .starts_with("through ")
    );
    let tokens = env.ssm.issued_tokens();
    assert!(
        tokens.len() >= 2,
        "no resume happened: {} token(s) issued",
        tokens.len()
    );
    tunnel.close().await.unwrap();

    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(logs.contains("TRACE"), "nothing was captured at TRACE");
    assert!(!tokens.is_empty());
    for token in tokens {
        let leaks: Vec<&str> = logs.lines().filter(|l| l.contains(&token)).collect();
        assert!(
            leaks.is_empty(),
            "the session token reached the logs: {leaks:#?}"
        );
    }
}
