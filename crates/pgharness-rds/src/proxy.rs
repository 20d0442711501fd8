//! [`RdsProxy`]: the run's one path to the cluster. Started once per run (by `cargo
//! pgharness up`, through `pgharness-runner`, or a user's binary), shared by every test process through the local auth proxy's
//! URL in `target/pgharness/env`.

use std::sync::Arc;
use std::time::Duration;

use pgharness::backend::rds::{EnvFile, env_file_path};
use pgharness::events::{Event, EventSink, emit};
use pgharness::{SecretUrl, Settings};
use rds_iam::credentials::DefaultChain;
use rds_iam::dialer::Dialer;
use rds_iam::{ProxyPassword, RdsTarget, TcpDialer, TlsPolicy, TokenCache, TokenRequest};
use ssm_tunnel::{Tunnel, TunnelConfig};

use crate::dialer::TunnelDialer;
use crate::error::Error;

/// A running RDS proxy: the local auth proxy, and the SSM session under it if any.
#[derive(Debug)]
pub struct RdsProxy {
    proxy: rds_iam::Proxy,
    tunnel: Option<Arc<Tunnel>>,
    tokens: Arc<TokenCache>,
    settings: Settings,
}

/// What a proxy did so far: the figures a run's summary shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RdsStats {
    /// Upstream logins (sessions opened through the tunnel, TLS and IAM).
    pub upstream_logins: u64,
    /// Clients served by a session opened before they came (no upstream round trip).
    pub clients_from_pool: u64,
    /// Upstream sessions closed instead of reused.
    pub discarded_sessions: u64,
    /// IAM tokens signed.
    pub tokens_minted: u64,
    /// Clients that waited for a session because the budget was all in use.
    #[serde(default)]
    pub clients_waited: u64,
}

impl std::fmt::Display for RdsStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} upstream login(s), {} client(s) from the session pool, {} session(s) discarded, {} token(s) minted",
            self.upstream_logins,
            self.clients_from_pool,
            self.discarded_sessions,
            self.tokens_minted
        )?;
        if self.clients_waited > 0 {
            write!(
                f,
                ", {} client(s) waited for the session budget",
                self.clients_waited
            )?;
        }
        Ok(())
    }
}

/// A proxy killed without its teardown (kill -9, an OOM kill, a machine that slept) leaves
/// its SSM session open: the agent keeps the session's connections to the cluster for a
/// resume, and with them the proxy's database sessions, their advisory locks (the run lock,
/// schemas' owner locks, budget slots) and their connection slots, until the service's idle
/// timeout (20 minutes by default). The next proxy of the workspace ends that session, which
/// closes them all.
/// Returns whether it ended one. The SSM client comes from the environment (as the proxy's).
pub async fn end_stale_session(settings: &Settings, events: EventSink<'_>) -> bool {
    let region = settings
        .rds
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok());
    end_stale_session_in(settings, region.as_deref(), None, events).await
}

/// [`end_stale_session`] with an SSM client of the caller's (e.g. for an emulator whose
/// endpoint and keys are not in this process's environment).
pub async fn end_stale_session_with(
    settings: &Settings,
    ssm: &aws_sdk_ssm::Client,
    events: EventSink<'_>,
) -> bool {
    end_stale_session_in(settings, None, Some(ssm), events).await
}

async fn end_stale_session_in(
    settings: &Settings,
    region: Option<&str>,
    ssm: Option<&aws_sdk_ssm::Client>,
    events: EventSink<'_>,
) -> bool {
    let Ok(Some(file)) = EnvFile::read(settings) else {
        return false;
    };
    let (Some(session), Some(pid)) = (file.session.clone(), file.proxy_pid) else {
        return false;
    };
    if file.backend != "rds" || file.proxy_alive() {
        return false;
    }
    let ended = async {
        match ssm {
            Some(ssm) => ssm_tunnel::control::terminate(ssm, &session).await,
            None => {
                let client = ssm_tunnel::control::client(region).await?;
                ssm_tunnel::control::terminate(&client, &session).await
            }
        }
    };
    match ended.await {
        Ok(()) => {
            emit(events, Event::EndedStaleSession { session, pid });
            // The env file named it; a new one is written once this proxy serves.
            let _ = std::fs::remove_file(env_file_path(settings));
            true
        }
        Err(error) => {
            tracing::warn!(%error, %session, pid, "could not terminate the SSM session of a proxy that died");
            false
        }
    }
}

