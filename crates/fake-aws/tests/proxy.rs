//! The local auth proxy in front of fake RDS: sessions that outlive the token and new ones
//! that get fresh tokens (time moved by a manual clock shared by the token cache and the
//! fake), a wrong password refused, cancel requests forwarded.

mod common;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{USER, client_of, env, env_on_a_manual_clock, until};
use rds_iam::ProxyPassword;
use rds_iam::clock::{Clock, SystemClock};

async fn proxy_for(env: &common::Env, reuse_for: Duration) -> rds_iam::Proxy {
    proxy_with_clock(env, reuse_for, Arc::new(SystemClock)).await
}

async fn proxy_with_clock(
    env: &common::Env,
    reuse_for: Duration,
    clock: Arc<dyn Clock>,
) -> rds_iam::Proxy {
    common::proxy(
        env,
        ProxyPassword::random(),
        env.tokens_with(clock, reuse_for),
        common::budget(16),
    )
    .await
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
async fn a_session_outlives_its_token_and_a_new_client_gets_in_after_it() {
    let (env, clock) = env_on_a_manual_clock(Duration::from_secs(2)).await;
    let proxy = proxy_with_clock(&env, Duration::from_secs(1), Arc::new(clock.clone())).await;
    let session = client_of(&proxy).await;
    session.simple_query("SELECT 1").await.unwrap();
    // Past the token's lifetime at the fake, and past the cache's reuse.
    clock.advance(Duration::from_millis(2500));
    let user: String = session
        .query_one("SELECT current_user::text", &[])
        .await
        .expect("an open session does not need its token again")
        .get(0);
    assert_eq!(user, USER);
    // A new client (psql, as a user runs it) gets in: on the spare session opened ahead
    // of demand, or on a new one with a fresh token.
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
}

#[tokio::test]
async fn the_proxy_replaces_a_cached_token_the_server_refuses() {
    let (env, clock) = env_on_a_manual_clock(Duration::from_secs(20)).await;
    let tokens_clock: Arc<dyn Clock> = Arc::new(clock.clone());
    let proxy = proxy_with_clock(&env, rds_iam::cache::DEFAULT_REUSE, tokens_clock).await;
    let first = client_of(&proxy).await;
    first.simple_query("SELECT 1").await.unwrap();
    until("the spare session", || proxy.upstream_logins() == 2).await;
    // The cache keeps its token for 14m30s; the endpoint honours it for 20 s only.
    clock.advance(Duration::from_secs(30));
    // Two more clients at once: one takes the spare, the other needs a new session, whose
    // login with the cached token is refused and retried with a fresh one.
    let (second, third) = tokio::join!(client_of(&proxy), client_of(&proxy));
    second.simple_query("SELECT 1").await.unwrap();
    third.simple_query("SELECT 1").await.unwrap();
    assert!(env.front.refused() >= 1, "the stale token was tried");
    assert!(proxy.upstream_logins() >= 3);
}

#[tokio::test]
async fn each_client_gets_a_clean_session_and_no_upstream_login() {
    let env = env(|_| {}).await;
    let proxy = proxy_for(&env, Duration::from_secs(60)).await;
    // A client that leaves state behind: a setting, an advisory lock, an open transaction.
    let leaky = client_of(&proxy).await;
    let leaky_pid: i32 = leaky
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    leaky
        .batch_execute(
            "SET application_name = 'leaky'; SELECT pg_advisory_lock(4242);
             BEGIN; CREATE TEMP TABLE left_behind (x int);",
        )
        .await
        .unwrap();
    drop(leaky);
    until("the session back, reset, beside the spare", || {
        proxy.idle_sessions() == 2
    })
    .await;
    let from_pool = proxy.clients_from_pool();
    // Two clients take both idle sessions: one of them is the leaky client's.
    let (a, b) = tokio::join!(client_of(&proxy), client_of(&proxy));
    let mut pids = Vec::new();
    for client in [&a, &b] {
        let row = client
            .query_one(
                "SELECT pg_backend_pid(), current_setting('application_name'),
                        to_regclass('pg_temp.left_behind') IS NULL,
                        (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND objid = 4242)",
                &[],
            )
            .await
            .unwrap();
        pids.push(row.get::<_, i32>(0));
        assert_eq!(row.get::<_, String>(1), "", "application_name leaked");
        assert!(row.get::<_, bool>(2), "a temporary table leaked");
        assert_eq!(row.get::<_, i64>(3), 0, "the advisory lock leaked");
    }
    assert!(pids.contains(&leaky_pid), "{pids:?} reuse {leaky_pid}");
    assert_eq!(
        proxy.clients_from_pool(),
        from_pool + 2,
        "no upstream login on either client's path"
    );
}

#[tokio::test]
async fn startup_options_apply_to_a_pooled_session_and_end_with_the_client() {
    let env = env(|_| {}).await;
    let proxy = proxy_for(&env, Duration::from_secs(60)).await;
    let mut config: tokio_postgres::Config = proxy.url().parse().unwrap();
    config
        .options("-c search_path=pgh_elsewhere,public")
        .application_name("pgh-test");
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    let row = client
        .query_one(
            "SELECT current_setting('search_path'), current_setting('application_name'), pg_backend_pid()",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "pgh_elsewhere,public");
    assert_eq!(row.get::<_, String>(1), "pgh-test");
    let pid: i32 = row.get(2);
    drop(client);
    until("the session back", || proxy.idle_sessions() == 2).await;
    let (a, b) = tokio::join!(client_of(&proxy), client_of(&proxy));
    for client in [a, b] {
        let row = client
            .query_one(
                "SELECT current_setting('search_path'), pg_backend_pid()",
                &[],
            )
            .await
            .unwrap();
        if row.get::<_, i32>(1) == pid {
            assert_eq!(row.get::<_, String>(0), "\"$user\", public");
        }
    }
}

#[tokio::test]
async fn a_client_that_leaves_mid_query_does_not_hand_its_session_on() {
    let env = env(|_| {}).await;
    let proxy = proxy_for(&env, Duration::from_secs(60)).await;
    let config: tokio_postgres::Config = proxy.url().parse().unwrap();
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    let connection = tokio::spawn(connection);
    let query = tokio::spawn(async move { client.simple_query("SELECT pg_sleep(3)").await });
    let observer = client_of(&proxy).await;
    until_running(&observer, "SELECT pg_sleep(3)").await;
    // The client's connection goes away with its query in flight.
    connection.abort();
    query.abort();
    until("the session discarded", || proxy.discarded_sessions() == 1).await;
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
    let observer = client_of(&proxy).await;
    until_running(&observer, "SELECT pg_sleep(30)").await;
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

/// Waits until the server runs `query` (pg_stat_activity, seen from `observer`).
async fn until_running(observer: &tokio_postgres::Client, query: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let running: i64 = observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
                &[&query],
            )
            .await
            .unwrap()
            .get(0);
        if running == 1 {
            return;
        }
        assert!(Instant::now() < deadline, "the query never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A transport that is often not ready to write, as a tunnel whose send window is full:
/// every other write returns Pending (its task woken at once), and a write takes at most
/// 1 KiB. TLS records the proxy made then wait in rustls's buffer until something flushes
/// them.
#[derive(Debug)]
struct StallingDialer(String);

struct Stalling {
    inner: tokio::net::TcpStream,
    writes: u64,
}

impl rds_iam::Dialer for StallingDialer {
    fn dial(
        &self,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = std::io::Result<rds_iam::dialer::BoxStream>>
                + Send
                + '_,
        >,
    > {
        Box::pin(async move {
            let inner = tokio::net::TcpStream::connect(&self.0).await?;
            Ok(Box::new(Stalling { inner, writes: 0 }) as rds_iam::dialer::BoxStream)
        })
    }
}

impl tokio::io::AsyncRead for Stalling {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Stalling {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.writes += 1;
        if self.writes.is_multiple_of(2) {
            cx.waker().wake_by_ref();
            return std::task::Poll::Pending;
        }
        let n = buf.len().min(1024);
        std::pin::Pin::new(&mut self.inner).poll_write(cx, &buf[..n])
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[tokio::test]
async fn a_bulk_copy_up_and_down_over_a_stalling_transport_arrives_byte_exact() {
    use futures_util::{SinkExt, TryStreamExt};
    let env = env(|_| {}).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let proxy = rds_iam::serve(
        listener,
        env.target.clone(),
        ProxyPassword::random(),
        Arc::new(StallingDialer(env.front.local_addr().to_string())),
        Arc::new(env.tokens_with(Arc::new(SystemClock), Duration::from_secs(60))),
        common::budget(4),
    )
    .unwrap();
    let client = client_of(&proxy).await;
    client
        .batch_execute("CREATE TEMP TABLE bulk (line text)")
        .await
        .unwrap();
    // 4 MB in 60,000 lines, sent as 64 KiB CopyData messages.
    let data: Vec<u8> = (0..60_000)
        .flat_map(|i| format!("{i:08} {}\n", "x".repeat(60)).into_bytes())
        .collect();
    let round_trip = async {
        let sink = client.copy_in("COPY bulk FROM STDIN").await?;
        futures_util::pin_mut!(sink);
        for chunk in data.chunks(64 * 1024) {
            sink.send(bytes::Bytes::copy_from_slice(chunk)).await?;
        }
        let rows = sink.finish().await?;
        let stream = client.copy_out("COPY bulk TO STDOUT").await?;
        let chunks: Vec<bytes::Bytes> = stream.try_collect().await?;
        Ok::<_, tokio_postgres::Error>((rows, chunks.concat()))
    };
    let (rows, back) = tokio::time::timeout(Duration::from_secs(120), round_trip)
        .await
        .expect("the COPY hung: bytes the proxy forwarded did not reach the wire")
        .unwrap();
    assert_eq!(rows, 60_000);
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the data came back altered");
}
