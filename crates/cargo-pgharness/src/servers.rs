//! `cargo pgharness up` and `down`.

use std::path::Path;
use std::process::ExitCode;

use pgharness::BackendKind;

use crate::render::{Renderer, say};

/// `up`'s arguments.
#[derive(clap::Args)]
pub struct Up {
    /// Which backend to start (auto, container, native, url, rds).
    #[arg(long, value_parser = crate::parse_backend)]
    backend: Option<BackendKind>,
    /// With `--backend rds`: against the emulator (fake-aws), started if needed.
    #[arg(long)]
    emulated: bool,
    #[command(flatten)]
    emulator: crate::EmulatorArgs,
}

impl Up {
    pub(crate) async fn run(self, root: &Path) -> anyhow::Result<ExitCode> {
        let settings = crate::settings(root, self.backend)?;
        let renderer = Renderer::new();
        let report = |event| renderer.event(event);
        let service = pgharness::backend::rds::service_file_path(&settings);
        if settings.backend == BackendKind::Rds {
            return self.up_rds(&settings, &report).await;
        }
        let up = pgharness_runner::servers::up_local(&settings, &report).await?;
        println!("PGHARNESS_BACKEND={}", up.kind);
        // The full URL (with the server's password) went only into the 0600 env file; the
        // terminal gets the way to use it.
        say(&format!(
            "wrote {} (DATABASE_URL, with the server's password; mode 0600); psql: PGSERVICEFILE={} PGSERVICE=pgharness psql; stop with `cargo pgharness down`",
            pgharness::backend::rds::env_file_path(&settings).display(),
            service.display()
        ));
        Ok(ExitCode::SUCCESS)
    }

    #[cfg(feature = "rds")]
    async fn up_rds(
        &self,
        settings: &pgharness::Settings,
        report: pgharness_runner::Reporter<'_>,
    ) -> anyhow::Result<ExitCode> {
        pgharness_runner::rds::up(
            settings,
            self.emulated,
            &self.emulator.options(),
            false,
            report,
        )
        .await?;
        println!("PGHARNESS_BACKEND=rds");
        say(&format!(
            "tests pick up {} by themselves; psql: PGSERVICEFILE={} PGSERVICE=pgharness psql; stop with `cargo pgharness down`",
            pgharness::backend::rds::env_file_path(settings).display(),
            pgharness::backend::rds::service_file_path(settings).display()
        ));
        Ok(ExitCode::SUCCESS)
    }

    #[cfg(not(feature = "rds"))]
    async fn up_rds(
        &self,
        _settings: &pgharness::Settings,
        _report: pgharness_runner::Reporter<'_>,
    ) -> anyhow::Result<ExitCode> {
        anyhow::bail!(
            "this cargo-pgharness was built without the `rds` feature; reinstall it with `--features rds`"
        )
    }
}

/// `down`'s arguments.
#[derive(clap::Args)]
pub struct Down {}

impl Down {
    pub(crate) async fn run(self, root: &Path) -> anyhow::Result<ExitCode> {
        let settings = crate::settings(root, None)?;
        let renderer = Renderer::new();
        let stopped =
            pgharness_runner::servers::stop_all(&settings, &|event| renderer.event(event)).await?;
        if stopped.is_empty() {
            say("nothing was running");
        }
        for what in stopped {
            say(&format!("stopped {what}"));
        }
        Ok(ExitCode::SUCCESS)
    }
}
