//! `test`: the backend up once → cargo-nextest with the DB test group sized from the
//! server's budget and the janitor recycling and warming → the summary → teardown.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use pgharness::ledger::{self, ReapScope};
use pgharness::{BackendKind, Server, Settings};

use crate::error::Result;
use crate::events::{Reporter, RunEvent};
use crate::janitor::Janitor;
use crate::{nextest, runs, servers};

/// Options of the emulated cluster (`--emulated`), used with the `rds` feature.
#[derive(Clone, Debug, Default)]
pub struct EmulatorOptions {
    /// Round-trip time to emulate on the SSM data channel (e.g. 30ms).
    pub rtt: Option<Duration>,
    /// Loss, duplication and reordering probability on the data channel (e.g. 0.05).
    pub faults: Option<f64>,
    /// Where the emulated cluster's data lives: auto, container or native.
    pub local_backend: Option<BackendKind>,
}

/// Connections that fill the pool at once ahead of a run through the RDS path.
const PREFILL_CONNECTIONS: u64 = 8;

/// One `test` run: what to run it on and how.
#[derive(Clone, Debug)]
pub struct TestRun {
    /// The workspace's settings, with the backend to run on.
    pub settings: Settings,
    /// Leave the server running afterwards (it is stopped only if this run started it).
    pub keep_server: bool,
    /// With the rds backend: the emulated AWS path (fake-aws in front of a local Postgres).
    pub emulated: bool,
    /// The emulated cluster's options.
    pub emulator: EmulatorOptions,
    /// Arguments for `cargo nextest run` (none: the whole workspace).
    pub nextest_args: Vec<String>,
}

/// What `test --backend rds` runs, in a workspace that has pgharness as a member, when
/// given no nextest arguments: the workspace without pgharness's own integration tests
/// (they need an administrator on a server pgharness starts).
pub const RDS_DEFAULT_ARGS: &[&str] =
    &["--workspace", "-E", "not (package(pgharness) & kind(test))"];

impl TestRun {
    /// Runs the tests; the exit code is nextest's. Teardown runs after failures and Ctrl-C
    /// too.
    pub async fn run(&self, report: Reporter<'_>) -> Result<ExitCode> {
        if self.settings.backend == BackendKind::Rds {
            return self.run_rds(report).await;
        }
        let settings = &self.settings;
        // Held from before the server is started or joined until this run ends: the last
        // run to end is the one that can take it exclusively.
        let runs = runs::RunsLock::join(settings).await?;
        // The tests build while the server starts (a container takes seconds) and the pool
        // fills: on a fresh clone the build is most of the run.
        let build = tokio::spawn(crate::nextest::build(
            settings.root.clone(),
            self.nextest_args.clone(),
        ));
        let (server, kind, started) = servers::start_or_build(settings, report).await?;
        let mut settings = settings.clone();
        settings.backend = kind;
        if started {
            runs::mark_started_by_a_run(&settings, kind)?;
        }
        let outcome = self
            .run_on(&settings, &server, kind, Some(build), report)
            .await;
        let kept = outcome.as_ref().map_or(0, |(_, kept)| *kept);
        if self.keep_server {
            runs::forget_started_by_a_run(&settings);
        } else if kept > 0 {
            // The printed psql lines must work: the server stays up for them.
            runs::forget_started_by_a_run(&settings);
            report(RunEvent::ServerKeptForSchemas {
                kind,
                idle_stop: (kind == BackendKind::Native).then_some(settings.native_idle),
            });
        } else {
            match runs.leave().await? {
                Some(_last) => {
                    if runs::started_by_a_run(&settings, kind) {
                        for what in pgharness::backend::stop_chosen(&settings, kind).await? {
                            report(RunEvent::Stopped(what));
                        }
                        runs::forget_started_by_a_run(&settings);
                    }
                }
                None => report(RunEvent::ServerStillShared { kind }),
            }
        }
        outcome.map(|(code, _)| code)
    }

