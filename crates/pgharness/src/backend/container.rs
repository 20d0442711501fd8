//! The `container` backend: one Postgres container per workspace and image, shared by every
//! test process. Its name is deterministic, so concurrent creators race on the name and the
//! losers join the winner. Data lives on tmpfs and fsync is off.
//!
//! This talks to Docker through bollard (the client testcontainers is built on) with API
//! version negotiation: testcontainers 0.27/0.28 pin API 1.52, which Docker Engine 20.10
//! (Debian bookworm's `docker.io`, API 1.41) rejects.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder,
};
use futures_util::StreamExt;
use sha2::{Digest, Sha256};

use super::secret;
use crate::connect;
use crate::error::Error;
use crate::events::{Event, EventSink, emit};
use crate::server::Server;
use crate::settings::{BackendKind, Settings};

/// The image used when `PGHARNESS_IMAGE` is not set.
pub const DEFAULT_IMAGE: &str = "postgres:17";
/// The image `cargo xtask image` builds from Debian packages when no registry is reachable.
pub const LOCAL_IMAGE: &str = "pgharness/postgres:17";

/// Label on every container pgharness creates.
pub const LABEL_MANAGED: &str = "dev.pgharness.managed";
/// Label: the Unix time after which `cargo xtask reap` may remove the container.
pub const LABEL_DEADLINE: &str = "dev.pgharness.deadline";
/// Label: the workspace root the container serves.
pub const LABEL_ROOT: &str = "dev.pgharness.root";

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
pub async fn docker() -> Result<Docker, String> {
    let docker = Docker::connect_with_defaults().map_err(|e| {
        format!("cannot reach Docker: {e} (start the Docker daemon, or set DOCKER_HOST)")
    })?;
    let negotiated = tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version()).await;
    match negotiated {
        Ok(Ok(docker)) => Ok(docker),
        Ok(Err(e)) => Err(format!(
            "Docker did not answer: {e} (start the Docker daemon, or set DOCKER_HOST)"
        )),
        Err(_) => Err("Docker did not answer within 5s (is the daemon running?)".into()),
    }
}

