//! No token, password, secret key or session token ever appears in a log line, through
//! logins, refusals, the proxy and its failures (all logs captured at TRACE).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use common::{env, ignore_waits};
use rds_iam::clock::ManualClock;
use rds_iam::{ProxyPassword, connect};

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
async fn no_secret_reaches_the_logs() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let env = env(|_| {}).await;
    let tokens = env.tokens();
    let client = connect(&env.target, None, &env.dialer, &tokens, &ignore_waits)
        .await
        .unwrap();
    client.simple_query("SELECT 1").await.unwrap();
    let token = tokens.token(&env.target.endpoint).await.unwrap();

    // A refused (expired) login logs its reason.
    let old = ManualClock::new(SystemTime::now() - Duration::from_secs(3600));
    let stale = env.tokens_with(Arc::new(old), Duration::from_secs(60));
    assert!(
        connect(&env.target, None, &env.dialer, &stale, &ignore_waits)
            .await
            .is_err()
    );

    // The proxy, with a right and a wrong password.
    let password = ProxyPassword::random();
    let proxy = common::proxy(&env, password.clone(), env.tokens(), common::budget(16)).await;
    let config: tokio_postgres::Config = proxy.url().parse().unwrap();
    let (proxied, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    proxied.simple_query("SELECT 1").await.unwrap();
    let mut wrong = config.clone();
    wrong.password("wrong-password-123");
    assert!(wrong.connect(tokio_postgres::NoTls).await.is_err());
    tracing::info!(?token, ?password, keys = ?env.keys, "debug output of secret-holding types");
    drop(proxied);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("refused an IAM login"),
        "the capture works: {logs}"
    );
    assert!(logs.contains("minted an IAM auth token"), "{logs}");
    let signature = token
        .expose()
        .rsplit("X-Amz-Signature=")
        .next()
        .unwrap()
        .to_owned();
    let secrets = [
        ("the token's signature", signature.as_str()),
        ("the token", token.expose()),
        ("the proxy password", password.expose()),
        ("the secret key", env.keys.secret_access_key.as_str()),
        (
            "the session token",
            env.keys.session_token.as_deref().unwrap(),
        ),
        (
            "the encoded session token",
            &rds_iam::token::encode_query_value(env.keys.session_token.as_deref().unwrap()),
        ),
    ];
    for (what, secret) in secrets {
        let line = logs
            .lines()
            .find(|l| l.contains(secret))
            .unwrap_or_default();
        assert!(!logs.contains(secret), "{what} appears in the logs: {line}");
    }
    assert!(
        !logs.contains("X-Amz-Signature="),
        "a signed URL appears in the logs"
    );
}