    #[cfg(not(feature = "rds"))]
    async fn run_rds(&self, _report: Reporter<'_>) -> Result<ExitCode> {
        Err(crate::Error::Rds(
            "this build has no RDS path: build pgharness-runner (or install cargo-pgharness) with the `rds` feature".into(),
        ))
    }

    /// up (proxy, tunnel, and the emulator if asked) → nextest → down, whatever happens.
    #[cfg(feature = "rds")]
    async fn run_rds(&self, report: Reporter<'_>) -> Result<ExitCode> {
        use crate::{emulator, rds};
        let settings = &self.settings;
        // pgharness's own integration tests (when it is a member: this repository) need an
        // administrator on a server pgharness starts.
        let own_tests = crate::nextest::members(&settings.root)?
            .iter()
            .any(|(name, _)| name == "pgharness");
        if own_tests && !selects_tests(&self.nextest_args) {
            report(RunEvent::RdsDefaultSelection);
            let mut test = self.clone();
            test.nextest_args = RDS_DEFAULT_ARGS
                .iter()
                .map(|s| s.to_string())
                .chain(self.nextest_args.iter().cloned())
                .collect();
            return Box::pin(test.run_rds(report)).await;
        }
        // StartSession calls and open sessions before this run (an emulator may already be
        // running, shared with other runs): the run is judged on its own sessions only.
        let before = emulator::running(settings)
            .and_then(|v| emulator::stats(&v).ok())
            .map_or((0, Vec::new()), |stats| {
                (stats.start_session_calls, stats.open)
            });
        // The local Postgres behind an emulator this run starts: stopped with it, unless
        // it ran before.
        let emulator_postgres = if self.emulated && emulator::running(settings).is_none() {
            let local = emulator::cluster_settings(settings, self.emulator.local_backend).await?;
            let kind = local.backend;
            (!pgharness::backend::is_running(&local, kind).await).then_some((local, kind))
        } else {
            None
        };
        // The tests build while the tunnel opens and the pool warms: through the link a cold
        // cluster's first schemas take seconds, which the build hides.
        let build = tokio::spawn(crate::nextest::build(
            settings.root.clone(),
            self.nextest_args.clone(),
        ));
        let up = tokio::select! {
            up = rds::up(settings, self.emulated, &self.emulator, true, report) => up,
            _ = tokio::signal::ctrl_c() => Err(crate::Error::Interrupted("while starting the RDS proxy".into())),
        };
        let started_emulator = up.as_ref().is_ok_and(|up| up.started_emulator);
        // A proxy an earlier `up` started stays up, as that command said.
        let started_proxy = up.as_ref().map_or(true, |up| up.started_proxy);
        let outcome = match up {
            Ok(_) => match pgharness::backend::ensure(settings, &pgharness::events::log_only).await
            {
                Ok(server) => {
                    self.run_on(settings, &server, BackendKind::Rds, Some(build), report)
                        .await
                }
                Err(error) => Err(error.into()),
            },
            Err(error) => Err(error),
        };
        if outcome.as_ref().is_ok_and(|(_, kept)| *kept > 0) {
            // The printed psql lines go through the proxy (and the emulator): keep them up.
            report(RunEvent::ProxyKeptForSchemas {
                emulated: self.emulated,
            });
            return outcome.map(|(code, _)| code);
        }
        let outcome = outcome.map(|(code, _)| code);
        let emulator_values = emulator::running(settings);
        if !started_proxy {
            // Unless it died under the run (said already): then nothing stays up.
            if rds::died_during_run(settings).is_none() {
                report(RunEvent::ProxyOfUpKept);
            }
            return outcome;
        }
        if let Some(what) = rds::down(settings, report).await? {
            report(RunEvent::Stopped(what));
        }
        if let Some(values) = emulator_values.filter(|_| self.emulated) {
            let stats = emulator::stats(&values)?;
            let start_sessions = stats.start_session_calls.saturating_sub(before.0);
            let open = stats
                .open
                .iter()
                .filter(|id| !before.1.contains(id))
                .count();
            report(RunEvent::EmulatorSessions {
                start_sessions,
                open,
            });
            if started_emulator && let Some(what) = emulator::stop(settings).await? {
                report(RunEvent::Stopped(what));
            }
            if started_emulator && let Some((local, kind)) = &emulator_postgres {
                for what in pgharness::backend::stop_chosen(local, *kind).await? {
                    report(RunEvent::Stopped(format!(
                        "{what} (the emulated cluster's Postgres)"
                    )));
                }
            }
            if outcome.is_ok() && (start_sessions > 1 || open > 0) {
                return Err(crate::Error::Rds(format!(
                    "the run must use at most one SSM session and leave none open (StartSession: {start_sessions}, open: {open})"
                )));
            }
        }
        outcome
    }

