//! The local server of a run: start or join it (building a missing image first when that is
//! all that is missing), the runner's own connections, the pool filled for `up`, and
//! stopping everything this workspace started.

use pgharness::backend::rds::EnvFile;
use pgharness::{BackendKind, SecretUrl, Server, Settings};
use tokio_postgres::Client;

use crate::error::{Action, Result};
use crate::events::{Reporter, RunEvent};

/// Starts (or joins) the server; says whether this call started it.
pub async fn start(
    settings: &Settings,
    report: Reporter<'_>,
) -> Result<(Server, BackendKind, bool)> {
    report(RunEvent::StepStarted(format!(
        "looking for a Postgres server ({} backend)",
        settings.backend
    )));
    let sink = |event| report(RunEvent::Step(event));
    let kind = pgharness::backend::resolve(settings, &sink).await?;
    let mut settings = settings.clone();
    settings.backend = kind;
    let was_running = pgharness::backend::is_running(&settings, kind).await;
    let server = pgharness::backend::ensure(&settings, &sink).await?;
    if kind == BackendKind::Url {
        // Nothing was started: check that it answers before saying so.
        if let Err(error) = admin_client(&server).await {
            report(RunEvent::StepFinished(format!(
                "postgres at {server} does not answer"
            )));
            return Err(crate::Error::Rds(format!(
                "{error}; check PGHARNESS_URL (host, port, user, password)"
            )));
        }
    }
    report(RunEvent::StepFinished(format!("postgres ready: {server}")));
    Ok((server, kind, !was_running))
}

/// Starts the backend; when the only thing missing is a Postgres image that cannot be
/// pulled, builds one from Debian packages (once) and tries again.
pub async fn start_or_build(
    settings: &Settings,
    report: Reporter<'_>,
) -> Result<(Server, BackendKind, bool)> {
    match start(settings, report).await {
        Ok(started) => Ok(started),
        #[cfg(feature = "container")]
        Err(error) if crate::image::worth_building(settings).await => {
            let tag = pgharness::backend::container::LOCAL_IMAGE;
            report(RunEvent::BuildingImage {
                tag: tag.to_owned(),
                because: error.to_string(),
            });
            crate::image::build(tag, report).await?;
            start(settings, report).await
        }
        Err(error) => Err(error),
    }
}

/// The local servers of this workspace that run now (container, native), never starting one.
pub async fn running_local(settings: &Settings) -> Vec<BackendKind> {
    let mut running = Vec::new();
    for kind in [BackendKind::Container, BackendKind::Native] {
        let mut settings = settings.clone();
        settings.backend = kind;
        if pgharness::backend::is_running(&settings, kind).await {
            running.push(kind);
        }
    }
    running
}

/// The runner's connection to the server, driven in the background: as the tests' role
/// (`Server::config`), whose ledger, pool and schemas the runner keeps — never the
/// administrator, whose schemas the tests could not claim.
pub async fn admin_client(server: &Server) -> Result<Client> {
    connect_as(server, server.config()).await
}

/// The administrator's connection (`postgres` on the servers pgharness starts), for what
/// only it may do: roles and extensions (the emulated cluster's IAM user).
pub async fn superuser_client(server: &Server) -> Result<Client> {
    connect_as(server, server.admin_config()).await
}

async fn connect_as(server: &Server, config: tokio_postgres::Config) -> Result<Client> {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .action(|| format!("failed to connect to {}", server.describe()))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "admin connection ended");
        }
    });
    Ok(client)
}

/// What `up` left ready on a local server.
#[derive(Clone, Debug)]
pub struct Up {
    /// The backend that runs.
    pub kind: BackendKind,
    /// The server.
    pub server: String,
    /// Ready schemas in the pool now, when there are migrations to warm it with.
    pub ready: Option<u64>,
}

/// `up` on a local backend: starts (or joins) the server, writes the 0600 env file with its
/// URL (the only place the password goes) and fills the schema pool for the first tests,
/// as `test`'s warmer keeps it.
pub async fn up_local(settings: &Settings, report: Reporter<'_>) -> Result<Up> {
    let (server, kind, _) = start_or_build(settings, report).await?;
    EnvFile {
        backend: kind.to_string(),
        url: Some(SecretUrl::new(server.url().expose().to_owned())),
        ..EnvFile::default()
    }
    .write(settings)?;
    let target = std::thread::available_parallelism().map_or(2, |n| n.get() as u64) + 1;
    let admin = admin_client(&server).await?;
    let ready = if !settings.migrations.is_dir() {
        report(RunEvent::Warning(format!(
            "no migrations at {}: the schema pool is filled by the tests themselves",
            settings.migrations.display()
        )));
        None
    } else {
        report(RunEvent::StepStarted("filling the schema pool".into()));
        let ns = pgharness::ledger::Namespace::of(&server.config());
        let warmed = pgharness::pool::Warmer::for_settings(settings)?
            .warm(&admin, &ns, target, target)
            .await?;
        report(RunEvent::StepFinished(format!(
            "schema pool: {} ready ({} created now)",
            warmed.ready_before + warmed.created,
            warmed.created
        )));
        Some(warmed.ready_before + warmed.created)
    };
    Ok(Up {
        kind,
        server: server.describe(),
        ready,
    })
}

/// Stops everything this workspace started (the RDS proxy, the emulator, the native server,
/// the container), whichever runs; returns what it stopped.
pub async fn stop_all(settings: &Settings, report: Reporter<'_>) -> Result<Vec<String>> {
    let mut stopped = Vec::new();
    #[cfg(feature = "rds")]
    {
        stopped.extend(crate::rds::down(settings, report).await?);
        if let Some(values) = crate::emulator::running(settings)
            && let Ok(stats) = crate::emulator::stats(&values)
        {
            stopped.push(format!(
                "(fake-aws: {} StartSession call(s), {} session(s) open)",
                stats.start_session_calls,
                stats.open.len()
            ));
        }
        stopped.extend(crate::emulator::stop(settings).await?);
    }
    #[cfg(not(feature = "rds"))]
    let _ = report;
    stopped.extend(pgharness::backend::stop(settings, BackendKind::Native).await?);
    #[cfg(feature = "container")]
    if pgharness::backend::container::docker().await.is_ok() {
        stopped.extend(pgharness::backend::stop(settings, BackendKind::Container).await?);
    }
    let _ = std::fs::remove_file(pgharness::backend::rds::env_file_path(settings));
    Ok(stopped)
}
