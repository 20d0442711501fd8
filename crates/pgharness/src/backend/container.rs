//! The `container` backend: one Postgres container per workspace, image and password, shared
//! by every test process, started with testcontainers as a reusable container
//! (`ReuseDirective::Always`: a request finds the running container by its name and labels,
//! and dropping the handle leaves it running). Data lives on tmpfs, fsync is off, and the
//! port is published on 127.0.0.1 only.
//!
//! Kept as thin code around testcontainers, for what it does not do:
//! - a password per container: a starter that finds no running container makes a new
//!   workspace password under `target/pgharness/container.lock`, and the container's name
//!   derives from it, so the others, after the lock, find that container running and join;
//! - the create race (another workspace process outside the lock, an older version): the
//!   losers' 409 (or a 304 from starting the winner's container) is retried, and the
//!   retry's lookup joins the winner;
//! - the deadline reaper and `down` (`reap_expired`, `stop`): listing and removing
//!   containers by label, through the bollard client testcontainers re-exports;
//! - picking the image (`postgres:17` if present or pullable, else the locally built one)
//!   and the Docker probe with its actionable errors.
//!
//! testcontainers passes bollard's default API version, and released bollard puts no
//! version prefix on the wire, so this works on Docker Engine 20.10 (API 1.41); CI runs the
//! container leg on such an engine because an unreleased bollard change would add it.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use sha2::{Digest, Sha256};
use testcontainers::bollard::Docker;
use testcontainers::bollard::models::{HostConfig, PortBinding};
use testcontainers::bollard::query_parameters::{
    CreateImageOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
};
use testcontainers::core::IntoContainerPort;
use testcontainers::runners::AsyncRunner;
use testcontainers::{
    ContainerRequest, GenericImage, ImageExt, ReuseDirective, TestcontainersError,
};

use super::secret;
use crate::connect;
use crate::error::Error;
use crate::events::{Event, EventSink, emit};
use crate::server::Server;
use crate::settings::{BackendKind, Settings};

/// The image used when `PGHARNESS_IMAGE` is not set.
pub const DEFAULT_IMAGE: &str = "postgres:17";
/// The image `cargo pgharness image` builds from Debian packages when no registry is reachable.
pub const LOCAL_IMAGE: &str = "pgharness/postgres:17-2";

/// Label on every container pgharness creates.
pub const LABEL_MANAGED: &str = "dev.pgharness.managed";
/// Label: the Unix time after which `cargo pgharness reap` may remove the container (set by
/// containers of earlier pgharness versions; read by the reaper).
pub const LABEL_DEADLINE: &str = "dev.pgharness.deadline";
/// Label: seconds after its creation when `cargo pgharness reap` may remove the container.
/// (A creation-relative label, not a deadline, because testcontainers finds a reusable
/// container by all of its labels: every process must ask for the same ones.)
pub const LABEL_TTL: &str = "dev.pgharness.ttl";
/// Label: the workspace root the container serves.
pub const LABEL_ROOT: &str = "dev.pgharness.root";
/// Label: a fingerprint of the password the container was made with, so that a workspace
/// that lost its password (`target/` cleaned) finds the old container stale.
pub const LABEL_CREDENTIALS: &str = "dev.pgharness.credentials";

const PGDATA: &str = "/var/lib/postgresql/data";

fn backend_error(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: "container",
        message: message.into(),
    }
}

/// Runs Docker calls with logging off: bollard logs request bodies and decoded responses at
/// DEBUG, and the container's environment carries the server's password.
async fn quiet<F: std::future::Future>(future: F) -> F::Output {
    use tracing::instrument::WithSubscriber;
    future
        .with_subscriber(tracing::subscriber::NoSubscriber::default())
        .await
}

/// Connects to the Docker daemon (`DOCKER_HOST` or the default socket) and agrees on an
/// API version both sides speak.
pub async fn docker() -> Result<Docker, Error> {
    let docker = Docker::connect_with_defaults().map_err(|e| {
        backend_error(format!(
            "cannot reach Docker: {e} (start the Docker daemon, or set DOCKER_HOST)"
        ))
    })?;
    let negotiated = tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version()).await;
    match negotiated {
        Ok(Ok(docker)) => Ok(docker),
        Ok(Err(e)) => Err(backend_error(format!(
            "Docker did not answer: {e} (start the Docker daemon, or set DOCKER_HOST)"
        ))),
        Err(_) => Err(backend_error(
            "Docker did not answer within 5s (is the daemon running?)",
        )),
    }
}

/// Checks that Docker answers and that a Postgres image is available (pulling if needed).
pub(crate) async fn probe(settings: &Settings) -> Result<String, Error> {
    let docker = docker().await?;
    resolve_image(&docker, settings).await
}

async fn image_present(docker: &Docker, image: &str) -> bool {
    docker.inspect_image(image).await.is_ok()
}