    async fn run_on(
        &self,
        settings: &Settings,
        server: &Server,
        kind: BackendKind,
        build: Option<tokio::task::JoinHandle<Result<std::process::ExitStatus>>>,
        report: Reporter<'_>,
    ) -> Result<(ExitCode, u64)> {
        let run_id = format!("run-{}", uuid::Uuid::new_v4());
        let admin = Arc::new(servers::admin_client(server).await?);
        ledger::hold_run_lock(&admin, &run_id).await?;
        let ns = ledger::Namespace::of(&server.config());
        let stale = ledger::reap(
            &admin,
            &ns,
            &ReapScope::Stale {
                ttl: settings.reap_ttl,
                run_grace: Duration::from_secs(30),
            },
        )
        .await?;
        if !stale.dropped.is_empty() {
            report(RunEvent::Reaped {
                schemas: stale.dropped.len(),
            });
        }
        let sessions = (kind == BackendKind::Rds).then_some(settings.rds.max_sessions);
        let (threads, max_connections) =
            nextest::budget(&admin, settings.pool_size, sessions).await?;
        report(RunEvent::Budget {
            max_connections,
            rds_sessions: sessions,
            pool_size: settings.pool_size,
            threads,
        });
        let tool_config = nextest::write_tool_config(settings, threads)?;
        let args = nextest::nextest_args(&self.nextest_args);
        // Through the RDS path tests wait on the link, not on the CPU: unless told otherwise,
        // run as many at once as the budget allows rather than one per core.
        let latency_bound = kind == BackendKind::Rds && explicit_threads(&args).is_none();
        if latency_bound {
            report(RunEvent::LatencyBoundThreads { threads });
        }
        let warm = if latency_bound {
            u64::from(threads) + 1
        } else {
            warm_target(threads, &args)
        };
        if let Some(build) = build {
            // The first tests find their schemas ready: the pool fills on several
            // connections while the tests build (and the proxy opens their sessions); through
            // the link with a second wave for the tests that start while the first one's
            // schemas are being recycled.
            let started = std::time::Instant::now();
            let target = if latency_bound { 2 * warm } else { warm };
            let prefill =
                crate::janitor::prefill(server, &admin, settings, target, PREFILL_CONNECTIONS);
            let (built, filled) = tokio::join!(build, prefill);
            if !matches!(built, Ok(Ok(status)) if status.success()) {
                tracing::debug!("the build ahead of the run did not succeed; nextest will say why");
            }
            match filled {
                Ok(Some(ready)) => report(RunEvent::PoolReady {
                    ready,
                    waited: started.elapsed(),
                }),
                Ok(None) => {}
                Err(error) => report(RunEvent::Warning(format!(
                    "the schema pool was not filled ahead of the tests: {error}"
                ))),
            }
        }
        let janitor = Janitor::spawn(admin.clone(), ns.clone(), run_id.clone(), settings, warm);
        let mut env = vec![
            ("PGHARNESS_BACKEND".to_owned(), kind.to_string()),
            ("PGHARNESS_RUN_ID".to_owned(), run_id.clone()),
            ("PGHARNESS_TEARDOWN".to_owned(), "deferred".to_owned()),
        ];
        if let Some(image) = &settings.image {
            env.push(("PGHARNESS_IMAGE".to_owned(), image.clone()));
        }
        if latency_bound {
            env.push(("NEXTEST_TEST_THREADS".to_owned(), threads.to_string()));
        }
        let status = nextest::run(
            &settings.root,
            &tool_config,
            &self.nextest_args,
            &env,
            report,
        )
        .await;
        janitor.stop().await;
        #[cfg(feature = "rds")]
        if kind == BackendKind::Rds
            && let Some(died) = crate::rds::died_during_run(settings)
        {
            // Nothing more can be asked of the cluster through it: say so, and let
            // nextest's result stand.
            report(died);
            return Ok((exit_code(status?), 0));
        }
        // The server went away under the run (stopped, crashed, or restarted by a test
        // process): its ledger went with it. Say so once and let nextest's result stand,
        // rather than failing on the ledger or printing kept schemas that no longer exist.
        if admin.is_closed() || admin.simple_query("SELECT 1").await.is_err() {
            report(RunEvent::ServerWentAway {
                kind,
                server: server.describe(),
            });
            return Ok((exit_code(status?), 0));
        }
        // The last tests' teardowns are applied by the server just after their processes
        // end (`parting`): wait for them, so that the final pass and the summary see them.
        if !ledger::settle(&admin, &ns, &run_id, Duration::from_secs(5))
            .await
            .map_err(crate::Error::from)?
        {
            tracing::warn!("teardowns of the run were still being applied after 5 s");
        }
        let finished = ledger::reap(&admin, &ns, &ReapScope::FinishedInRun(run_id.clone()))
            .await
            .map_err(crate::Error::from)?;
        tracing::debug!(
            recycled = finished.recycled.len(),
            dropped = finished.dropped.len(),
            "final janitor pass"
        );
        let summary = ledger::run_summary(&admin, &ns, &run_id).await?;
        let kept = summary.kept;
        for (schema, test) in &summary.kept_schemas {
            report(RunEvent::KeptSchema {
                schema: schema.clone(),
                test: test.clone(),
                psql: server.psql_command(schema, &settings.state_dir),
            });
        }
        for (test, outcome) in &summary.teardown_failures {
            report(RunEvent::TeardownFailed {
                test: test.clone(),
                outcome: outcome.clone(),
            });
        }
        report(RunEvent::Summary(Box::new(summary)));
        Ok((exit_code(status?), kept))
    }
}

