//! The tunnel against fake-aws's SSM service and agent, in front of a real Postgres.

mod common;

use common::{DB_HOST, TARGET, env, query_over};
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
