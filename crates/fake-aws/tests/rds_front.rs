//! The RDS path against fake-aws in front of a real Postgres: IAM tokens, verify-full TLS
//! to the endpoint name over a socket to 127.0.0.1, expiry, and a paused Aurora cluster.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use common::{USER, env, env_on_a_manual_clock, ignore_waits, login_with};
use rds_iam::clock::ManualClock;
use rds_iam::connect::is_transient;
use rds_iam::{TokenRequest, connect};

#[tokio::test]
async fn a_fresh_token_logs_in_over_verified_tls() {
    let env = env(|_| {}).await;
    let tokens = env.tokens();
    let client = connect(&env.target, None, &env.dialer, &tokens, &ignore_waits)
        .await
        .expect("IAM login");
    assert_eq!(common::current_user(&client).await, USER);
    assert_eq!((env.front.logins(), env.front.refused()), (1, 0));
}

#[tokio::test]
async fn a_connection_without_tls_gets_the_rds_answer() {
    let env = env(|_| {}).await;
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(env.front.local_addr().port())
        .user(USER)
        .dbname("postgres")
        .password("x");
    let Err(error) = config.connect(tokio_postgres::NoTls).await else {
        panic!("refused")
    };
    let db = error.as_db_error().expect("a server error");
    assert_eq!(db.code().code(), "28000");
    assert!(
        db.message().contains("no pg_hba.conf entry") && db.message().ends_with("no encryption"),
        "{}",
        db.message()
    );
}

#[tokio::test]
async fn an_expired_token_is_refused_with_the_rds_error() {
    let env = env(|_| {}).await;
    let sixteen_minutes_ago = ManualClock::new(SystemTime::now() - Duration::from_secs(16 * 60));
    let tokens = env.tokens_with(Arc::new(sixteen_minutes_ago), Duration::from_secs(60));
    let started = Instant::now();
    let error = connect(&env.target, None, &env.dialer, &tokens, &ignore_waits)
        .await
        .expect_err("refused");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{error}"
    );
    assert!(
        error.is_login_refused() && !error.is_certificate_rejected(),
        "{error}"
    );
    assert!(
        error
            .to_string()
            .contains(&format!("PAM authentication failed for user \"{USER}\"")),
        "{error}"
    );
    assert!(!is_transient(&error) && error.is_token_refused());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "an auth failure must not be waited out"
    );
    // Tried once more with a fresh token (as wrong as the first: this clock is 16 minutes
    // slow), then given up.
    assert_eq!(env.front.refused(), 2);
    assert_eq!(tokens.minted(), 2);
}

#[tokio::test]
async fn after_the_token_ttl_a_new_connection_gets_a_fresh_token() {
    let clock = ManualClock::new(SystemTime::now());
    let env = env(|config| config.clock = Arc::new(clock.clone())).await;
    let tokens = env.tokens_with(Arc::new(clock.clone()), rds_iam::cache::DEFAULT_REUSE);
    let first = connect(&env.target, None, &env.dialer, &tokens, &ignore_waits)
        .await
        .unwrap();
    let first_token = tokens.token(&env.target.endpoint).await.unwrap();
    clock.advance(Duration::from_secs(15 * 60 + 30));
    // The first session outlives its token…
    first
        .simple_query("SELECT 1")
        .await
        .expect("an open session does not need its token again");
    // …the old token no longer logs in…
    let Err(error) = login_with(
        &env,
        &env.target.tls,
        env.front.hostname(),
        first_token.expose(),
    )
    .await
    else {
        panic!("the old token is refused")
    };
    assert_eq!(error.code().map(|c| c.code()), Some("28000"));
    // …and a new connection gets a fresh one.
    let second = connect(&env.target, None, &env.dialer, &tokens, &ignore_waits)
        .await
        .expect("a fresh token logs in");
    second.simple_query("SELECT 1").await.unwrap();
    assert_eq!(tokens.minted(), 2);
}

