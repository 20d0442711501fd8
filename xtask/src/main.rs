//! `cargo xtask`: starts the test database once per run, runs cargo-nextest, reports and
//! tears down. One module per command, each with a `run`.

mod bench;
mod ci;
mod doctor;
mod emulator;
mod fuzz;
mod grant;
mod image;
mod nextest;
mod outside;
mod prereq;
mod rds;
mod reap;
mod runs;
mod servers;
mod test;
#[cfg(test)]
mod tidy;
mod ui;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pgharness::BackendKind;

#[derive(Parser)]
#[command(name = "cargo xtask", about = "pgharness developer tasks", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start the backend, run cargo-nextest, print a summary, tear down.
    Test(test::Test),
    /// Start (or join) the backend's server and leave it running.
    Up(servers::Up),
    /// Stop the servers pgharness started for this workspace.
    Down(servers::Down),
    /// Drop schemas of finished or dead runs, and remove expired containers.
    Reap(reap::Reap),
    /// Build the Postgres image `pgharness/postgres:17-2` from Debian packages (no registry needed).
    Image(image::Image),
    /// Everything CI checks: formatting, lints, the tests on the container and native backends, a bounded fuzz run.
    Ci(ci::Ci),
    /// A bounded cargo-fuzz run of the SSM protocol decoders.
    Fuzz(fuzz::Fuzz),
    /// Start fake-aws (SSM service and agent, RDS IAM front) in front of a local Postgres.
    Emulate(emulator::Emulate),
    /// Measure acquire latency, token minting and tunnel throughput; prints figures and targets.
    Bench(bench::Bench),
    /// Check everything a run depends on, with a fix for each failure.
    Doctor(doctor::Doctor),
    /// RDS helpers: `grant-sql` prints the one-time SQL and the IAM policy.
    Rds(grant::Rds),
    /// The background RDS proxy (started by `up --backend rds`; not for direct use).
    #[command(name = "__rds-proxy", hide = true)]
    RdsProxy,
}

/// The workspace root, from xtask's own manifest directory.
/// The workspace xtask works on, found at run time: `cargo xtask` (`cargo run -p xtask`)
/// sets `CARGO_MANIFEST_DIR` to this checkout's `xtask/`; run otherwise, the workspace
/// `cargo locate-project` finds from the current directory. Never the path it was compiled
/// in: a copied or moved checkout (with its `target/`) must not act on the original's servers.
pub(crate) fn project_root() -> PathBuf {
    static ROOT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    ROOT.get_or_init(|| {
        if let Some(manifest) = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from)
            && manifest.join("Cargo.toml").is_file()
            && let Some(root) = manifest.parent()
        {
            return root.to_path_buf();
        }
        let located =
            std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
                .args(["locate-project", "--workspace", "--message-format", "plain"])
                .output();
        match located {
            Ok(output) if output.status.success() => {
                let manifest = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
                manifest.parent().map(PathBuf::from).unwrap_or(manifest)
            }
            _ => std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
        }
    })
    .clone()
}

/// Settings for this workspace, with a backend chosen on the command line.
pub(crate) fn settings(backend: Option<BackendKind>) -> anyhow::Result<pgharness::Settings> {
    let mut settings = pgharness::Settings::load_from(&project_root(), std::env::vars())?;
    for (name, meant) in &settings.near_misses {
        eprintln!(
            "xtask: warning: {name} is not a pgharness setting and is ignored; did you mean {meant}?"
        );
    }
    if let Some(backend) = backend {
        settings.backend = backend;
    }
    Ok(settings)
}

/// This very program, to start another xtask process (the RDS proxy, `ci`'s checks): a
/// build during the run (tests of xtask build its binary) replaces the file, after which
/// `current_exe()` names a deleted path, while `/proc/self/exe` still runs this image.
pub(crate) fn self_exe() -> PathBuf {
    let proc_exe = PathBuf::from("/proc/self/exe");
    if proc_exe.exists() {
        return proc_exe;
    }
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("xtask"))
}

pub(crate) fn parse_backend(text: &str) -> Result<BackendKind, String> {
    text.parse()
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("XTASK_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: failed to start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Test(command) => command.run().await,
            Command::Up(command) => command.run().await,
            Command::Down(command) => command.run().await,
            Command::Reap(command) => command.run().await,
            Command::Image(command) => command.run().await,
            Command::Ci(command) => command.run().await,
            Command::Fuzz(command) => command.run().await,
            Command::Emulate(command) => command.run().await,
            Command::RdsProxy => rds::proxy_main().await,
            Command::Doctor(command) => command.run().await,
            Command::Bench(command) => command.run().await,
            Command::Rds(command) => command.run().await,
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", render(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes on one line, each said once: a cause whose text its parent's
/// message already carries (libraries that put the cause in their message and also return
/// it from `source()`) is not repeated.
pub(crate) fn render(error: &(dyn std::error::Error + 'static)) -> String {
    let mut said = String::new();
    for cause in std::iter::successors(Some(error), |e| e.source()) {
        let text = cause.to_string();
        if text.is_empty() || said.contains(&text) {
            continue;
        }
        if !said.is_empty() {
            said.push_str(": ");
        }
        said.push_str(&text);
    }
    said
}

#[cfg(test)]
mod render_tests {
    #[derive(Debug)]
    struct Leaf;
    impl std::fmt::Display for Leaf {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("connection refused")
        }
    }
    impl std::error::Error for Leaf {}

    /// A message that embeds its cause and also returns it.
    #[derive(Debug)]
    struct Embeds(Leaf);
    impl std::fmt::Display for Embeds {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "failed to log in: {}", self.0)
        }
    }
    impl std::error::Error for Embeds {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    #[test]
    fn each_cause_is_said_once() {
        let error = anyhow::Error::new(Embeds(Leaf)).context("failed to start the RDS proxy");
        assert_eq!(
            format!("{error:#}").matches("connection refused").count(),
            1 + 1
        );
        assert_eq!(
            super::render(error.as_ref()),
            "failed to start the RDS proxy: failed to log in: connection refused"
        );
    }
}
