//! The local auth proxy in front of fake RDS: sessions that outlive the token and new ones
//! that get fresh tokens (time moved by a manual clock shared by the token cache and the
//! fake), a wrong password refused, cancel requests forwarded.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use common::{USER, env};
use rds_iam::clock::{Clock, ManualClock, SystemClock};
use rds_iam::{ProxyPassword, serve};
use tokio::net::TcpListener;

async fn proxy_for(env: &common::Env, reuse_for: Duration) -> rds_iam::Proxy {
    proxy_with_clock(env, reuse_for, Arc::new(SystemClock)).await
}

async fn proxy_with_clock(
    env: &common::Env,
    reuse_for: Duration,
    clock: Arc<dyn Clock>,
) -> rds_iam::Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let tokens = Arc::new(env.tokens_with(clock, reuse_for));
    serve(
        listener,
        env.target.clone(),
        ProxyPassword::random(),
        Arc::new(env.dialer.clone()),
        tokens,
    )
    .unwrap()
}

fn psql(proxy: &rds_iam::Proxy, password: &str, sql: &[&str]) -> std::process::Output {
    let mut command = Command::new("psql");
    command
        .arg(format!(
            "host=127.0.0.1 port={} user={USER} dbname=postgres",
            proxy.local_addr().port()
        ))
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "20");
    for statement in sql {
        command.args(["-c", statement]);
    }
    command.output().expect("psql is installed")
}

#[tokio::test]
async fn a_session_outlives_its_token_and_new_sessions_get_fresh_ones() {
    let clock = ManualClock::new(SystemTime::now());
    let env = env(|config| {
        config.token_ttl = Duration::from_secs(2);
        config.clock = Arc::new(clock.clone());
    })
    .await;
    let proxy = proxy_with_clock(&env, Duration::from_secs(1), Arc::new(clock.clone())).await;
    let config: tokio_postgres::Config = proxy.url().parse().unwrap();
    let (session, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    session.simple_query("SELECT 1").await.unwrap();
    // Past the token's lifetime at the fake, and past the cache's reuse.
    clock.advance(Duration::from_millis(2500));
    let user: String = session
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("an open session does not need its token again")
        .get(0);
    assert_eq!(user, USER);
    assert_eq!(env.front.logins(), 1, "one login for the whole session");
    // A new session (psql, as a user runs it) logs in with a fresh token.
    let password = proxy.password().expose().to_owned();
    let proxy = Arc::new(proxy);
    let output = tokio::task::spawn_blocking({
        let proxy = proxy.clone();
        move || psql(&proxy, &password, &["SELECT 1"])
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!((env.front.logins(), env.front.refused()), (2, 0));
}

#[tokio::test]
async fn the_proxy_replaces_a_cached_token_the_server_refuses() {
    let clock = ManualClock::new(SystemTime::now());
    let env = env(|config| {
        config.token_ttl = Duration::from_secs(20);
        config.clock = Arc::new(clock.clone());
    })
    .await;
    let proxy =
        proxy_with_clock(&env, rds_iam::cache::DEFAULT_REUSE, Arc::new(clock.clone())).await;
    let config: tokio_postgres::Config = proxy.url().parse().unwrap();
    let (first, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    first.simple_query("SELECT 1").await.unwrap();
    clock.advance(Duration::from_secs(30));
    let (second, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("a fresh token replaces the refused one");
    tokio::spawn(connection);
    second.simple_query("SELECT 1").await.unwrap();
    assert_eq!((env.front.logins(), env.front.refused()), (2, 1));
}

#[tokio::test]
async fn a_wrong_password_is_refused() {
    let env = env(|_| {}).await;
    let proxy = proxy_for(&env, Duration::from_secs(60)).await;
    let output =
        tokio::task::spawn_blocking(move || psql(&proxy, "not-the-password", &["SELECT 1"]))
            .await
            .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!(
            "password authentication failed for user \"{USER}\""
        )),
        "{stderr}"
    );
    assert_eq!(env.front.logins(), 0, "nothing reached RDS");
}

#[tokio::test]
async fn another_user_is_told_which_user_to_use() {
    let env = env(|_| {}).await;
    let proxy = proxy_for(&env, Duration::from_secs(60)).await;
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(proxy.local_addr().port())
        .user("someone_else")
        .dbname("postgres")
        .password(proxy.password().expose());
    let Err(error) = config.connect(tokio_postgres::NoTls).await else {
        panic!("refused")
    };
    let message = error
        .as_db_error()
        .map(|db| db.message().to_owned())
        .unwrap_or_default();
    assert!(
        message.contains(&format!("this proxy logs in as \"{USER}\"")),
        "{error}"
    );
}

#[tokio::test]
async fn cancel_requests_reach_the_database() {
    let env = env(|_| {}).await;
    let proxy = proxy_for(&env, Duration::from_secs(60)).await;
    let config: tokio_postgres::Config = proxy.url().parse().unwrap();
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("through the proxy");
    tokio::spawn(connection);
    let cancel = client.cancel_token();
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
    // The sync point: the server runs the query (seen from a second session, same user).
    let (observer, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity
                  WHERE state = 'active' AND query = 'SELECT pg_sleep(30)'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if running == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cancel
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("the cancel request is sent");
    let result = tokio::time::timeout(Duration::from_secs(10), query)
        .await
        .expect("cancelled in time")
        .unwrap();
    let error = result.expect_err("the query was cancelled");
    assert_eq!(error.code().map(|c| c.code()), Some("57014"), "{error}");
}