impl RdsProxy {
    /// Opens the SSM session (when `[rds] ssm_target` is set), checks an IAM login, serves
    /// the local auth proxy on 127.0.0.1 and writes `target/pgharness/env` (0600) with its
    /// URL, this process's pid and the session id.
    pub async fn start(settings: &Settings, events: EventSink<'_>) -> Result<RdsProxy, Error> {
        let (host, user, bundle) = settings.rds.require()?;
        let tls = rds_iam::tls::client_config(&TlsPolicy::VerifyFull { ca_bundle: bundle })?;
        let region = settings
            .rds
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok());
        let endpoint = TokenRequest::new(&host, settings.rds.port, &user, region.as_deref())?;
        let credentials = DefaultChain::load().await?;
        let tokens = Arc::new(TokenCache::new(Arc::new(credentials)));
        let (dialer, tunnel): (Arc<dyn Dialer>, Option<Arc<Tunnel>>) =
            match &settings.rds.ssm_target {
                Some(target) => {
                    end_stale_session_in(settings, Some(&endpoint.region), None, events).await;
                    emit(
                        events,
                        Event::OpeningTunnel {
                            target: target.clone(),
                            host: host.clone(),
                            port: settings.rds.port,
                        },
                    );
                    let mut config = TunnelConfig::new(target, &host, settings.rds.port);
                    config.region = Some(endpoint.region.clone());
                    let tunnel = Arc::new(Tunnel::open(config).await.map_err(Error::Tunnel)?);
                    emit(
                        events,
                        Event::TunnelOpen {
                            session: tunnel.session_id().to_owned(),
                        },
                    );
                    (Arc::new(TunnelDialer(tunnel.clone())), Some(tunnel))
                }
                None => (
                    Arc::new(TcpDialer::new(format!("{host}:{}", settings.rds.port))),
                    None,
                ),
            };
        let target = RdsTarget {
            endpoint,
            database: settings.rds.database.clone(),
            tls,
            wake_deadline: settings.rds.wake_deadline,
        };
        emit(
            events,
            Event::LoggingIn {
                host: host.clone(),
                user: user.clone(),
            },
        );
        let client = rds_iam::connect(&target, None, dialer.as_ref(), &tokens, &|waiting| {
            emit(
                events,
                Event::WaitingForDatabase {
                    waited: waiting.waited,
                    reason: waiting.reason,
                },
            )
        })
        .await?;
        client
            .simple_query("SELECT 1")
            .await
            .map_err(|error| rds_iam::Error::Postgres {
                action: format!("failed to query {host} as {user}"),
                error,
            })?;
        drop(client);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(Error::Listen)?;
        let proxy = rds_iam::serve(
            listener,
            target,
            ProxyPassword::random(),
            dialer,
            tokens.clone(),
            rds_iam::Budget::new(settings.rds.max_sessions),
        )?;
        EnvFile {
            backend: "rds".into(),
            url: Some(SecretUrl::new(proxy.url())),
            proxy_pid: Some(std::process::id() as i32),
            proxy_started: Some(pgharness::backend::ProcessId::current().started),
            session: tunnel.as_ref().map(|t| t.session_id().to_owned()),
            workspace: Some(settings.root.clone()),
        }
        .write(settings)?;
        Ok(RdsProxy {
            proxy,
            tunnel,
            tokens,
            settings: settings.clone(),
        })
    }

    /// Opens, ahead of demand, the upstream sessions a test run's tests hold at once (as many
    /// as the session budget lets run, each with its pool and one more connection), in the
    /// background: a run started against a cold proxy then finds them open by the time its
    /// tests are built.
    pub fn open_ahead_for_a_run(&self) {
        let pool_size = self.settings.pool_size;
        let tests =
            pgharness::budget::max_parallel_tests(self.settings.rds.max_sessions, 0, 0, pool_size);
        self.proxy.open_ahead(tests as usize * (pool_size + 1));
    }

    /// The local auth proxy's URL (it carries the per-run password: never log it).
    pub fn url(&self) -> SecretUrl {
        SecretUrl::new(self.proxy.url())
    }

    /// The SSM session id, when it tunnels.
    pub fn session_id(&self) -> Option<&str> {
        self.tunnel.as_ref().map(|t| t.session_id())
    }

    /// What it did so far.
    pub fn stats(&self) -> RdsStats {
        RdsStats {
            upstream_logins: self.proxy.upstream_logins(),
            clients_from_pool: self.proxy.clients_from_pool(),
            discarded_sessions: self.proxy.discarded_sessions(),
            tokens_minted: self.tokens.minted(),
            clients_waited: self.proxy.clients_waited(),
        }
    }

    /// How long no client has been connected.
    pub fn idle_for(&self) -> Duration {
        self.proxy.idle_for()
    }

    /// Resolves when the SSM session ends by itself (never without a tunnel), with why.
    pub async fn tunnel_closed(&self) -> String {
        match &self.tunnel {
            Some(tunnel) => tunnel.closed().await,
            None => std::future::pending().await,
        }
    }

    /// Stops serving, removes the env file if it still names this process, and ends the
    /// SSM session (Flag TerminateSession and the API).
    pub async fn stop(self) {
        let ours = EnvFile::read(&self.settings)
            .ok()
            .flatten()
            .and_then(|file| file.proxy_pid)
            == Some(std::process::id() as i32);
        if ours {
            let _ = std::fs::remove_file(env_file_path(&self.settings));
        }
        self.proxy.shutdown();
        if let Some(tunnel) = self.tunnel {
            tunnel.terminate().await;
            tracing::info!(session = %tunnel.session_id(), "SSM session terminated");
        }
    }
}