#[tokio::test]
async fn a_cached_token_the_server_refuses_is_replaced_once() {
    let (env, clock) = env_on_a_manual_clock(Duration::from_secs(20)).await;
    // The cache keeps a token for 14m30s; this endpoint honours it for 20 s only.
    let tokens = env.tokens_with(Arc::new(clock.clone()), rds_iam::cache::DEFAULT_REUSE);
    connect(&env.target, None, &env.dialer, &tokens, &ignore_waits)
        .await
        .expect("the first login");
    clock.advance(Duration::from_secs(30));
    let client = connect(&env.target, None, &env.dialer, &tokens, &ignore_waits)
        .await
        .expect("a fresh token replaces the refused one");
    client.simple_query("SELECT 1").await.unwrap();
    assert_eq!((env.front.logins(), env.front.refused()), (2, 1));
    assert_eq!(tokens.minted(), 2, "one fresh token, not one per attempt");
}

#[tokio::test]
async fn a_certificate_for_another_name_is_refused_at_once() {
    let env = env(|_| {}).await;
    let mut target = env.target.clone();
    target.endpoint = TokenRequest::new(
        "other.cluster-c0ffee.eu-west-2.rds.amazonaws.com",
        5432,
        USER,
        None,
    )
    .unwrap();
    let tokens = env.tokens();
    let started = Instant::now();
    let error = connect(&target, None, &env.dialer, &tokens, &ignore_waits)
        .await
        .expect_err("refused");
    let text = format!("{error}");
    assert!(!is_transient(&error), "{text}");
    assert!(
        text.to_lowercase().contains("certificate") || text.contains("NotValidForName"),
        "{text}"
    );
    // Told apart from a refused login: `doctor` blames the certificate, not the grant.
    assert!(error.is_certificate_rejected(), "{text}");
    assert!(!error.is_login_refused(), "{text}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert_eq!(env.front.logins(), 0);
}

#[tokio::test]
async fn a_token_minted_by_botocore_is_accepted() {
    let env = env(|_| {}).await;
    let case = serde_json::json!({
        "host": env.front.hostname(), "port": env.front.port(), "user": USER, "region": env.front.region(),
        "access_key": env.keys.access_key_id, "secret_key": env.keys.secret_access_key,
        "session_token": env.keys.session_token,
        "time": SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs(),
    });
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../rds-iam/tests/botocore_tokens.py"
    );
    let mut child = std::process::Command::new("python3")
        .arg(script)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    use std::io::Write;
    writeln!(child.stdin.take().unwrap(), "{case}").unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "botocore failed (pip install botocore)"
    );
    let token = String::from_utf8(output.stdout).unwrap().trim().to_owned();

    let client = login_with(&env, &env.target.tls, env.front.hostname(), &token)
        .await
        .expect("botocore's token logs in");
    client.simple_query("SELECT 1").await.unwrap();
}

#[tokio::test]
async fn a_paused_cluster_is_waited_out_with_visible_progress() {
    let env = env(|config| {
        config.pause = Some(fake_aws::rds::PauseConfig {
            idle_after: Duration::from_secs(3600),
            resume_takes: Duration::from_secs(3),
        })
    })
    .await;
    env.front.pause_now();
    let tokens = env.tokens();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = {
        let seen = seen.clone();
        move |waiting: rds_iam::Waiting| seen.lock().unwrap().push(waiting.to_string())
    };
    let started = Instant::now();
    let client = connect(&env.target, None, &env.dialer, &tokens, &record)
        .await
        .expect("the cluster resumes");
    client.simple_query("SELECT 1").await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "it did wait for the resume"
    );
    let seen = seen.lock().unwrap();
    assert!(!seen.is_empty(), "no progress was shown");
    assert!(
        seen.iter()
            .all(|line| line.starts_with("waiting for the database to resume…")),
        "{seen:?}"
    );
    assert_eq!(env.front.resumes(), 1);
}

#[tokio::test]
async fn a_cluster_that_never_resumes_is_a_clear_timeout() {
    let env = env(|config| {
        config.pause = Some(fake_aws::rds::PauseConfig {
            idle_after: Duration::from_secs(3600),
            resume_takes: Duration::from_secs(600),
        })
    })
    .await;
    env.front.pause_now();
    let mut target = env.target.clone();
    target.wake_deadline = Duration::from_secs(2);
    let error = connect(&target, None, &env.dialer, &env.tokens(), &ignore_waits)
        .await
        .expect_err("gives up");
    let text = error.to_string();
    assert!(
        text.contains("did not accept connections within") && text.contains("wake deadline"),
        "{text}"
    );
}

