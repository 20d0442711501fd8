//! `cargo pgharness`: the run lifecycle of [`pgharness_runner`] as commands, for any
//! workspace. Install the binary (`cargo install --path crates/cargo-pgharness`), or mount
//! the same commands in your own xtask:
//!
//! ```ignore
//! #[derive(clap::Subcommand)]
//! enum Command {
//!     #[command(flatten)]
//!     Pgharness(cargo_pgharness::Command),
//!     // … your own tasks
//! }
//! // in main, for that arm:
//! Command::Pgharness(command) => command.run(&cargo_pgharness::workspace_root()).await,
//! ```
//!
//! This layer only parses arguments and renders the runner's events ([`render`]); the
//! product code is in `pgharness-runner`.

mod doctor;
mod emulate;
mod grant;
#[cfg(feature = "container")]
mod image;
pub mod prereq;
mod reap;
pub mod render;
mod servers;
mod test;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use pgharness::BackendKind;

pub use emulate::EmulatorArgs;
pub use test::Test;

/// The commands, as a clap `Subcommand` (flatten it into your own).
#[derive(clap::Subcommand)]
pub enum Command {
    /// Start the backend, run cargo-nextest, print a summary, tear down.
    Test(Test),
    /// Start (or join) the backend's server and leave it running.
    Up(servers::Up),
    /// Stop the servers pgharness started for this workspace.
    Down(servers::Down),
    /// Drop schemas of finished or dead runs, and remove expired containers.
    Reap(reap::Reap),
    /// Build the Postgres image `pgharness/postgres:17-2` from Debian packages (no registry needed).
    #[cfg(feature = "container")]
    Image(image::Image),
    /// Start fake-aws (SSM service and agent, RDS IAM front) in front of a local Postgres.
    Emulate(emulate::Emulate),
    /// Check everything a run depends on, with a fix for each failure.
    Doctor(doctor::Doctor),
    /// RDS helpers: `grant-sql` prints the one-time SQL and the IAM policy.
    Rds(grant::Rds),
    /// The background RDS proxy (started by `up --backend rds`; not for direct use).
    #[cfg(feature = "rds")]
    #[command(name = "__rds-proxy", hide = true)]
    RdsProxy {
        /// Started by a test run: open the sessions its tests will hold, ahead of them.
        #[arg(long)]
        for_a_run: bool,
    },
    /// fake-aws, the emulated AWS (started by `emulate`; not for direct use).
    #[cfg(feature = "rds")]
    #[command(name = "__fake-aws", hide = true)]
    FakeAws(Box<fake_aws::cli::Cli>),
}

impl Command {
    /// Runs the command on the workspace at `root`.
    pub async fn run(self, root: &Path) -> anyhow::Result<ExitCode> {
        match self {
            Command::Test(command) => command.run(root).await,
            Command::Up(command) => command.run(root).await,
            Command::Down(command) => command.run(root).await,
            Command::Reap(command) => command.run(root).await,
            #[cfg(feature = "container")]
            Command::Image(command) => command.run().await,
            Command::Emulate(command) => command.run(root).await,
            Command::Doctor(command) => command.run(root).await,
            Command::Rds(command) => command.run().await,
            #[cfg(feature = "rds")]
            Command::RdsProxy { for_a_run } => Ok(pgharness_runner::rds::proxy_main(
                settings(root, Some(BackendKind::Rds))?,
                for_a_run,
            )
            .await?),
            #[cfg(feature = "rds")]
            Command::FakeAws(cli) => {
                fake_aws::cli::serve(*cli).await?;
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// The workspace `cargo locate-project` finds from the current directory (a binary run by
/// `cargo pgharness` in any directory of it); the current directory when there is none.
pub fn workspace_root() -> PathBuf {
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
}

/// The workspace's settings, with a backend chosen on the command line. A name that is
/// nearly a setting gets a warning.
pub fn settings(root: &Path, backend: Option<BackendKind>) -> anyhow::Result<pgharness::Settings> {
    let mut settings = pgharness::Settings::load_from(root, std::env::vars())?;
    for (name, meant) in &settings.near_misses {
        eprintln!(
            "pgharness: warning: {name} is not a pgharness setting and is ignored; did you mean {meant}?"
        );
    }
    if let Some(backend) = backend {
        settings.backend = backend;
    }
    Ok(settings)
}

/// Parses `--backend`.
pub fn parse_backend(text: &str) -> Result<BackendKind, String> {
    text.parse()
}

/// The logging a command-line program of pgharness sets up: `tracing` to stderr, filtered
/// by `variable` (the program's own), else `RUST_LOG`, else warnings only.
pub fn init_logging(variable: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env(variable)
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
}

/// Runs `future` on a multi-threaded runtime; prints an error (each cause once) and
/// returns the exit code.
pub fn block_on(future: impl Future<Output = anyhow::Result<ExitCode>>) -> ExitCode {
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
    match runtime.block_on(future) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {}", pgharness_runner::render(error.as_ref()));
            ExitCode::FAILURE
        }
    }
}
