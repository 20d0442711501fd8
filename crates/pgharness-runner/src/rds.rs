//! `up --backend rds` / `down` and the background process between them, over `pgharness-rds`
//! (the runtime: tunnel, tokens, TLS, local auth proxy). `up` starts this very program's
//! hidden `__rds-proxy` command in its own process group, passes on the typed progress it
//! reports (`pgharness_rds::report`) and returns once it serves; the process stops on a
//! signal, when its SSM session ends, or after `[rds] idle` without clients.

use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use pgharness::backend::rds::EnvFile;
use pgharness::{Settings, events::Event};
use pgharness_rds::report::Report;
use pgharness_rds::{RdsProxy, RdsStats};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::signal::unix::{SignalKind, signal};

use crate::emulator::{self, EmulatorOptions};
use crate::error::{Action, Error, Result};
use crate::events::{Reporter, RunEvent};

fn tell_parent(report: Report) {
    // The parent reads these until `Ready`; afterwards nobody does, which is fine.
    let _ = report.write_to(&mut std::io::stdout());
}

/// The background process (the hidden `__rds-proxy` command, started by `up`), with the
/// workspace's settings (backend rds). `for_a_run`: started by a test run, so it opens the
/// upstream sessions the run's tests will hold while they build.
pub async fn proxy_main(settings: Settings, for_a_run: bool) -> Result<ExitCode> {
    let rds =
        match RdsProxy::start(&settings, &|event: Event| tell_parent(Report::Event(event))).await {
            Ok(rds) => rds,
            Err(error) => {
                tell_parent(Report::Failed {
                    error: crate::render(&error),
                });
                return Ok(ExitCode::FAILURE);
            }
        };
    if for_a_run {
        rds.open_ahead_for_a_run();
    }
    tell_parent(Report::Ready {
        url: rds.url().to_string(),
    });
    let signals = || -> std::io::Result<_> {
        Ok((
            signal(SignalKind::interrupt())?,
            signal(SignalKind::terminate())?,
            signal(SignalKind::hangup())?,
        ))
    };
    let mut signals = signals().action(|| "failed to listen for signals".to_owned())?;
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    let reason = {
        let closed = rds.tunnel_closed();
        tokio::pin!(closed);
        loop {
            tokio::select! {
                _ = signals.0.recv() => break "interrupted".to_owned(),
                _ = signals.1.recv() => break "stopped".to_owned(),
                _ = signals.2.recv() => break "hung up".to_owned(),
                reason = &mut closed => break format!("the SSM session ended: {reason}"),
                _ = tick.tick() => {
                    if rds.idle_for() >= settings.rds.idle {
                        break format!("no client for {:?}", settings.rds.idle);
                    }
                }
            }
        }
    };
    tracing::info!(%reason, "RDS proxy stopping");
    // For `down`, which prints them.
    let stats = serde_json::to_string(&rds.stats()).unwrap_or_default();
    let _ = std::fs::write(stats_path(&settings), stats);
    rds.stop().await;
    Ok(ExitCode::SUCCESS)
}

/// The hidden command's flag for a proxy started by a test run.
pub const FOR_A_RUN: &str = "--for-a-run";

/// What `up` started.
pub struct Up {
    /// Whether it started the emulator (then `down` of the run stops it).
    pub started_emulator: bool,
    /// Whether it started the proxy (a proxy of an earlier `up` stays up after the run).
    pub started_proxy: bool,
}