async fn pull(docker: &Docker, image: &str) -> Result<(), String> {
    let (name, tag) = match image.rsplit_once(':') {
        Some((name, tag)) if !tag.contains('/') => (name, tag),
        _ => (image, "latest"),
    };
    let options = CreateImageOptionsBuilder::new()
        .from_image(name)
        .tag(tag)
        .build();
    let mut stream = docker.create_image(Some(options), None, None);
    while let Some(item) = stream.next().await {
        item.map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The image to run: `PGHARNESS_IMAGE` (pulled if absent), else `postgres:17` if present or
/// pullable, else the locally built `pgharness/postgres:17`.
pub async fn resolve_image(docker: &Docker, settings: &Settings) -> Result<String, Error> {
    if let Some(image) = &settings.image {
        if image_present(docker, image).await {
            return Ok(image.clone());
        }
        return match pull(docker, image).await {
            Ok(()) => Ok(image.clone()),
            Err(e) => Err(backend_error(format!(
                "image `{image}` (PGHARNESS_IMAGE) is not present and could not be pulled: {e}"
            ))),
        };
    }
    if image_present(docker, DEFAULT_IMAGE).await {
        return Ok(DEFAULT_IMAGE.to_owned());
    }
    if image_present(docker, LOCAL_IMAGE).await {
        return Ok(LOCAL_IMAGE.to_owned());
    }
    match pull(docker, DEFAULT_IMAGE).await {
        Ok(()) => Ok(DEFAULT_IMAGE.to_owned()),
        Err(e) => Err(backend_error(format!(
            "no Postgres image: `{DEFAULT_IMAGE}` is not present and could not be pulled ({e}); \
             build `{LOCAL_IMAGE}` from Debian packages with `cargo pgharness image`, \
             or set PGHARNESS_IMAGE to an image you have"
        ))),
    }
}

/// The container name for this workspace, image, password and server settings.
pub fn container_name(settings: &Settings, image: &str, password: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(settings.root.to_string_lossy().as_bytes());
    hasher.update([0]);
    hasher.update(image.as_bytes());
    hasher.update([0]);
    hasher.update(settings.max_connections.to_be_bytes());
    hasher.update(settings.container_ttl.as_secs().to_be_bytes());
    hasher.update(credentials(password).as_bytes());
    // Containers of older pgharness versions trusted every local user: never join one.
    hasher.update(b"scram-sha-256");
    format!("pgharness-{}", hex::encode(&hasher.finalize()[..5]))
}

/// A fingerprint of the server password: SHA-256 of 128 random bits reveals nothing usable.
fn credentials(password: &str) -> String {
    hex::encode(&Sha256::digest(password.as_bytes())[..8])
}

/// Whether this workspace's container exists and runs (never pulls or creates anything).
pub async fn is_running(settings: &Settings) -> bool {
    quiet(is_running_unlogged(settings)).await
}

async fn is_running_unlogged(settings: &Settings) -> bool {
    let Ok(docker) = docker().await else {
        return false;
    };
    let Some(password) = secret::existing_password(settings) else {
        return false;
    };
    let candidates = match &settings.image {
        Some(image) => vec![image.clone()],
        None => vec![DEFAULT_IMAGE.to_owned(), LOCAL_IMAGE.to_owned()],
    };
    for image in candidates {
        let name = container_name(settings, &image, &password);
        if let Ok(info) = docker.inspect_container(&name, None).await
            && info.state.and_then(|s| s.running).unwrap_or(false)
        {
            return true;
        }
    }
    false
}

/// Starts the shared container, or joins it if it exists, and waits until Postgres
/// answers `SELECT 1`.
pub async fn ensure(settings: &Settings, sink: EventSink<'_>) -> Result<Server, Error> {
    quiet(ensure_unlogged(settings, sink)).await
}

async fn ensure_unlogged(settings: &Settings, sink: EventSink<'_>) -> Result<Server, Error> {
    let docker = docker().await?;
    let image = resolve_image(&docker, settings).await?;
    // One starter at a time: it joins the container the workspace's password names if that
    // runs, or makes a new password for a new container (each container has its own); the
    // others then find it running.
    std::fs::create_dir_all(&settings.state_dir)
        .map_err(|e| Error::io("failed to create", &settings.state_dir, e))?;
    let lock = super::lock_file(&settings.state_dir.join("container.lock")).await?;
    let running = match secret::existing_password(settings) {
        Some(password) => {
            let name = container_name(settings, &image, &password);
            let info = docker.inspect_container(&name, None).await.ok();
            info.and_then(|i| i.state)
                .and_then(|s| s.running)
                .unwrap_or(false)
                .then_some(password)
        }
        None => None,
    };
    let existed = running.is_some();
    let password = match running {
        Some(password) => password,
        None => secret::renew_local_password(settings)?,
    };
    let name = container_name(settings, &image, &password);
    emit(
        sink,
        if existed {
            Event::JoinedContainer { name: name.clone() }
        } else {
            Event::CreatingContainer {
                name: name.clone(),
                image: image.clone(),
            }
        },
    );
    let port = start_shared(settings, &name, &image, &password).await?;
    drop(lock);
    let server = Server::local(BackendKind::Container, port, &password);
    let what = format!("the Postgres container `{name}`");
    connect::wait_ready(
        &server.admin_config(),
        settings.acquire_timeout,
        sink,
        &what,
    )
    .await
    .map_err(|e| backend_error(format!("{e}; its log: `docker logs {name}`")))?;
    if !existed {
        secret::lower_scram_cost(&server.admin_config(), &password).await?;
        remove_stale(&docker, settings, &password).await?;
    }
    Ok(server)
}

/// The reusable container's request: deterministic name and labels, so that every test
/// process asks for the same container.
fn request(
    settings: &Settings,
    name: &str,
    image: &str,
    password: &str,
) -> ContainerRequest<GenericImage> {
    let password_file = super::secret::password_path(settings);
    let (repository, tag) = match image.rsplit_once(':') {
        Some((repository, tag)) if !tag.contains('/') => (repository, tag),
        _ => (image, "latest"),
    };
    let mut cmd = vec!["postgres".to_owned()];
    for option in [
        "fsync=off".to_owned(),
        "synchronous_commit=off".to_owned(),
        "full_page_writes=off".to_owned(),
        format!("max_connections={}", settings.max_connections),
    ] {
        cmd.push("-c".to_owned());
        cmd.push(option);
    }
    GenericImage::new(repository, tag)
        .with_exposed_port(5432.tcp())
        .with_container_name(name)
        .with_labels([
            (LABEL_MANAGED, "true".to_owned()),
            (LABEL_TTL, settings.container_ttl.as_secs().to_string()),
            (LABEL_ROOT, settings.root.display().to_string()),
            (LABEL_CREDENTIALS, credentials(password)),
        ])
        .with_cmd(cmd)
        // Published on 127.0.0.1 only, and even there only the workspace's user (who can
        // read target/pgharness/server-password) logs in.
        .with_env_var("POSTGRES_HOST_AUTH_METHOD", "scram-sha-256")
        // The password goes in a file, not the environment: a container's environment is in
        // `docker inspect`, and in the server's /proc/<pid>/environ on the host. The
        // workspace's 0600 file is mounted read-only (no copy step between the container's
        // create and its start, which racing starters would meet).
        .with_env_var("POSTGRES_PASSWORD_FILE", PASSWORD_FILE)
        .with_env_var("PGDATA", PGDATA)
        .with_shm_size(256 * 1024 * 1024)
        .with_host_config_modifier(move |host: &mut HostConfig| {
            host.publish_all_ports = Some(false);
            host.port_bindings = Some(HashMap::from([(
                "5432/tcp".to_owned(),
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".to_owned()),
                    host_port: Some(String::new()),
                }]),
            )]));
            host.binds = Some(vec![format!(
                "{}:{PASSWORD_FILE}:ro",
                password_file.display()
            )]);
            host.tmpfs = Some(HashMap::from([(
                PGDATA.to_owned(),
                "rw,mode=0700".to_owned(),
            )]));
        })
        .with_reuse(ReuseDirective::Always)
}

