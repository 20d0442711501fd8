//! `cargo xtask up` and `cargo xtask down`, and the server start shared with `test`.

use std::process::ExitCode;

use anyhow::Context;
use pgharness::backend::rds::EnvFile;
use pgharness::{BackendKind, SecretUrl, Server, Settings};
use tokio_postgres::Client;

use crate::ui::Progress;

/// Starts (or joins) the server; says whether this call started it.
pub(crate) async fn start(settings: &Settings) -> anyhow::Result<(Server, BackendKind, bool)> {
    let progress = Progress::start(&format!(
        "looking for a Postgres server ({} backend)",
        settings.backend
    ));
    let sink = |event| progress.event(event);
    let kind = pgharness::backend::resolve(settings, &sink).await?;
    let mut settings = settings.clone();
    settings.backend = kind;
    let was_running = pgharness::backend::is_running(&settings, kind).await;
    let server = pgharness::backend::ensure(&settings, &sink)
        .await
        .with_context(|| format!("failed to start the {kind} backend"))?;
    if kind == BackendKind::Url {
        // Nothing was started: check that it answers before saying so.
        if let Err(error) = admin_client(&server).await {
            progress.finish(&format!("postgres at {server} does not answer"));
            return Err(error.context("check PGHARNESS_URL (host, port, user, password)"));
        }
    }
    progress.finish(&format!("postgres ready: {server}"));
    Ok((server, kind, !was_running))
}

/// The local servers of this workspace that run now (container, native), never starting one.
pub(crate) async fn running_local(settings: &Settings) -> Vec<BackendKind> {
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
pub(crate) async fn admin_client(server: &Server) -> anyhow::Result<Client> {
    connect_as(server, server.config()).await
}

/// The administrator's connection (`postgres` on the servers pgharness starts), for what
/// only it may do: roles and extensions (the emulated cluster's IAM user).
pub(crate) async fn superuser_client(server: &Server) -> anyhow::Result<Client> {
    connect_as(server, server.admin_config()).await
}

async fn connect_as(server: &Server, config: tokio_postgres::Config) -> anyhow::Result<Client> {
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .with_context(|| format!("failed to connect to {}", server.describe()))?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "admin connection ended");
        }
    });
    Ok(client)
}

#[derive(clap::Args)]
pub(crate) struct Up {
    /// Which backend to start (auto, container, native, url, rds).
    #[arg(long, value_parser = crate::parse_backend)]
    backend: Option<BackendKind>,
    /// With `--backend rds`: against the emulator (fake-aws), started if needed.
    #[arg(long)]
    emulated: bool,
    #[command(flatten)]
    emulator: crate::emulator::EmulatorOptions,
}

impl Up {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        let settings = crate::settings(self.backend)?;
        if settings.backend == BackendKind::Rds {
            crate::rds::up(&settings, self.emulated, &self.emulator).await?;
            let path = pgharness::backend::rds::env_file_path(&settings);
            println!("PGHARNESS_BACKEND=rds");
            eprintln!(
                "xtask: tests pick up {} by themselves; psql: PGSERVICEFILE={} PGSERVICE=pgharness psql; stop with `cargo xtask down`",
                path.display(),
                pgharness::backend::rds::service_file_path(&settings).display()
            );
            return Ok(ExitCode::SUCCESS);
        }
        let (server, kind, _) = start(&settings).await?;
        let path = pgharness::backend::rds::env_file_path(&settings);
        // The full URL (with the server's password) goes only into the 0600 env file; the
        // terminal gets the way to use it.
        let url = server.url().expose().to_owned();
        EnvFile {
            backend: kind.to_string(),
            url: Some(SecretUrl::new(url.clone())),
            ..EnvFile::default()
        }
        .write(&settings)?;
        // Ready schemas for the first tests, as `cargo xtask test`'s warmer keeps them.
        let target = std::thread::available_parallelism().map_or(2, |n| n.get() as u64) + 1;
        let admin = admin_client(&server).await?;
        if !settings.migrations.is_dir() {
            eprintln!(
                "xtask: no migrations at {}: the schema pool is filled by the tests themselves",
                settings.migrations.display()
            );
        } else {
            let progress = Progress::start("filling the schema pool");
            let ns = pgharness::ledger::Namespace::of(&server.config());
            let warmed =
                pgharness::pool::Warmer::new(&settings.migrations, settings.migrations_layout)
                    .map(|warmer| warmer.extra_search_path(&settings.extra_search_path))?
                    .warm(&admin, &ns, target, target)
                    .await
                    .with_context(|| {
                        format!(
                            "failed to fill the schema pool with {}",
                            settings.migrations.display()
                        )
                    })?;
            progress.finish(&format!(
                "schema pool: {} ready ({} created now)",
                warmed.ready_before + warmed.created,
                warmed.created
            ));
        }
        println!("PGHARNESS_BACKEND={kind}");
        eprintln!(
            "xtask: wrote {} (DATABASE_URL, with the server's password; mode 0600); psql: PGSERVICEFILE={} PGSERVICE=pgharness psql; stop with `cargo xtask down`",
            path.display(),
            pgharness::backend::rds::service_file_path(&settings).display()
        );
        Ok(ExitCode::SUCCESS)
    }
}

#[derive(clap::Args)]
pub(crate) struct Down {}

impl Down {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        let settings = crate::settings(None)?;
        let stopped = stop_all(&settings).await?;
        if stopped.is_empty() {
            eprintln!("xtask: nothing was running");
        }
        for what in stopped {
            eprintln!("xtask: stopped {what}");
        }
        let _ = std::fs::remove_file(pgharness::backend::rds::env_file_path(&settings));
        Ok(ExitCode::SUCCESS)
    }
}

/// Stops the container and native servers of this workspace, whichever run.
pub(crate) async fn stop_all(settings: &Settings) -> anyhow::Result<Vec<String>> {
    let mut stopped = Vec::new();
    stopped.extend(crate::rds::down(settings).await?);
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
    stopped.extend(pgharness::backend::stop(settings, BackendKind::Native).await?);
    if pgharness::backend::container::docker().await.is_ok() {
        stopped.extend(pgharness::backend::stop(settings, BackendKind::Container).await?);
    }
    Ok(stopped)
}
