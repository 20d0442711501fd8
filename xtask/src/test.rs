//! `cargo xtask test`: backend up once → nextest → summary → teardown.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use pgharness::ledger::{self, ReapScope, RunSummary};
use pgharness::{BackendKind, Server, Settings};

use crate::{image, nextest, servers};

#[derive(clap::Args, Clone)]
pub(crate) struct Test {
    /// auto (default), container, native or url.
    #[arg(long, value_parser = crate::parse_backend)]
    pub(crate) backend: Option<BackendKind>,
    /// Leave the server running afterwards (it is stopped only if this run started it).
    #[arg(long)]
    pub(crate) keep_server: bool,
    /// With `--backend rds`: the emulated AWS path (fake-aws in front of a local Postgres).
    #[arg(long)]
    pub(crate) emulated: bool,
    #[command(flatten)]
    pub(crate) emulator: crate::emulator::EmulatorOptions,
    /// Arguments for `cargo nextest run` (default: --workspace), e.g. `-p todo-app`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub(crate) nextest_args: Vec<String>,
}

/// What `cargo xtask test --backend rds` runs when given no nextest arguments.
const RDS_DEFAULT_ARGS: &[&str] = &["--workspace", "-E", "not (package(pgharness) & kind(test))"];

impl Test {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        let settings = crate::settings(self.backend)?;
        // The example suite and pgharness' own tests run psql.
        crate::prereq::install_missing(&[crate::prereq::PSQL])?;
        if settings.backend == BackendKind::Rds {
            return self.run_rds(settings).await;
        }
        // Held from before the server is started or joined until this run ends: the last
        // run to end is the one that can take it exclusively.
        let runs = crate::runs::RunsLock::join(&settings).await?;
        let (server, kind, started) = start_or_build(&settings).await?;
        let mut settings = settings.clone();
        settings.backend = kind;
        if started {
            crate::runs::mark_started_by_a_run(&settings, kind)?;
        }
        let outcome = self.run_on(&settings, &server, kind).await;
        let kept = outcome.as_ref().map_or(0, |(_, kept)| *kept);
        if self.keep_server {
            crate::runs::forget_started_by_a_run(&settings);
        } else if kept > 0 {
            // The printed psql lines must work: the server stays up for them.
            crate::runs::forget_started_by_a_run(&settings);
            let idle = if kind == BackendKind::Native {
                format!(
                    " (the native server stops by itself after {} without connections)",
                    humantime::format_duration(settings.native_idle)
                )
            } else {
                String::new()
            };
            eprintln!(
                "xtask: the {kind} server stays up for the kept schema(s){idle}; stop it with `cargo xtask down`"
            );
        } else {
            match runs.leave().await? {
                Some(_last) => {
                    if crate::runs::started_by_a_run(&settings, kind) {
                        for what in pgharness::backend::stop_chosen(&settings, kind).await? {
                            eprintln!("xtask: stopped {what}");
                        }
                        crate::runs::forget_started_by_a_run(&settings);
                    }
                }
                None => eprintln!(
                    "xtask: another `cargo xtask test` is still using the {kind} server; the last run to end stops it"
                ),
            }
        }
        outcome.map(|(code, _)| code)
    }

    /// up (proxy, tunnel, and the emulator if asked) → nextest → down, whatever happens.
    async fn run_rds(&self, settings: Settings) -> anyhow::Result<ExitCode> {
        let selects = self.nextest_args.iter().any(|a| {
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
        });
        if !selects {
            eprintln!(
                "xtask: the rds backend runs the workspace without pgharness' own integration tests \
                 (they need an admin on a server pgharness starts: `cargo xtask test` runs them)"
            );
            let mut test = self.clone();
            test.nextest_args = RDS_DEFAULT_ARGS
                .iter()
                .map(|s| s.to_string())
                .chain(self.nextest_args.iter().cloned())
                .collect();
            return Box::pin(test.run_rds(settings)).await;
        }
        // StartSession calls and open sessions before this run (an emulator may already be
        // running, shared with other runs): the run is judged on its own sessions only.
        let before = crate::emulator::running(&settings)
            .and_then(|v| crate::emulator::stats(&v).ok())
            .map_or((0, Vec::new()), |stats| {
                (stats.start_session_calls, stats.open)
            });
        // The local Postgres behind an emulator this run starts: stopped with it, unless
        // it ran before.
        let emulator_postgres = if self.emulated && crate::emulator::running(&settings).is_none() {
            let local =
                crate::emulator::cluster_settings(&settings, self.emulator.local_backend).await?;
            let kind = local.backend;
            (!pgharness::backend::is_running(&local, kind).await).then_some((local, kind))
        } else {
            None
        };
        let up = tokio::select! {
            up = crate::rds::up(&settings, self.emulated, &self.emulator) => up,
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted while starting")),
        };
        let started_emulator = up.as_ref().is_ok_and(|up| up.started_emulator);
        // A proxy an earlier `cargo xtask up` started stays up, as that command said.
        let started_proxy = up.as_ref().map_or(true, |up| up.started_proxy);
        let outcome = match up {
            Ok(_) => {
                match pgharness::backend::ensure(&settings, &pgharness::events::log_only).await {
                    Ok(server) => self.run_on(&settings, &server, BackendKind::Rds).await,
                    Err(error) => Err(error.into()),
                }
            }
            Err(error) => Err(error),
        };
        if outcome.as_ref().is_ok_and(|(_, kept)| *kept > 0) {
            // The printed psql lines go through the proxy (and the emulator): keep them up.
            eprintln!(
                "xtask: the RDS proxy{} stays up for the kept schema(s); stop with `cargo xtask down`",
                if self.emulated {
                    " and the emulator"
                } else {
                    ""
                }
            );
            return outcome.map(|(code, _)| code);
        }
        let outcome = outcome.map(|(code, _)| code);
        // Teardown runs after failures and Ctrl-C too.
        let emulator_values = crate::emulator::running(&settings);
        if !started_proxy {
            eprintln!(
                "xtask: the RDS proxy of `cargo xtask up` stays up; stop it with `cargo xtask down`"
            );
            return outcome;
        }
        if let Some(what) = crate::rds::down(&settings).await? {
            eprintln!("xtask: stopped {what}");
        }
        if let Some(values) = emulator_values.filter(|_| self.emulated) {
            let stats = crate::emulator::stats(&values)?;
            let start_sessions = stats.start_session_calls.saturating_sub(before.0);
            let open = stats
                .open
                .iter()
                .filter(|id| !before.1.contains(id))
                .count();
            eprintln!(
                "xtask: fake-aws saw {start_sessions} StartSession call(s) in this run; {open} of them open after down"
            );
            if started_emulator && let Some(what) = crate::emulator::stop(&settings).await? {
                eprintln!("xtask: stopped {what}");
            }
            if started_emulator && let Some((local, kind)) = &emulator_postgres {
                for what in pgharness::backend::stop_chosen(local, *kind).await? {
                    eprintln!("xtask: stopped {what} (the emulated cluster's Postgres)");
                }
            }
            if outcome.is_ok() && (start_sessions > 1 || open > 0) {
                anyhow::bail!(
                    "the run must use at most one SSM session and leave none open (StartSession: {start_sessions}, open: {open})"
                );
            }
        }
        outcome
    }

    async fn run_on(
        &self,
        settings: &Settings,
        server: &Server,
        kind: BackendKind,
    ) -> anyhow::Result<(ExitCode, u64)> {
        let run_id = format!("xtask-{}", uuid::Uuid::new_v4());
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
        .await
        .context("failed to reap schemas of earlier runs")?;
        if !stale.dropped.is_empty() {
            eprintln!(
                "xtask: reaped {} schema(s) left by earlier runs",
                stale.dropped.len()
            );
        }
        let sessions = (kind == BackendKind::Rds).then_some(settings.rds.max_sessions);
        let (threads, max_connections) =
            nextest::budget(&admin, settings.pool_size, sessions).await?;
        let rds_budget = sessions.map_or_else(String::new, |n| format!(", rds.max_sessions={n}"));
        eprintln!(
            "xtask: max_connections={max_connections}{rds_budget}, pool_size={}: at most {threads} database tests at once",
            settings.pool_size
        );
        let tool_config = nextest::write_tool_config(settings, threads)?;
        let args = nextest::nextest_args(&self.nextest_args);
        // Through the RDS path tests wait on the link, not on the CPU: unless told otherwise,
        // run as many at once as the budget allows rather than one per core.
        let latency_bound = kind == BackendKind::Rds && explicit_threads(&args).is_none();
        if latency_bound {
            eprintln!(
                "xtask: {threads} test threads (the tests wait on the link; `--test-threads N` to change)"
            );
        }

        let janitor = Janitor::spawn(
            admin.clone(),
            ns.clone(),
            run_id.clone(),
            settings.migrations.clone(),
            settings.migrations_layout,
            settings.extra_search_path.clone(),
            if latency_bound {
                u64::from(threads) + 1
            } else {
                warm_target(threads, &args)
            },
        );
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
        let status = nextest::run(&settings.root, &tool_config, &self.nextest_args, &env).await;
        janitor.stop().await;
        if kind == BackendKind::Rds
            && let Some(died) = crate::rds::died_during_run(settings)
        {
            // Nothing more can be asked of the cluster through it: say so, and let
            // nextest's result stand.
            eprintln!("xtask: {died}");
            return Ok((exit_code(status?), 0));
        }
        // The server went away under the run (stopped, crashed, or restarted by a test
        // process): its ledger went with it. Say so once and let nextest's result stand,
        // rather than failing on the ledger or printing kept schemas that no longer exist.
        if admin.is_closed() || admin.simple_query("SELECT 1").await.is_err() {
            eprintln!(
                "xtask: the {kind} server ({}) went away during the run: no summary (its ledger went with it); nextest's result stands",
                server.describe()
            );
            return Ok((exit_code(status?), 0));
        }
        let finished = ledger::reap(&admin, &ns, &ReapScope::FinishedInRun(run_id.clone())).await?;
        tracing::debug!(
            recycled = finished.recycled.len(),
            dropped = finished.dropped.len(),
            "final janitor pass"
        );
        let summary = ledger::run_summary(&admin, &ns, &run_id).await?;
        print_summary(&summary, server, settings);
        Ok((exit_code(status?), summary.kept))
    }
}

