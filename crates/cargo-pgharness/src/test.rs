//! `cargo pgharness test`: arguments → [`pgharness_runner::TestRun`], events → the terminal.

use std::path::Path;
use std::process::ExitCode;

use pgharness::BackendKind;

use crate::render::Renderer;

/// `test`'s arguments.
#[derive(clap::Args, Clone)]
pub struct Test {
    /// auto (default), container, native, url or rds.
    #[arg(long, value_parser = crate::parse_backend)]
    pub backend: Option<BackendKind>,
    /// Leave the server running afterwards (it is stopped only if this run started it).
    #[arg(long)]
    pub keep_server: bool,
    /// With `--backend rds`: the emulated AWS path (fake-aws in front of a local Postgres).
    #[arg(long)]
    pub emulated: bool,
    #[command(flatten)]
    pub emulator: crate::EmulatorArgs,
    /// Arguments for `cargo nextest run` (default: --workspace), e.g. `-p my-app`.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub nextest_args: Vec<String>,
}

impl Test {
    /// Runs the tests of the workspace at `root`; the exit code is nextest's.
    pub async fn run(self, root: &Path) -> anyhow::Result<ExitCode> {
        let settings = crate::settings(root, self.backend)?;
        // The kept-schema lines print psql commands.
        crate::prereq::install_missing(&[crate::prereq::PSQL], root)?;
        let run = pgharness_runner::TestRun {
            settings,
            keep_server: self.keep_server,
            emulated: self.emulated,
            emulator: self.emulator.options(),
            nextest_args: self.nextest_args,
        };
        let renderer = Renderer::new();
        Ok(run.run(&|event| renderer.event(event)).await?)
    }
}
