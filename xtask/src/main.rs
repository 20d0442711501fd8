//! `cargo xtask`: this repository's developer tasks. It mounts `cargo pgharness`'s commands
//! (`test`, `up`, `down`, `reap`, `image`, `emulate`, `doctor`, `rds`) as any team's xtask
//! would, and adds its own: `ci`, `bench`, `fuzz`.

#[cfg(feature = "rds")]
mod bench;
#[cfg(feature = "rds")]
mod ci;
mod fuzz;
#[cfg(feature = "rds")]
mod outside;
#[cfg(feature = "rds")]
mod pip;
#[cfg(test)]
mod tidy;

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
    #[command(flatten)]
    Pgharness(cargo_pgharness::Command),
    /// Everything CI checks: formatting, lints, the tests on the container and native backends, a bounded fuzz run.
    #[cfg(feature = "rds")]
    Ci(ci::Ci),
    /// A bounded cargo-fuzz run of the SSM protocol decoders.
    Fuzz(fuzz::Fuzz),
    /// Measure acquire latency, token minting and tunnel throughput; prints figures and targets.
    #[cfg(feature = "rds")]
    Bench(bench::Bench),
}

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
        cargo_pgharness::workspace_root()
    })
    .clone()
}

/// Shows a run's events as `cargo pgharness` does.
#[cfg(feature = "rds")]
pub(crate) fn report(event: pgharness_runner::RunEvent) {
    static RENDERER: cargo_pgharness::render::Renderer = cargo_pgharness::render::Renderer::new();
    RENDERER.event(event);
}

/// Settings for this workspace, with a backend chosen on the command line.
#[cfg(feature = "rds")]
pub(crate) fn settings(backend: Option<BackendKind>) -> anyhow::Result<pgharness::Settings> {
    cargo_pgharness::settings(&project_root(), backend)
}

/// Whether the command on this command line needs the `rds` feature: `ci`, `bench`,
/// `emulate` and the hidden background commands, or the rds backend (by `--backend`, by
/// the workspace's settings, or because an RDS proxy or the emulator of this workspace
/// runs, which `down` and `reap` must reach).
#[cfg(not(feature = "rds"))]
fn needs_rds(args: &[String]) -> bool {
    let command = args.get(1).map(String::as_str).unwrap_or_default();
    if ["ci", "bench", "emulate", "__rds-proxy", "__fake-aws"].contains(&command) {
        return true;
    }
    let backend_rds = args
        .windows(2)
        .any(|pair| pair[0] == "--backend" && pair[1] == "rds")
        || args.iter().any(|arg| arg == "--backend=rds");
    // Loaded quietly: the command itself warns of near-miss names once.
    let settings = pgharness::Settings::load_from(&project_root(), std::env::vars()).ok();
    let state_dir = settings.as_ref().map(|s| s.state_dir.clone());
    let rds_running = state_dir.is_some_and(|dir| {
        dir.join("emulator.process").exists()
            || std::fs::read_to_string(dir.join("env"))
                .is_ok_and(|text| text.contains("PGHARNESS_BACKEND=rds"))
    });
    let explicit_backend = args.iter().any(|arg| arg.starts_with("--backend"));
    let settings_rds = !explicit_backend
        && settings.is_some_and(|settings| settings.backend == BackendKind::Rds)
        && ["test", "up", "doctor"].contains(&command);
    backend_rds || settings_rds || (rds_running && ["down", "reap", "up"].contains(&command))
}

/// Runs this command line in xtask built with the `rds` feature (built first, once).
#[cfg(not(feature = "rds"))]
fn with_rds(args: &[String]) -> ExitCode {
    use std::os::unix::process::CommandExt;
    let error =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(project_root())
            .args([
                "run",
                "--package",
                "xtask",
                "--quiet",
                "--features",
                "rds",
                "--",
            ])
            .args(&args[1..])
            .exec();
    eprintln!("error: failed to run xtask with the rds feature: {error}");
    ExitCode::FAILURE
}

fn main() -> ExitCode {
    #[cfg(not(feature = "rds"))]
    {
        let args: Vec<String> = std::env::args().collect();
        if needs_rds(&args) {
            return with_rds(&args);
        }
    }
    cargo_pgharness::init_logging("XTASK_LOG");
    let cli = Cli::parse();
    cargo_pgharness::block_on(async {
        match cli.command {
            Command::Pgharness(command) => command.run(&project_root()).await,
            #[cfg(feature = "rds")]
            Command::Ci(command) => command.run().await,
            Command::Fuzz(command) => command.run().await,
            #[cfg(feature = "rds")]
            Command::Bench(command) => command.run().await,
        }
    })
}