/// Checks that Docker answers and that a Postgres image is available (pulling if needed).
pub(crate) async fn probe(settings: &Settings) -> Result<String, String> {
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
pub async fn resolve_image(docker: &Docker, settings: &Settings) -> Result<String, String> {
    if let Some(image) = &settings.image {
        if image_present(docker, image).await {
            return Ok(image.clone());
        }
        return match pull(docker, image).await {
            Ok(()) => Ok(image.clone()),
            Err(e) => Err(format!(
                "image `{image}` (PGHARNESS_IMAGE) is not present and could not be pulled: {e}"
            )),
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
        Err(e) => Err(format!(
            "no Postgres image: `{DEFAULT_IMAGE}` is not present and could not be pulled ({e}); \
             build `{LOCAL_IMAGE}` from Debian packages with `cargo xtask image`, \
             or set PGHARNESS_IMAGE to an image you have"
        )),
    }
}

/// The container name for this workspace, image and server settings.
pub fn container_name(settings: &Settings, image: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(settings.root.to_string_lossy().as_bytes());
    hasher.update([0]);
    hasher.update(image.as_bytes());
    hasher.update([0]);
    hasher.update(settings.max_connections.to_be_bytes());
    // Containers of older pgharness versions trusted every local user: never join one.
    hasher.update(b"scram-sha-256");
    format!("pgharness-{}", hex::encode(&hasher.finalize()[..5]))
}

/// Whether this workspace's container exists and runs (never pulls or creates anything).
pub async fn is_running(settings: &Settings) -> bool {
    quiet(is_running_unlogged(settings)).await
}

async fn is_running_unlogged(settings: &Settings) -> bool {
    let Ok(docker) = docker().await else {
        return false;
    };
    let candidates = match &settings.image {
        Some(image) => vec![image.clone()],
        None => vec![DEFAULT_IMAGE.to_owned(), LOCAL_IMAGE.to_owned()],
    };
    for image in candidates {
        let name = container_name(settings, &image);
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
    let docker = docker().await.map_err(backend_error)?;
    let image = resolve_image(&docker, settings)
        .await
        .map_err(backend_error)?;
    let name = container_name(settings, &image);
    let password = secret::local_password(settings)?;
    let mut created = false;
    let port = loop {
        match docker.inspect_container(&name, None).await {
            Ok(info) if !has_password(&info, &password) => {
                // Made with a password this workspace no longer has (`target/` was cleaned,
                // or another checkout at this path): nobody can log in to it. Replace it.
                tracing::info!(%name, "replacing a container whose password this workspace lost");
                remove(&docker, &name).await?;
            }
            Ok(info) => {
                let running = info.state.as_ref().and_then(|s| s.running).unwrap_or(false);
                if !running {
                    start(&docker, &name).await?;
                    continue;
                }
                if !created {
                    emit(sink, Event::JoinedContainer { name: name.clone() });
                }
                match published_port(&info) {
                    Some(port) => break port,
                    None => {
                        return Err(backend_error(format!(
                            "container `{name}` runs but publishes no port for 5432; remove it with `cargo xtask down`"
                        )));
                    }
                }
            }
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {
                emit(
                    sink,
                    Event::CreatingContainer {
                        name: name.clone(),
                        image: image.clone(),
                    },
                );
                match create(&docker, settings, &name, &image, &password).await {
                    Ok(()) => created = true,
                    // Another test process won the race: join its container.
                    Err(bollard::errors::Error::DockerResponseServerError {
                        status_code: 409,
                        ..
                    }) => {}
                    Err(e) => {
                        return Err(backend_error(format!(
                            "failed to create container `{name}`: {e}"
                        )));
                    }
                }
            }
            Err(e) => {
                return Err(backend_error(format!(
                    "failed to inspect container `{name}`: {e}"
                )));
            }
        }
    };
    let server = Server::local(BackendKind::Container, port, &password);
    let what = format!("the Postgres container `{name}`");
    connect::wait_ready(&server.config(), settings.acquire_timeout, sink, &what)
        .await
        .map_err(|e| backend_error(format!("{e}; its log: `docker logs {name}`")))?;
    if created {
        secret::lower_scram_cost(&server.config(), &password).await?;
    }
    Ok(server)
}

async fn start(docker: &Docker, name: &str) -> Result<(), Error> {
    match docker.start_container(name, None).await {
        Ok(()) => Ok(()),
        // 304: already started (by a racing process).
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(e) => Err(backend_error(format!(
            "failed to start container `{name}`: {e}"
        ))),
    }
}

async fn create(
    docker: &Docker,
    settings: &Settings,
    name: &str,
    image: &str,
    password: &str,
) -> Result<(), bollard::errors::Error> {
    let deadline = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_add(settings.container_ttl)
        .as_secs();
    let labels = HashMap::from([
        (LABEL_MANAGED.to_owned(), "true".to_owned()),
        (LABEL_DEADLINE.to_owned(), deadline.to_string()),
        (LABEL_ROOT.to_owned(), settings.root.display().to_string()),
    ]);
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
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(cmd),
        env: Some(vec![
            // Published on 127.0.0.1 only, and even there only the workspace's user (who
            // can read target/pgharness/server-password) logs in.
            "POSTGRES_HOST_AUTH_METHOD=scram-sha-256".to_owned(),
            format!("POSTGRES_PASSWORD={password}"),
            format!("PGDATA={PGDATA}"),
        ]),
        labels: Some(labels),
        exposed_ports: Some(vec!["5432/tcp".to_owned()]),
        host_config: Some(HostConfig {
            port_bindings: Some(HashMap::from([(
                "5432/tcp".to_owned(),
                Some(vec![PortBinding {
                    host_ip: Some("127.0.0.1".to_owned()),
                    host_port: Some(String::new()),
                }]),
            )])),
            tmpfs: Some(HashMap::from([(
                PGDATA.to_owned(),
                "rw,mode=0700".to_owned(),
            )])),
            shm_size: Some(256 * 1024 * 1024),
            ..Default::default()
        }),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::new().name(name).build();
    docker.create_container(Some(options), body).await?;
    match docker.start_container(name, None).await {
        Ok(())
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 304, ..
        }) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Whether the container was made with this password (its environment says so).
fn has_password(info: &bollard::models::ContainerInspectResponse, password: &str) -> bool {
    let expected = format!("POSTGRES_PASSWORD={password}");
    info.config
        .as_ref()
        .and_then(|c| c.env.as_ref())
        .is_some_and(|env| env.contains(&expected))
}

fn published_port(info: &bollard::models::ContainerInspectResponse) -> Option<u16> {
    let ports = info.network_settings.as_ref()?.ports.as_ref()?;
    let bindings = ports.get("5432/tcp")?.as_ref()?;
    bindings
        .iter()
        .find_map(|binding| binding.host_port.as_deref()?.parse().ok())
}

/// Removes this workspace's container (for `cargo xtask down`).
pub async fn stop(settings: &Settings) -> Result<Vec<String>, Error> {
    quiet(stop_unlogged(settings)).await
}

async fn stop_unlogged(settings: &Settings) -> Result<Vec<String>, Error> {
    let docker = docker().await.map_err(backend_error)?;
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

/// Removes every pgharness container whose deadline label has passed (for `cargo xtask reap`).
pub async fn reap_expired() -> Result<Vec<String>, Error> {
    quiet(reap_expired_unlogged()).await
}

async fn reap_expired_unlogged() -> Result<Vec<String>, Error> {
    let docker = docker().await.map_err(backend_error)?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let mut removed = Vec::new();
    for summary in managed(&docker).await? {
        let deadline = summary
            .labels
            .as_ref()
            .and_then(|l| l.get(LABEL_DEADLINE))
            .and_then(|d| d.parse::<u64>().ok());
        if deadline.is_some_and(|deadline| deadline < now) {
            let name = first_name(&summary);
            remove(&docker, &name).await?;
            removed.push(format!("container {name} (deadline passed)"));
        }
    }
    Ok(removed)
}

async fn managed(docker: &Docker) -> Result<Vec<bollard::models::ContainerSummary>, Error> {
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

fn first_name(summary: &bollard::models::ContainerSummary) -> String {
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
        | Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        Err(e) => Err(backend_error(format!(
            "failed to remove container `{name}`: {e}"
        ))),
    }
}