/// Where the container finds the server's password (`POSTGRES_PASSWORD_FILE`).
const PASSWORD_FILE: &str = "/run/pgharness-password";

/// Starts the shared container or joins it; returns its port on 127.0.0.1.
async fn start_shared(
    settings: &Settings,
    name: &str,
    image: &str,
    password: &str,
) -> Result<u16, Error> {
    let mut attempts = 0;
    let container = loop {
        attempts += 1;
        match request(settings, name, image, password).start().await {
            Ok(container) => break container,
            // Another process created (or started) it first: the next lookup joins it.
            Err(error) if lost_race(&error) && attempts < 10 => {
                tracing::debug!(%name, attempts, "lost the container create race; joining");
                // The winner is between its create and its start: give Docker a moment.
                tokio::time::sleep(Duration::from_millis(20 * attempts)).await;
            }
            Err(error) => {
                return Err(backend_error(format!(
                    "failed to start container `{name}`: {error}"
                )));
            }
        }
    };
    // A starter that lost the create race may find the winner's container created but not
    // started yet (the winner copies the password file in between): its port comes once the
    // winner starts it.
    let mut waited = 0;
    loop {
        match container.get_host_port_ipv4(5432.tcp()).await {
            Ok(port) => break Ok(port),
            Err(_) if waited < 100 => {
                waited += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                break Err(backend_error(format!(
                    "container `{name}` runs but publishes no port for 5432 ({e}); remove it with `cargo pgharness down`"
                )));
            }
        }
    }
}

