//! `cargo pgharness reap`: drops schemas of finished or dead runs on every running server
//! of this workspace, and removes pgharness containers past their deadline.

use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use pgharness::parse_duration;

use crate::render::say;

/// `reap`'s arguments.
#[derive(clap::Args)]
pub struct Reap {
    /// How old kept and abandoned schemas must be (default: the `reap_ttl` setting, 1h).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// How long a run with no live test still counts as live.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    run_grace: Duration,
}

impl Reap {
    pub(crate) async fn run(self, root: &Path) -> anyhow::Result<ExitCode> {
        let settings = crate::settings(root, None)?;
        let ttl = self.ttl.unwrap_or(settings.reap_ttl);
        let (reaped, removed) =
            pgharness_runner::reap::reap(&settings, ttl, self.run_grace).await?;
        for server in reaped {
            say(&format!(
                "{}: dropped {} schema(s), returned {} to the pool, {} still owned",
                server.kind,
                server.dropped.len(),
                server.recycled,
                server.skipped
            ));
            for schema in server.dropped {
                eprintln!("  dropped {schema}");
            }
        }
        for what in removed {
            say(&format!("removed {what}"));
        }
        Ok(ExitCode::SUCCESS)
    }
}
