//! The janitor of a run: recycles the run's finished schemas off the tests' critical path
//! and keeps the schema pool filled, on one connection of its own.

use std::sync::Arc;
use std::time::Duration;

use pgharness::ledger::{self, ReapScope};

/// The janitor of a run: recycles the run's finished schemas off the tests' critical path
/// and keeps the pool of the default migration set at `target` ready schemas, all on its
/// one connection. It stops between passes ([`Janitor::stop`]), never in the middle of
/// one: a pass cut short could leave an owner lock held by the admin session.
pub struct Janitor {
    stop: Arc<tokio::sync::Notify>,
    task: tokio::task::JoinHandle<()>,
}

impl Janitor {
    /// Starts the janitor of run `run_id` on `admin`, warming the pool of `settings`'
    /// migrations (none when the directory does not exist: the tests fill it themselves).
    pub fn spawn(
        admin: Arc<tokio_postgres::Client>,
        ns: ledger::Namespace,
        run_id: String,
        settings: &pgharness::Settings,
        target: u64,
    ) -> Janitor {
        let stop = Arc::new(tokio::sync::Notify::new());
        let stopped = stop.clone();
        let scope = ReapScope::FinishedInRun(run_id);
        // Without a migrations directory the tests fill the pool by themselves.
        let warmer = if settings.migrations.is_dir() {
            pgharness::pool::Warmer::for_settings(settings)
                .inspect_err(|error| tracing::warn!(%error, "the schema pool will not be warmed"))
                .ok()
        } else {
            None
        };
        let task = tokio::spawn(async move {
            let mut warnings = Warnings::default();
            loop {
                if admin.is_closed() {
                    tracing::warn!(
                        "the janitor's connection closed; finished schemas wait for the next run's reaper"
                    );
                    return;
                }
                let mut failed = false;
                let recycled = match ledger::reap(&admin, &ns, &scope).await {
                    Ok(report) => report.recycled.len() + report.dropped.len(),
                    Err(_) if admin.is_closed() => continue,
                    Err(error) => {
                        failed = true;
                        warnings.warn("janitor pass failed", &error);
                        0
                    }
                };
                // One schema per pass, so that finished schemas never wait long.
                let created = match &warmer {
                    Some(warmer) => match warmer.warm(&admin, &ns, target, 1).await {
                        Ok(warmed) => warmed.created,
                        Err(_) if admin.is_closed() => continue,
                        Err(error) => {
                            failed = true;
                            warnings.warn("warming the schema pool failed", &error);
                            0
                        }
                    },
                    None => 0,
                };
                // Tests finish every few milliseconds: go again at once after work, and
                // otherwise look again soon (a look is one query). After a failure, wait a
                // second: the same failure would come back at once.
                let pause = if failed {
                    Duration::from_secs(1)
                } else if created > 0 || recycled > 0 {
                    Duration::ZERO
                } else {
                    Duration::from_millis(10)
                };
                tokio::select! {
                    _ = stopped.notified() => return,
                    _ = tokio::time::sleep(pause) => {}
                }
            }
        });
        Janitor { stop, task }
    }

    /// Stops after the pass under way.
    pub async fn stop(self) {
        self.stop.notify_one();
        let _ = self.task.await;
    }
}

/// Fills the pool of `settings`' migrations up to `target` ready schemas on up to
/// `connections` connections of its own at once, before a run's first test: through a link
/// with latency each schema costs round trips that the janitor's one connection would pay in
/// turn. Counts first on `admin`, so that a pool already full opens no connection. Returns
/// how many are ready (`None` without migrations to warm).
pub async fn prefill(
    server: &pgharness::Server,
    admin: &tokio_postgres::Client,
    settings: &pgharness::Settings,
    target: u64,
    connections: u64,
) -> crate::Result<Option<u64>> {
    if !settings.migrations.is_dir() {
        return Ok(None);
    }
    let warmer = pgharness::pool::Warmer::for_settings(settings)?;
    let ns = ledger::Namespace::of(&server.config());
    let ready = warmer.warm(admin, &ns, target, 0).await?.ready_before;
    let missing = target.saturating_sub(ready);
    if missing == 0 {
        return Ok(Some(ready));
    }
    let connections = connections.clamp(1, missing);
    let share = missing.div_ceil(connections);
    let fills = (0..connections).map(|_| async {
        let client = crate::servers::admin_client(server).await?;
        Ok::<_, crate::Error>(warmer.warm(&client, &ns, target, share).await?.created)
    });
    let created = futures_util::future::try_join_all(fills).await?;
    Ok(Some(ready + created.iter().sum::<u64>()))
}

/// The janitor's warnings, rate-limited: a failure that repeats (a migration that does not
/// apply, a server gone) is logged once, then once a minute with how often it came back.
#[derive(Default)]
struct Warnings {
    last: Option<(String, std::time::Instant, u64)>,
}

impl Warnings {
    fn warn(&mut self, what: &str, error: &dyn std::fmt::Display) {
        let text = format!("{what}: {error}");
        match &mut self.last {
            Some((last, at, repeats)) if *last == text => {
                *repeats += 1;
                if at.elapsed() >= Duration::from_secs(60) {
                    tracing::warn!(repeats = *repeats, "{text} (again)");
                    *at = std::time::Instant::now();
                    *repeats = 0;
                }
            }
            _ => {
                tracing::warn!("{text}");
                self.last = Some((text, std::time::Instant::now(), 0));
            }
        }
    }
}