/// A dialer whose every stream is refused, as the jumphost's dial of a host that does not
/// exist (or of a port nothing listens on) comes back through the tunnel.
#[derive(Debug)]
struct RefusedDialer;

impl rds_iam::Dialer for RefusedDialer {
    fn dial(
        &self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = std::io::Result<rds_iam::dialer::BoxStream>>
                + Send
                + '_,
        >,
    > {
        Box::pin(async {
            Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "the jumphost could not connect to the host",
            ))
        })
    }
}

#[tokio::test]
async fn a_misspelt_endpoint_is_an_error_at_once_not_a_resume_wait() {
    let env = env(|_| {}).await;
    let mut target = env.target.clone();
    // A name under a domain that never resolves (RFC 2606), as a typo in the endpoint.
    target.endpoint.host = "aurora-tset.cluster-c0ffee.eu-west-2.rds.invalid".into();
    target.wake_deadline = Duration::from_secs(60);
    let started = Instant::now();
    let error = connect(&target, None, &RefusedDialer, &env.tokens(), &ignore_waits)
        .await
        .expect_err("nothing answers");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let text = error.to_string();
    assert!(
        text.contains("does not resolve") && text.contains("PGHARNESS_RDS_HOST"),
        "{text}"
    );
}

#[tokio::test]
async fn a_certificate_of_an_unknown_ca_or_another_name_is_refused_at_once_with_the_fix() {
    let env = env(|_| {}).await;
    // The system's public CAs, not the cluster's.
    let mut unknown_ca = env.target.clone();
    unknown_ca.tls = rds_iam::tls::client_config(&rds_iam::TlsPolicy::VerifyFull {
        ca_bundle: "/etc/ssl/certs/ca-certificates.crt".into(),
    })
    .unwrap();
    // The right CA, and a name the certificate is not for.
    let mut other_name = env.target.clone();
    other_name.endpoint.host = "other.cluster-c0ffee.eu-west-2.rds.amazonaws.com".into();
    for (target, fix) in [
        (unknown_ca, "PGHARNESS_RDS_CA_BUNDLE"),
        (other_name, "endpoint name"),
    ] {
        let started = Instant::now();
        let error = connect(&target, None, &env.dialer, &env.tokens(), &ignore_waits)
            .await
            .expect_err("the certificate is refused");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not waited out as a resume"
        );
        let text = error.to_string();
        assert!(text.contains(fix), "{text}");
    }
}

#[tokio::test]
async fn a_refused_endpoint_whose_name_resolves_is_still_waited_for() {
    let env = env(|_| {}).await;
    let mut target = env.target.clone();
    target.endpoint.host = "localhost".into();
    target.wake_deadline = Duration::from_secs(2);
    let error = connect(&target, None, &RefusedDialer, &env.tokens(), &ignore_waits)
        .await
        .expect_err("nothing answers");
    assert!(
        error
            .to_string()
            .contains("did not accept connections within"),
        "{error}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn turning_verification_off_works_but_is_logged_loudly() {
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

    let env = env(|_| {}).await;
    let mut target = env.target.clone();
    target.tls =
        rds_iam::tls::client_config(&rds_iam::TlsPolicy::InsecureAcceptAnyCertificate).unwrap();
    // The certificate is for another name, and still accepted.
    let token = env.tokens().token(&target.endpoint).await.unwrap();
    let client = login_with(&env, &target.tls, "other.example", token.expose())
        .await
        .expect("accepted without checking");
    client.simple_query("SELECT 1").await.unwrap();
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("TLS CERTIFICATE CHECKING IS OFF"), "{logs}");
    assert!(logs.contains("WITHOUT checking it"), "{logs}");
}

#[tokio::test]
async fn a_stopped_front_leaves_nothing_in_the_temporary_directory() {
    let env = env(|_| {}).await;
    let bundle = env.front.ca_bundle().to_owned();
    let dir = bundle.parent().unwrap().to_owned();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "{}", dir.display());
    assert!(bundle.exists());
    drop(env);
    assert!(!bundle.exists(), "{} is left", bundle.display());
    assert!(!dir.exists(), "{} is left", dir.display());
}
