//! `reap`: drops schemas of finished or dead runs on every running server of this
//! workspace, and removes pgharness containers past their deadline.

use std::time::Duration;

use pgharness::ledger::{self, ReapScope};
use pgharness::{BackendKind, Settings};

use crate::error::Result;
use crate::servers;

/// What `reap` did on one server.
#[derive(Clone, Debug)]
pub struct Reaped {
    /// The backend.
    pub kind: BackendKind,
    /// Schemas dropped.
    pub dropped: Vec<String>,
    /// Schemas returned to the pool.
    pub recycled: usize,
    /// Schemas still owned by a live test.
    pub skipped: u64,
}

/// Reaps kept and abandoned schemas older than `ttl` (and those of runs without a live
/// test for `run_grace`) on the url server and every running local one; then expired
/// containers. Returns what it did per server and the containers it removed.
pub async fn reap(
    settings: &Settings,
    ttl: Duration,
    run_grace: Duration,
) -> Result<(Vec<Reaped>, Vec<String>)> {
    let scope = ReapScope::Stale { ttl, run_grace };
    let mut kinds = Vec::new();
    if settings.url.is_some() {
        kinds.push(BackendKind::Url);
    }
    kinds.extend(servers::running_local(settings).await);
    let mut reaped = Vec::new();
    for kind in kinds {
        let mut settings = settings.clone();
        settings.backend = kind;
        let server = pgharness::backend::ensure(&settings, &pgharness::events::log_only).await?;
        let client = servers::admin_client(&server).await?;
        let ns = ledger::Namespace::of(&server.config());
        let report = ledger::reap(&client, &ns, &scope).await?;
        reaped.push(Reaped {
            kind,
            dropped: report.dropped,
            recycled: report.recycled.len(),
            skipped: report.skipped,
        });
    }
    #[allow(unused_mut)]
    let mut removed = Vec::new();
    #[cfg(feature = "container")]
    if pgharness::backend::container::docker().await.is_ok() {
        removed = pgharness::backend::container::reap_expired().await?;
    }
    Ok((reaped, removed))
}
