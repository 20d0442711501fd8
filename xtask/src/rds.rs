//! The run's RDS proxy: one background process that opens the SSM tunnel (when a target is
//! set), keeps the IAM token cache and serves the local auth proxy for every test process,
//! psql and the app. `cargo xtask up --backend rds` starts it; `down` stops it (ending the
//! SSM session); it stops by itself after `[rds] idle` without clients.

use std::io::{BufRead, BufReader, Write};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pgharness::backend::rds::EnvFile;
use pgharness::{BackendKind, SecretUrl, Settings};
use rds_iam::credentials::DefaultChain;
use rds_iam::dialer::{BoxStream, Dialer};
use rds_iam::{ProxyPassword, RdsTarget, TcpDialer, TlsPolicy, TokenCache, TokenRequest};
use ssm_tunnel::{Tunnel, TunnelConfig};
use tokio::signal::unix::{SignalKind, signal};

use crate::emulator::{self, EmulatorOptions};
use crate::ui::Progress;

/// Streams from the SSM tunnel, for rds-iam (which knows nothing of SSM).
#[derive(Debug)]
pub(crate) struct TunnelDialer(pub(crate) Arc<Tunnel>);

impl Dialer for TunnelDialer {
    fn dial(
        &self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<BoxStream>> + Send + '_>>
    {
        Box::pin(async move {
            let stream = self.0.connect().await.map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::ConnectionAborted, e.to_string())
            })?;
            Ok(Box::new(stream) as BoxStream)
        })
    }
}

fn say(line: &str) {
    // The parent reads these until `ready`; afterwards nobody does, which is fine.
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{line}").and_then(|()| stdout.flush());
}

