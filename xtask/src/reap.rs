//! `cargo xtask reap`: drops schemas of finished or dead runs on every running server of
//! this workspace, and removes pgharness containers past their deadline.

use std::process::ExitCode;
use std::time::Duration;

use pgharness::ledger::{self, ReapScope};
use pgharness::{BackendKind, parse_duration};

use crate::servers;

#[derive(clap::Args)]
pub(crate) struct Reap {
    /// How old kept and abandoned schemas must be (default: the `reap_ttl` setting, 1h).
    #[arg(long, value_parser = parse_duration)]
    ttl: Option<Duration>,
    /// How long a run with no live test still counts as live.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    run_grace: Duration,
}

impl Reap {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        let settings = crate::settings(None)?;
        let scope = ReapScope::Stale {
            ttl: self.ttl.unwrap_or(settings.reap_ttl),
            run_grace: self.run_grace,
        };
        let mut kinds = Vec::new();
        if settings.url.is_some() {
            kinds.push(BackendKind::Url);
        }
        kinds.extend(servers::running_local(&settings).await);
        for kind in kinds {
            let mut settings = settings.clone();
            settings.backend = kind;
            let server =
                pgharness::backend::ensure(&settings, &pgharness::events::log_only).await?;
            let client = servers::admin_client(&server).await?;
            let ns = ledger::Namespace::of(&server.config());
            let report = ledger::reap(&client, &ns, &scope).await?;
            eprintln!(
                "xtask: {kind}: dropped {} schema(s), returned {} to the pool, {} still owned",
                report.dropped.len(),
                report.recycled.len(),
                report.skipped
            );
            for schema in report.dropped {
                eprintln!("  dropped {schema}");
            }
        }
        if pgharness::backend::container::docker().await.is_ok() {
            for what in pgharness::backend::container::reap_expired().await? {
                eprintln!("xtask: removed {what}");
            }
        }
        Ok(ExitCode::SUCCESS)
    }
}
