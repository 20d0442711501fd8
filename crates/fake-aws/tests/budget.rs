//! One session budget across proxies: several proxies in front of one server (CI shards on
//! several machines) together stay within it, clients beyond it wait in their proxy instead
//! of meeting `53300`, and idle sessions give their slots up to a proxy that waits.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{USER, client_of, env, env_as, until};
use rds_iam::{Budget, Proxy, ProxyPassword};

async fn proxy(env: &common::Env, budget: Budget) -> Proxy {
    common::proxy(env, ProxyPassword::random(), env.tokens(), budget).await
}

/// Slot locks of `budget` held on the server now.
async fn slots_held(observer: &tokio_postgres::Client, budget: &Budget) -> i64 {
    observer
        .query_one(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted
                AND classid = $1::int::oid AND objid > 0 AND objsubid = 2",
            &[&budget.lock_space],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn two_proxies_sharing_one_server_stay_within_the_budget() {
    // Six sessions between two proxies. Each proxy alone could hold six, so without a
    // budget kept on the server they would open twelve; the server itself refuses more than
    // the budget plus each proxy's one login that holds no slot yet.
    let budget = Budget {
        logins_without_slot: 1,
        ..common::budget(6)
    };
    let limit = budget.sessions as i32 + 2;
    let env = env_as("iam_budget", Some(limit), |_| {}).await;
    let (a, b) = (
        Arc::new(proxy(&env, budget).await),
        Arc::new(proxy(&env, budget).await),
    );
    let observer = common::admin().await;
    let mut clients = Vec::new();
    for i in 0..24 {
        let proxy = if i % 2 == 0 { a.clone() } else { b.clone() };
        clients.push(tokio::spawn(async move {
            let client = client_of(&proxy).await;
            // Each holds its session a while, so that the others queue behind it.
            client.simple_query("SELECT pg_sleep(0.1)").await.unwrap();
        }));
    }
    let mut most = 0;
    while clients.iter().any(|c| !c.is_finished()) {
        most = most.max(slots_held(&observer, &budget).await);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for client in clients {
        client
            .await
            .expect("every client got a session, none met 53300");
    }
    assert!(most <= 6, "{most} slots held at once");
    assert!(
        a.clients_waited() + b.clients_waited() > 0,
        "clients beyond the budget waited"
    );
    assert!(a.open_sessions() + b.open_sessions() <= 6);
    // Every session still open holds exactly one slot (re-taken after each reset), once
    // the resets after the last clients are done.
    until("every session back at its proxy", || {
        a.idle_sessions() == a.open_sessions() && b.idle_sessions() == b.open_sessions()
    })
    .await;
    assert_eq!(
        slots_held(&observer, &budget).await,
        (a.open_sessions() + b.open_sessions()) as i64
    );
}

#[tokio::test]
async fn idle_sessions_give_their_slots_to_a_proxy_that_waits() {
    let env = env(|_| {}).await;
    let budget = common::budget(2);
    let first = proxy(&env, budget).await;
    // Two clients that leave: both sessions stay idle at the first proxy, holding the
    // whole budget.
    let (x, y) = tokio::join!(client_of(&first), client_of(&first));
    x.simple_query("SELECT 1").await.unwrap();
    y.simple_query("SELECT 1").await.unwrap();
    drop((x, y));
    until("both sessions idle", || first.idle_sessions() == 2).await;
    // A client of a second proxy gets in: its proxy raises the waiting flag, and the first
    // closes its idle sessions.
    let second = proxy(&env, budget).await;
    let client = tokio::time::timeout(Duration::from_secs(20), client_of(&second))
        .await
        .expect("the second proxy got a slot");
    assert_eq!(common::current_user(&client).await, USER);
    assert!(first.open_sessions() < 2, "the first proxy gave a slot up");
}

#[tokio::test]
async fn a_client_that_waits_longer_than_the_budget_allows_is_told_why() {
    let env = env(|_| {}).await;
    let budget = Budget {
        wait: Duration::from_millis(300),
        ..common::budget(1)
    };
    let proxy = proxy(&env, budget).await;
    let holder = client_of(&proxy).await;
    holder.simple_query("SELECT 1").await.unwrap();
    let config: tokio_postgres::Config = proxy.url().parse().unwrap();
    let Err(error) = config.connect(tokio_postgres::NoTls).await else {
        panic!("the only session is held")
    };
    let db = error.as_db_error().expect("a refusal from the proxy");
    assert_eq!(db.code().code(), "53300");
    assert!(db.message().contains("max_sessions"), "{}", db.message());
    assert_eq!(proxy.clients_waited(), 1);
    // Once the holder leaves, its session serves the next client.
    drop(holder);
    until("the session back", || proxy.idle_sessions() == 1).await;
    client_of(&proxy)
        .await
        .simple_query("SELECT 1")
        .await
        .unwrap();
}

#[tokio::test]
async fn a_cancel_key_kept_after_its_client_left_cancels_nothing() {
    let env = env(|_| {}).await;
    let proxy = proxy(&env, common::budget(1)).await;
    let gone = client_of(&proxy).await;
    let stale = gone.cancel_token();
    let pid: i32 = gone
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    drop(gone);
    until("the session back", || proxy.idle_sessions() == 1).await;
    // The observer first: under load its setup may take longer than the query.
    let observer = common::admin().await;
    // The next client is lent the same backend.
    let next = Arc::new(client_of(&proxy).await);
    let query = tokio::spawn({
        let next = next.clone();
        async move {
            let row = next
                .query_one("SELECT pg_backend_pid(), pg_sleep(2)::text", &[])
                .await?;
            Ok::<i32, tokio_postgres::Error>(row.get(0))
        }
    });
    // A sync point: the query runs (seen from the server's side, on another connection).
    common::until_running(&observer, pid).await;
    stale
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("the cancel request is sent");
    let ran_on = query
        .await
        .unwrap()
        .expect("the next client's query was not cancelled");
    assert_eq!(ran_on, pid, "the next client had the same backend");
}

/// A "test" through the proxy as pgharness's TestDb opens it: a first client, then two more
/// while it still holds the first (its pool), each naming the test with the lease option
/// when `leases` is on.
async fn hold_and_wait(proxy: Arc<Proxy>, test: usize, leases: bool) -> Result<(), String> {
    let mut config: tokio_postgres::Config = proxy.url().parse().unwrap();
    if leases {
        config.options(format!("-c{}=t{test}:3", rds_iam::leases::LEASE_OPTION));
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .map_err(|e| format!("{e:#}"))?;
        tokio::spawn(connection);
        client
            .simple_query("SELECT pg_sleep(0.02)")
            .await
            .map_err(|e| format!("{e:#}"))?;
        held.push(client);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_two_tests_on_a_budget_of_eight_never_hold_and_wait() {
    // Before: every session was held by a test waiting for its next one, and all of them
    // waited out the proxy's whole wait.
    let budget = Budget {
        wait: Duration::from_secs(20),
        ..common::budget(8)
    };
    let env = env(|_| {}).await;
    let proxy = Arc::new(proxy(&env, budget).await);
    let started = std::time::Instant::now();
    let tests: Vec<_> = (0..32)
        .map(|k| tokio::spawn(hold_and_wait(proxy.clone(), k, true)))
        .collect();
    for test in tests {
        test.await
            .unwrap()
            .expect("every test gets its three sessions together");
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "no test waited out the budget's wait ({:?})",
        started.elapsed()
    );
    assert!(proxy.open_sessions() <= 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tests_that_wait_on_each_other_beyond_their_reservations_are_told_at_once() {
    let budget = Budget {
        wait: Duration::from_secs(20),
        ..common::budget(2)
    };
    let env = env(|_| {}).await;
    let proxy = Arc::new(proxy(&env, budget).await);
    // Two tests hold one session each, the whole budget, and each opens one more.
    let mut held = [
        Some(hold_one(&proxy, "a:1").await),
        Some(hold_one(&proxy, "b:1").await),
    ];
    let started = std::time::Instant::now();
    let mut more: Vec<_> = ["a:1", "b:1"]
        .into_iter()
        .map(|lease| {
            let proxy = proxy.clone();
            Some(tokio::spawn(async move {
                let mut config: tokio_postgres::Config = proxy.url().parse().unwrap();
                config.options(format!("-c{}={lease}", rds_iam::leases::LEASE_OPTION));
                config
                    .connect(tokio_postgres::NoTls)
                    .await
                    .map(|(client, _)| client)
            }))
        })
        .collect();
    // Each waits for the other's session: one is told at once, not after 20 s.
    let refused = loop {
        if let Some(k) = (0..2).find(|&k| more[k].as_ref().is_some_and(|t| t.is_finished())) {
            break k;
        }
        assert!(started.elapsed() < Duration::from_secs(5), "nobody told");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let error = more[refused]
        .take()
        .unwrap()
        .await
        .unwrap()
        .expect_err("refused");
    let db = error.as_db_error().expect("an answer from the proxy");
    assert_eq!(
        db.code(),
        &tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS
    );
    assert!(db.message().contains("max_sessions"), "{}", db.message());
    assert!(db.message().contains("holds 1"), "{}", db.message());
    // That test fails and ends; the other one then gets its session (or was told too).
    held[refused] = None;
    let other = more[1 - refused].take().unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(5), other)
        .await
        .expect("the other does not wait on")
        .unwrap();
    if let Err(error) = outcome {
        assert!(error.to_string().contains("max_sessions"), "{error}");
    }
}

async fn hold_one(proxy: &Proxy, lease: &str) -> tokio_postgres::Client {
    let mut config: tokio_postgres::Config = proxy.url().parse().unwrap();
    config.options(format!("-c{}={lease}", rds_iam::leases::LEASE_OPTION));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
    tokio::spawn(connection);
    client.simple_query("SELECT 1").await.unwrap();
    client
}
