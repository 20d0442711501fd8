//! The tunnel under the network faults real links have: a blackhole that outlives its
//! connections (NAT timeouts, VPN drops, sleeping laptops), a reset storm, and hung SSM
//! endpoints. A relay in front of fake-aws plays the network (`common::relay`), so no root
//! rights are needed. Every wait ends, bounded and named.

mod common;

use std::time::{Duration, Instant};

use common::relay::Relay;
use common::{DB_HOST, TARGET, echo_server, env, pattern, query_over, round_trip};
use ssm_tunnel::{Tunnel, TunnelConfig};

/// fake-aws (echo and Postgres behind its agent) reached only through `relay`.
async fn behind(relay: &Relay) -> (common::Env, Tunnel) {
    let echo = echo_server().await;
    let advertised = relay.addr();
    let env = env(|config| {
        config.host_map.insert("echo.internal".into(), echo);
        config.advertise = Some(advertised);
    })
    .await;
    relay.forward_to(env.ssm.local_addr());
    let client = env.client_at(&format!("http://{}", relay.addr()));
    let tunnel = Tunnel::open_with(TunnelConfig::new(TARGET, "echo.internal", 7), client)
        .await
        .expect("the tunnel opens through the relay");
    (env, tunnel)
}

/// Two 3 MB transfers in flight when the network fails for `outage`, then comes back:
/// both end byte-exact, the session was resumed (not restarted), and a query still runs.
async fn transfers_survive(fail: impl Fn(&Relay), outage: Duration) -> Duration {
    let relay = Relay::bind().await;
    let (env, tunnel) = behind(&relay).await;
    let tunnel = std::sync::Arc::new(tunnel);
    let transfers: Vec<_> = (0..2u64)
        .map(|k| {
            let tunnel = tunnel.clone();
            tokio::spawn(async move {
                let data = pattern(3 * 1024 * 1024, 40 + k);
                let back = round_trip(tunnel.connect().await.unwrap(), data.clone()).await;
                back == data
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    fail(&relay);
    tokio::time::sleep(outage).await;
    relay.restore();
    let restored = Instant::now();
    for transfer in transfers {
        let intact = tokio::time::timeout(Duration::from_secs(90), transfer)
            .await
            .expect("the transfer ends within 90 s of the network's return")
            .unwrap();
        assert!(intact, "the bytes came back corrupted");
    }
    let recovered_after = restored.elapsed();
    assert!(tunnel.ended().is_none(), "{:?}", tunnel.ended());
    assert!(
        tunnel.reconnects() >= 1,
        "the session was resumed on a new websocket"
    );
    assert_eq!(env.ssm.start_session_calls(), 1, "resumed, not restarted");
    // Postgres through the same session.
    let db = Tunnel::open_with(
        TunnelConfig::new(TARGET, DB_HOST, 5432),
        env.client_at(&format!("http://{}", relay.addr())),
    )
    .await
    .unwrap();
    query_over(db.connect().await.unwrap())
        .await
        .expect("a query after the outage");
    recovered_after
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixty_second_blackhole_mid_transfer_ends_with_both_transfers_intact() {
    // Before: the driver waited on its blocked write and stopped reading, and no silence
    // was ever noticed; the transfers hung for good after the network came back.
    transfers_survive(Relay::blackhole, Duration::from_secs(60)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixty_second_reset_storm_is_resumed_soon_after_the_network_returns() {
    let recovered_after = transfers_survive(Relay::reset_storm, Duration::from_secs(60)).await;
    // Resume attempts back off to at most 2 s apart, and carry on for `resume_for` (3 min).
    // (Before: 8 attempts in 13 s, then the session was given up.)
    assert!(
        recovered_after < Duration::from_secs(30),
        "the transfers took {recovered_after:?} after the network came back"
    );
}

#[tokio::test]
async fn a_hung_ssm_endpoint_is_a_named_timeout() {
    let relay = Relay::bind().await;
    let env = env(|_| {}).await;
    relay.forward_to(env.ssm.local_addr());
    relay.blackhole();
    let started = Instant::now();
    let error = Tunnel::open_with(
        TunnelConfig::new(TARGET, DB_HOST, 5432),
        env.client_at(&format!("http://{}", relay.addr())),
    )
    .await
    .expect_err("StartSession cannot answer");
    assert!(error.is_timeout(), "{error}");
    let message = error.to_string();
    assert!(message.contains("StartSession"), "{message}");
    assert!(message.contains("did not answer within 20 s"), "{message}");
    assert!(started.elapsed() < Duration::from_secs(40));
}

#[tokio::test]
async fn a_data_channel_that_never_answers_is_a_named_timeout() {
    let relay = Relay::bind().await;
    let advertised = relay.addr();
    let env = env(|config| config.advertise = Some(advertised)).await;
    relay.forward_to(env.ssm.local_addr());
    // The API answers directly; the websocket goes to the relay, which carries nothing.
    relay.blackhole();
    let mut config = TunnelConfig::new(TARGET, DB_HOST, 5432);
    config.open_timeout = Duration::from_secs(2);
    let error = Tunnel::open_with(config, env.client())
        .await
        .expect_err("the websocket cannot open");
    assert!(error.is_timeout(), "{error}");
    assert!(
        error.to_string().contains("data channel websocket"),
        "{error}"
    );
    assert_eq!(
        env.ssm.open_sessions(),
        0,
        "the session is terminated, not left open"
    );
}
