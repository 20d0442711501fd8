//! `cargo xtask`: this repository's developer tasks. It mounts `cargo pgharness`'s commands
//! (`test`, `up`, `down`, `reap`, `image`, `emulate`, `doctor`, `rds`) as any team's xtask
//! would, and adds its own: `ci`, `bench`, `fuzz`.

mod bench;
mod ci;
mod fuzz;
mod outside;
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
    Ci(ci::Ci),
    /// A bounded cargo-fuzz run of the SSM protocol decoders.
    Fuzz(fuzz::Fuzz),
    /// Measure acquire latency, token minting and tunnel throughput; prints figures and targets.
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
pub(crate) fn report(event: pgharness_runner::RunEvent) {
    static RENDERER: cargo_pgharness::render::Renderer = cargo_pgharness::render::Renderer::new();
    RENDERER.event(event);
}

/// Settings for this workspace, with a backend chosen on the command line.
pub(crate) fn settings(backend: Option<BackendKind>) -> anyhow::Result<pgharness::Settings> {
    cargo_pgharness::settings(&project_root(), backend)
}

fn main() -> ExitCode {
    cargo_pgharness::init_logging("XTASK_LOG");
    let cli = Cli::parse();
    cargo_pgharness::block_on(async {
        match cli.command {
            Command::Pgharness(command) => command.run(&project_root()).await,
            Command::Ci(command) => command.run().await,
            Command::Fuzz(command) => command.run().await,
            Command::Bench(command) => command.run().await,
        }
    })
}