/// nextest's exit code, as the run's.
fn exit_code(status: std::process::ExitStatus) -> ExitCode {
    match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        None => ExitCode::FAILURE,
    }
}

/// Starts the backend; when the only thing missing is a Postgres image that cannot be
/// pulled, builds one from Debian packages and tries again.
pub(crate) async fn start_or_build(
    settings: &Settings,
) -> anyhow::Result<(Server, BackendKind, bool)> {
    match servers::start(settings).await {
        Ok(started) => Ok(started),
        Err(error) if image::worth_building(settings).await => {
            eprintln!("xtask: {error:#}");
            eprintln!(
                "xtask: building {} from Debian packages instead (once)",
                pgharness::backend::container::LOCAL_IMAGE
            );
            image::build(pgharness::backend::container::LOCAL_IMAGE).await?;
            servers::start(settings).await
        }
        Err(error) => Err(error),
    }
}

/// The janitor of a run: recycles the run's finished schemas off the tests' critical path
/// and keeps the pool of the default migration set at `target` ready schemas, all on its
/// one connection. It stops between passes ([`Janitor::stop`]), never in the middle of
/// one: a pass cut short could leave an owner lock held by the admin session.
pub(crate) struct Janitor {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Janitor {
    pub(crate) fn spawn(
        admin: Arc<tokio_postgres::Client>,
        ns: ledger::Namespace,
        run_id: String,
        migrations: std::path::PathBuf,
        layout: pgharness::Layout,
        extra_search_path: Vec<String>,
        target: u64,
    ) -> Janitor {
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let scope = ReapScope::FinishedInRun(run_id);
        // Without a migrations directory the tests fill the pool by themselves.
        let warmer = if migrations.is_dir() {
            pgharness::pool::Warmer::new(&migrations, layout)
                .map(|warmer| warmer.extra_search_path(&extra_search_path))
                .inspect_err(|error| tracing::warn!(%error, "the schema pool will not be warmed"))
                .ok()
        } else {
            None
        };
        let task = tokio::spawn(async move {
            let mut warnings = Warnings::default();
            loop {
                if admin.is_closed() {
                    tracing::warn!(
                        "the janitor's connection closed; finished schemas wait for the next run's reaper"
                    );
                    return;
                }
                let mut failed = false;
                let recycled = match ledger::reap(&admin, &ns, &scope).await {
                    Ok(report) => report.recycled.len() + report.dropped.len(),
                    Err(_) if admin.is_closed() => continue,
                    Err(error) => {
                        failed = true;
                        warnings.warn("janitor pass failed", &error);
                        0
                    }
                };
                // One schema per pass, so that finished schemas never wait long.
                let created = match &warmer {
                    Some(warmer) => match warmer.warm(&admin, &ns, target, 1).await {
                        Ok(warmed) => warmed.created,
                        Err(_) if admin.is_closed() => continue,
                        Err(error) => {
                            failed = true;
                            warnings.warn("warming the schema pool failed", &error);
                            0
                        }
                    },
                    None => 0,
                };
                // Tests finish every few milliseconds: go again at once after work, and
                // otherwise look again soon (a look is one query). After a failure, wait a
                // second: the same failure would come back at once.
                let pause = if failed {
                    Duration::from_secs(1)
                } else if created > 0 || recycled > 0 {
                    Duration::ZERO
                } else {
                    Duration::from_millis(10)
                };
                tokio::select! {
                    _ = stopped.notified() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        });
        Janitor { stop, task }
    }

    /// Stops after the pass under way.
    pub(crate) async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// The janitor's warnings, rate-limited: a failure that repeats (a migration that does not
/// apply, a server gone) is logged once, then once a minute with how often it came back.
#[derive(Default)]
struct Warnings {
    last: Option<(String, std::time::Instant, u64)>,
}

impl Warnings {
    fn warn(&mut self, what: &str, error: &dyn std::fmt::Display) {
        let text = format!("{what}: {error}");
        match &mut self.last {
            Some((last, at, repeats)) if *last == text => {
                *repeats += 1;
                if at.elapsed() >= Duration::from_secs(60) {
                    tracing::warn!(repeats = *repeats, "{text} (again)");
                    *at = std::time::Instant::now();
                    *repeats = 0;
                }
            }
            _ => {
                tracing::warn!("{text}");
                self.last = Some((text, std::time::Instant::now(), 0));
            }
        }
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

fn ms(value: Option<f64>) -> String {
    value.map_or("-".into(), |v| format!("{v:.1} ms"))
}

pub(crate) fn print_summary(summary: &RunSummary, server: &Server, settings: &Settings) {
    eprintln!(
        "pgharness summary: {} tests used a database; pool: {} hits, {} misses; after the tests: \
         {} recycled, {} dropped, {} kept, {} pending",
        summary.tests,
        summary.claimed,
        summary.created,
        summary.recycled,
        summary.dropped,
        summary.kept,
        summary.pending,
    );
    eprintln!(
        "pgharness acquire: p50 {} p95 {} (from the pool: p50 {} p95 {}; created: p50 {} p95 {}); reset p50 {}",
        ms(summary.acquire_p50_ms),
        ms(summary.acquire_p95_ms),
        ms(summary.claimed_p50_ms),
        ms(summary.claimed_p95_ms),
        ms(summary.created_p50_ms),
        ms(summary.created_p95_ms),
        ms(summary.reset_p50_ms),
    );
    for (schema, test) in &summary.kept_schemas {
        let command = server.psql_command(schema, &settings.state_dir);
        eprintln!("  kept {schema} (test `{test}`): {command}");
    }
}