/// Starts the RDS proxy (and the emulator with `emulated`) unless it runs.
pub async fn up(
    settings: &Settings,
    emulated: bool,
    options: &EmulatorOptions,
    for_a_run: bool,
    report: Reporter<'_>,
) -> Result<Up> {
    let (emulator, started_emulator) = if emulated {
        let (values, started) = emulator::ensure(settings, options, report).await?;
        (Some(values), started)
    } else {
        (None, false)
    };
    if let Some(file) = EnvFile::read(settings)?.filter(|f| f.backend == "rds" && f.proxy_alive()) {
        report(RunEvent::ProxyRunning {
            pid: file.proxy_pid.unwrap_or_default(),
        });
        return Ok(Up {
            started_emulator,
            started_proxy: false,
        });
    }
    let _ = std::fs::remove_file(stats_path(settings));
    report(RunEvent::StepStarted("starting the RDS proxy".into()));
    let log_path = settings.state_dir.join("rds-proxy.log");
    let log = pgharness::backend::secret::create_private(&log_path)?;
    let mut command = tokio::process::Command::new(crate::self_exe());
    command
        .arg(crate::RDS_PROXY_COMMAND)
        .args(for_a_run.then_some(FOR_A_RUN))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .process_group(0);
    if let Some(values) = &emulator {
        command.envs(emulator::client_env(values));
    }
    let mut child = command
        .spawn()
        .action(|| "failed to start the RDS proxy process".to_owned())?;
    let started = Instant::now();
    let mut outcome = Err("the RDS proxy exited before it was ready".to_owned());
    if let Some(stdout) = child.stdout.take() {
        let mut lines = BufReader::new(stdout).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            match Report::parse(&line) {
                Some(Report::Event(event)) => report(RunEvent::Step(event)),
                Some(Report::Ready { url }) => {
                    outcome = Ok(url);
                    break;
                }
                Some(Report::Failed { error }) => {
                    outcome = Err(error);
                    break;
                }
                None => tracing::debug!(%line, "RDS proxy: not a report"),
            }
        }
    }
    match outcome {
        Ok(url) => report(RunEvent::StepFinished(format!(
            "RDS proxy ready at {url} after {:.1}s",
            started.elapsed().as_secs_f64()
        ))),
        Err(error) => {
            report(RunEvent::StepFinished("the RDS proxy failed".into()));
            if started_emulator {
                let _ = emulator::stop(settings).await;
            }
            return Err(Error::Rds(format!("{error} (log: {})", log_path.display())));
        }
    }
    Ok(Up {
        started_emulator,
        started_proxy: true,
    })
}

/// Stops the RDS proxy (ending its SSM session); returns what it stopped.
pub async fn down(settings: &Settings, report: Reporter<'_>) -> Result<Option<String>> {
    let Some(file) = EnvFile::read(settings)?.filter(|f| f.backend == "rds") else {
        return Ok(None);
    };
    let path = pgharness::backend::rds::env_file_path(settings);
    let Some(proxy) = file.proxy().filter(|_| file.proxy_alive()) else {
        // A proxy that died left its SSM session (and the database sessions behind it) open.
        report(RunEvent::StepStarted(
            "ending what a dead RDS proxy left".into(),
        ));
        let sink = |event| report(RunEvent::Step(event));
        let ended = match crate::emulator::running(settings) {
            // The emulator's endpoint and keys are the proxy's environment, not this one's.
            Some(values) => match crate::emulator::ssm_client(&values) {
                Ok(ssm) => pgharness_rds::end_stale_session_with(settings, &ssm, &sink).await,
                Err(error) => {
                    tracing::warn!(%error, "no SSM client for the emulator");
                    false
                }
            },
            None => pgharness_rds::end_stale_session(settings, &sink).await,
        };
        report(RunEvent::StepFinished(
            if ended {
                "ended the SSM session of a dead RDS proxy"
            } else {
                "no RDS proxy runs"
            }
            .into(),
        ));
        let _ = std::fs::remove_file(&path);
        return Ok(None);
    };
    let pid = proxy.pid;
    if !proxy.terminate(Duration::from_secs(20)).await {
        return Err(Error::Rds(format!(
            "the RDS proxy (pid {pid}) did not stop within 20s"
        )));
    }
    let _ = std::fs::remove_file(&path);
    let stats = std::fs::read_to_string(stats_path(settings))
        .ok()
        .and_then(|text| serde_json::from_str::<RdsStats>(&text).ok())
        .map(|stats| format!(" ({stats})"))
        .unwrap_or_default();
    Ok(Some(format!(
        "RDS proxy (pid {pid}){stats}{}",
        file.session
            .map(|s| format!(", SSM session {s} terminated"))
            .unwrap_or_default()
    )))
}

/// After a run: the RDS proxy if it died under the run (tests then failed with "the RDS
/// proxy … is not running"), `None` while it runs.
pub fn died_during_run(settings: &Settings) -> Option<RunEvent> {
    let file = EnvFile::read(settings).ok().flatten()?;
    if file.backend != "rds" || file.proxy_alive() {
        return None;
    }
    Some(RunEvent::ProxyDied {
        pid: file.proxy_pid.unwrap_or_default(),
        log: settings
            .state_dir
            .join("rds-proxy.log")
            .display()
            .to_string(),
    })
}

/// Where the proxy process leaves its figures when it stops.
fn stats_path(settings: &Settings) -> std::path::PathBuf {
    settings.state_dir.join("rds-proxy.stats")
}