/// Whether the nextest arguments choose packages or tests themselves.
#[cfg(feature = "rds")]
fn selects_tests(args: &[String]) -> bool {
    args.iter().any(|a| {
        [
            "-p",
            "--package",
            "--workspace",
            "-E",
            "--filterset",
            "--all",
        ]
        .contains(&a.as_str())
            || a.starts_with("--package=")
            || a.starts_with("-E")
    })
}

/// nextest's exit code, as the run's.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}

/// How many ready schemas the warmer keeps: one per test that can run at once (nextest's
/// `--test-threads`/`-j`, else the CPU count, within the DB test group), plus one spare
/// while finished schemas are being reset.
fn warm_target(group: u32, nextest_args: &[String]) -> u64 {
    let threads = explicit_threads(nextest_args)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get() as u64));
    threads.min(u64::from(group)) + 1
}

/// The test threads the nextest arguments (`--test-threads`/`-j`) or `NEXTEST_TEST_THREADS`
/// ask for.
fn explicit_threads(nextest_args: &[String]) -> Option<u64> {
    let mut threads = std::env::var("NEXTEST_TEST_THREADS")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut args = nextest_args.iter();
    while let Some(arg) = args.next() {
        let value = match arg.as_str() {
            "--test-threads" | "-j" => args.next().cloned(),
            other => other.strip_prefix("--test-threads=").map(str::to_owned),
        };
        if let Some(n) = value.and_then(|v| v.parse::<u64>().ok()) {
            threads = Some(n);
        }
    }
    threads
}
