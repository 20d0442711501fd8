//! `cargo pgharness emulate`: fake-aws in the background, in front of a local Postgres.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use pgharness::BackendKind;

/// Options of the emulated cluster.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct EmulatorArgs {
    /// Round-trip time to emulate on the SSM data channel (e.g. 30ms).
    #[arg(long, value_parser = pgharness::parse_duration)]
    pub rtt: Option<Duration>,
    /// Loss, duplication and reordering probability on the data channel (e.g. 0.05).
    #[arg(long)]
    pub faults: Option<f64>,
    /// Where the emulated cluster's data lives: auto, container or native.
    #[arg(long = "local-backend", value_parser = crate::parse_backend)]
    pub local_backend: Option<BackendKind>,
}

impl EmulatorArgs {
    /// The runner's options.
    pub fn options(&self) -> pgharness_runner::EmulatorOptions {
        pgharness_runner::EmulatorOptions {
            rtt: self.rtt,
            faults: self.faults,
            local_backend: self.local_backend,
        }
    }
}

/// `emulate`'s arguments.
#[derive(clap::Args)]
pub struct Emulate {
    #[command(flatten)]
    options: EmulatorArgs,
    /// Stop the emulator instead.
    #[arg(long)]
    stop: bool,
}

impl Emulate {
    #[cfg(not(feature = "rds"))]
    pub(crate) async fn run(self, _root: &Path) -> anyhow::Result<ExitCode> {
        anyhow::bail!(
            "this cargo-pgharness was built without the `rds` feature; reinstall it with `--features rds`"
        )
    }

    #[cfg(feature = "rds")]
    pub(crate) async fn run(self, root: &Path) -> anyhow::Result<ExitCode> {
        use pgharness_runner::emulator;
        let settings = crate::settings(root, None)?;
        if self.stop {
            match emulator::stop(&settings).await? {
                Some(what) => crate::render::say(&format!("stopped {what}")),
                None => crate::render::say("the emulator was not running"),
            }
            return Ok(ExitCode::SUCCESS);
        }
        let renderer = crate::render::Renderer::new();
        let (values, _) = emulator::ensure(&settings, &self.options.options(), &|event| {
            renderer.event(event)
        })
        .await?;
        for (key, value) in emulator::client_env(&values) {
            if !key.starts_with("AWS_SECRET") && !key.starts_with("AWS_SESSION") {
                println!("{key}={value}");
            }
        }
        crate::render::say(
            "the emulator runs in the background; `cargo pgharness up --backend rds --emulated` uses it, `cargo pgharness emulate --stop` stops it",
        );
        Ok(ExitCode::SUCCESS)
    }
}