/// A create that met the same name (409); a start of a container that another process had
/// just started (304), or had just created, which Docker 20.10 may briefly answer with 404
/// although the container is listed.
fn lost_race(error: &TestcontainersError) -> bool {
    use testcontainers::bollard::errors::Error as Docker;
    use testcontainers::core::error::ClientError;
    matches!(
        error,
        TestcontainersError::Client(
            ClientError::CreateContainer(Docker::DockerResponseServerError {
                status_code: 409,
                ..
            }) | ClientError::StartContainer(Docker::DockerResponseServerError {
                status_code: 304 | 404,
                ..
            })
        )
    )
}

/// Removes this workspace's containers made with a password it no longer has (`target/`
/// was cleaned while one ran): nobody can log in to them.
async fn remove_stale(docker: &Docker, settings: &Settings, password: &str) -> Result<(), Error> {
    let current = credentials(password);
    for summary in managed(docker).await? {
        let labels = summary.labels.clone().unwrap_or_default();
        let ours =
            labels.get(LABEL_ROOT).map(String::as_str) == Some(&*settings.root.to_string_lossy());
        if ours && labels.get(LABEL_CREDENTIALS) != Some(&current) {
            let name = first_name(&summary);
            tracing::info!(%name, "removing a container whose password this workspace lost");
            remove(docker, &name).await?;
        }
    }
    Ok(())
}

/// Removes this workspace's container (for `cargo pgharness down`).
pub async fn stop(settings: &Settings) -> Result<Vec<String>, Error> {
    quiet(stop_unlogged(settings)).await
}

async fn stop_unlogged(settings: &Settings) -> Result<Vec<String>, Error> {
    let docker = docker().await?;
    let mut removed = Vec::new();
    for summary in managed(&docker).await? {
        let root = summary.labels.as_ref().and_then(|l| l.get(LABEL_ROOT));
        if root.map(String::as_str) == Some(&*settings.root.to_string_lossy()) {
            let name = first_name(&summary);
            remove(&docker, &name).await?;
            removed.push(format!("container {name}"));
        }
    }
    Ok(removed)
}

/// Removes every pgharness container whose deadline label has passed (for `cargo pgharness reap`).
pub async fn reap_expired() -> Result<Vec<String>, Error> {
    quiet(reap_expired_unlogged()).await
}

async fn reap_expired_unlogged() -> Result<Vec<String>, Error> {
    reap_expired_at(SystemTime::now()).await
}

/// Removes every pgharness container whose deadline is before `now` (a clock seam).
pub async fn reap_expired_at(now: SystemTime) -> Result<Vec<String>, Error> {
    let docker = docker().await?;
    let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
    let mut removed = Vec::new();
    for summary in managed(&docker).await? {
        if deadline(&summary).is_some_and(|deadline| deadline < now) {
            let name = first_name(&summary);
            remove(&docker, &name).await?;
            removed.push(format!("container {name} (deadline passed)"));
        }
    }
    Ok(removed)
}

/// When a container may be reaped: its creation plus its TTL label, or (containers of
/// earlier versions) its deadline label.
pub fn deadline(summary: &testcontainers::bollard::models::ContainerSummary) -> Option<u64> {
    let labels = summary.labels.as_ref()?;
    if let Some(ttl) = labels.get(LABEL_TTL).and_then(|t| t.parse::<u64>().ok()) {
        let created = u64::try_from(summary.created?).ok()?;
        return Some(created.saturating_add(ttl));
    }
    labels.get(LABEL_DEADLINE)?.parse().ok()
}

async fn managed(
    docker: &Docker,
) -> Result<Vec<testcontainers::bollard::models::ContainerSummary>, Error> {
    let filters = HashMap::from([("label", vec![format!("{LABEL_MANAGED}=true")])]);
    let options = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    docker
        .list_containers(Some(options))
        .await
        .map_err(|e| backend_error(format!("failed to list containers: {e}")))
}

fn first_name(summary: &testcontainers::bollard::models::ContainerSummary) -> String {
    summary
        .names
        .as_ref()
        .and_then(|names| names.first())
        .map(|name| name.trim_start_matches('/').to_owned())
        .or_else(|| summary.id.clone())
        .unwrap_or_default()
}

async fn remove(docker: &Docker, name: &str) -> Result<(), Error> {
    let options = RemoveContainerOptionsBuilder::new()
        .force(true)
        .v(true)
        .build();
    match docker.remove_container(name, Some(options)).await {
        Ok(())
        | Err(testcontainers::bollard::errors::Error::DockerResponseServerError {
            status_code: 404,
            ..
        }) => Ok(()),
        Err(e) => Err(backend_error(format!(
            "failed to remove container `{name}`: {e}"
        ))),
    }
}