/// The background process (`cargo xtask __rds-proxy`, started by `up`).
pub(crate) async fn proxy_main() -> anyhow::Result<ExitCode> {
    let settings = crate::settings(Some(BackendKind::Rds))?;
    let started = match start_proxy(&settings).await {
        Ok(started) => started,
        Err(error) => {
            say(&format!("error {error:#}"));
            return Ok(ExitCode::FAILURE);
        }
    };
    let (proxy, tunnel) = started;
    say(&format!("ready {}", pgharness::redact_url(&proxy.url())));
    let mut signals = (
        signal(SignalKind::interrupt())?,
        signal(SignalKind::terminate())?,
        signal(SignalKind::hangup())?,
    );
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let watched = tunnel.clone();
    let closed = async move {
        match watched {
            Some(tunnel) => tunnel.closed().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(closed);
    let reason = loop {
        tokio::select! {
            _ = signals.0.recv() => break "interrupted".to_owned(),
            _ = signals.1.recv() => break "stopped".to_owned(),
            _ = signals.2.recv() => break "hung up".to_owned(),
            reason = &mut closed => break format!("the SSM session ended: {reason}"),
            _ = tick.tick() => {
                if proxy.idle_for() >= settings.rds.idle {
                    break format!("no client for {:?}", settings.rds.idle);
                }
            }
        }
    };
    tracing::info!(%reason, "RDS proxy stopping");
    // Only remove the env file if it is still ours.
    if EnvFile::read(&settings)
        .ok()
        .flatten()
        .and_then(|f| f.proxy_pid)
        == Some(std::process::id() as i32)
    {
        let _ = std::fs::remove_file(pgharness::backend::rds::env_file_path(&settings));
    }
    proxy.shutdown();
    if let Some(tunnel) = tunnel {
        tunnel.terminate().await;
        tracing::info!(session = %tunnel.session_id(), "SSM session terminated");
    }
    Ok(ExitCode::SUCCESS)
}

async fn start_proxy(settings: &Settings) -> anyhow::Result<(rds_iam::Proxy, Option<Arc<Tunnel>>)> {
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
    let (dialer, tunnel): (Arc<dyn Dialer>, Option<Arc<Tunnel>>) = match &settings.rds.ssm_target {
        Some(target) => {
            say(&format!(
                "progress opening the SSM tunnel through {target} to {host}:{}",
                settings.rds.port
            ));
            let mut config = TunnelConfig::new(target, &host, settings.rds.port);
            config.region = Some(endpoint.region.clone());
            let tunnel = Arc::new(
                Tunnel::open(config)
                    .await
                    .context("failed to open the SSM tunnel")?,
            );
            say(&format!(
                "progress SSM session {} open",
                tunnel.session_id()
            ));
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
    say(&format!("progress logging in to {host} as {user} (IAM)"));
    let client = rds_iam::connect(&target, None, dialer.as_ref(), &tokens, &|waiting| {
        say(&format!("progress {waiting}"))
    })
    .await
    .with_context(|| format!("failed to log in to {host} as {user}"))?;
    client.simple_query("SELECT 1").await?;
    drop(client);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let proxy = rds_iam::serve(listener, target, ProxyPassword::random(), dialer, tokens)?;
    EnvFile {
        backend: "rds".into(),
        url: Some(SecretUrl::new(proxy.url())),
        proxy_pid: Some(std::process::id() as i32),
        session: tunnel.as_ref().map(|t| t.session_id().to_owned()),
    }
    .write(settings)?;
    Ok((proxy, tunnel))
}

/// What `up` started.
pub(crate) struct Up {
    /// Whether it started the emulator (then `down` of the run stops it).
    pub(crate) started_emulator: bool,
}

/// Starts the RDS proxy (and the emulator with `emulated`) unless it runs.
pub(crate) async fn up(
    settings: &Settings,
    emulated: bool,
    options: &EmulatorOptions,
) -> anyhow::Result<Up> {
    let (emulator, started_emulator) = if emulated {
        let (values, started) = emulator::ensure(settings, options).await?;
        (Some(values), started)
    } else {
        (None, false)
    };
    if let Some(file) = EnvFile::read(settings)?.filter(|f| f.backend == "rds" && f.proxy_alive()) {
        eprintln!(
            "xtask: the RDS proxy already runs (pid {})",
            file.proxy_pid.unwrap_or_default()
        );
        return Ok(Up { started_emulator });
    }
    let progress = Progress::start("starting the RDS proxy");
    let log =
        pgharness::backend::secret::create_private(&settings.state_dir.join("rds-proxy.log"))?;
    let mut command = std::process::Command::new(crate::self_exe());
    command
        .arg("__rds-proxy")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log);
    if let Some(values) = &emulator {
        command.envs(emulator::client_env(values));
    }
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command
        .spawn()
        .context("failed to start the RDS proxy process")?;
    let stdout = child.stdout.take().context("no stdout")?;
    let lines = tokio::task::spawn_blocking(move || {
        let mut outcome = Err(anyhow::anyhow!("the RDS proxy exited before it was ready"));
        let mut seen = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("ready ") {
                outcome = Ok(rest.to_owned());
                break;
            }
            if let Some(rest) = line.strip_prefix("error ") {
                outcome = Err(anyhow::anyhow!("{rest}"));
                break;
            }
            seen.push(line);
        }
        (outcome, seen)
    });
    let started = Instant::now();
    let (outcome, seen) = lines.await?;
    for line in &seen {
        progress.say(line.trim_start_matches("progress ").to_owned());
    }
    match outcome {
        Ok(url) => progress.finish(&format!(
            "RDS proxy ready at {url} after {:.1}s",
            started.elapsed().as_secs_f64()
        )),
        Err(error) => {
            progress.finish("the RDS proxy failed");
            if started_emulator {
                let _ = emulator::stop(settings).await;
            }
            bail!(
                "{error:#} (log: {})",
                settings.state_dir.join("rds-proxy.log").display()
            );
        }
    }
    Ok(Up { started_emulator })
}

/// Stops the RDS proxy (ending its SSM session); returns what it stopped.
pub(crate) async fn down(settings: &Settings) -> anyhow::Result<Option<String>> {
    let Some(file) = EnvFile::read(settings)?.filter(|f| f.backend == "rds") else {
        return Ok(None);
    };
    let path = pgharness::backend::rds::env_file_path(settings);
    let Some(pid) = file.proxy_pid.filter(|_| file.proxy_alive()) else {
        let _ = std::fs::remove_file(&path);
        return Ok(None);
    };
    if !pgharness::backend::terminate_and_wait(pid, Duration::from_secs(20)).await {
        bail!("the RDS proxy (pid {pid}) did not stop within 20s");
    }
    let _ = std::fs::remove_file(&path);
    Ok(Some(format!(
        "RDS proxy (pid {pid}){}",
        file.session
            .map(|s| format!(", SSM session {s} terminated"))
            .unwrap_or_default()
    )))
}
