//! The last local server `ensure` started or joined, recorded per requested backend in
//! `target/pgharness/server-<backend>.json` with the settings that chose it, so that test
//! processes skip the full check (file lock, Docker inspect or process probe, `pg_config`,
//! a readiness connection) and connect straight to it. Nothing here is trusted beyond a
//! hint: before a password goes to the recorded address, its listener must belong to the
//! uid recorded with it (another local user may have taken the port since the server went);
//! the caller's connection proves the rest, and a failure falls back to `ensure`.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::server::Server;
use crate::settings::{BackendKind, Settings};

#[derive(Serialize, Deserialize, PartialEq, Debug)]
struct Known {
    /// The backend the settings asked for (`auto`, `container`, `native`).
    requested: String,
    /// What it resolved to.
    backend: String,
    port: u16,
    /// The settings that chose the server: a record made under other ones is not used.
    image: Option<String>,
    pg_bin: Option<PathBuf>,
    max_connections: u32,
    #[serde(default)]
    native_tcp: bool,
    /// The workspace that recorded it: a record copied into another checkout is not used
    /// there (it names the other checkout's server).
    #[serde(default)]
    workspace: Option<PathBuf>,
    /// The uid of the server's listener when it was recorded (the native server's user;
    /// for a container, Docker's port proxy): a test process sends the password only to a
    /// listener of the same uid (another local user may have bound the port since the
    /// server stopped). Without one, the record is not believed.
    #[serde(default)]
    listener_uid: Option<u32>,
    /// The native server's socket directory when it is reached through its Unix socket
    /// (no TCP listener); its owner is checked as the port's listener is.
    #[serde(default)]
    socket_dir: Option<PathBuf>,
}

fn path(settings: &Settings) -> PathBuf {
    settings
        .state_dir
        .join(format!("server-{}.json", settings.backend))
}

fn describe(settings: &Settings, server: &Server) -> Option<Known> {
    let config = server.config();
    let port = config.get_ports().first().copied()?;
    let socket_dir = match config.get_hosts().first()? {
        tokio_postgres::config::Host::Unix(dir) => Some(dir.clone()),
        tokio_postgres::config::Host::Tcp(_) => None,
    };
    Some(Known {
        requested: settings.backend.to_string(),
        backend: server.backend().to_string(),
        port,
        image: settings.image.clone(),
        pg_bin: settings.pg_bin.clone(),
        max_connections: settings.max_connections,
        native_tcp: settings.native_tcp,
        workspace: Some(settings.root.clone()),
        listener_uid: super::listener_owner(socket_dir.as_deref(), port),
        socket_dir,
    })
}

pub(super) fn remember(settings: &Settings, server: &Server) {
    let Some(known) = describe(settings, server) else {
        return;
    };
    let path = path(settings);
    if std::fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Known>(&bytes).ok())
        .is_some_and(|old| old == known)
    {
        return;
    }
    let Ok(text) = serde_json::to_vec(&known) else {
        return;
    };
    // Written whole, then renamed: a reader never sees half a record.
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    if std::fs::create_dir_all(&settings.state_dir).is_ok()
        && std::fs::write(&tmp, text).is_ok()
        && std::fs::rename(&tmp, &path).is_err()
    {
        let _ = std::fs::remove_file(&tmp);
    }
}

pub(super) fn recall(settings: &Settings) -> Option<Server> {
    let bytes = std::fs::read(path(settings)).ok()?;
    let known: Known = serde_json::from_slice(&bytes).ok()?;
    let matches = known.requested == settings.backend.as_str()
        && known.image == settings.image
        && known.pg_bin == settings.pg_bin
        && known.max_connections == settings.max_connections
        && known.native_tcp == settings.native_tcp
        && known.workspace.as_deref() == Some(settings.root.as_path());
    let backend = match known.backend.as_str() {
        "container" => BackendKind::Container,
        "native" => BackendKind::Native,
        _ => return None,
    };
    if !matches {
        return None;
    }
    if known.listener_uid.is_none()
        || super::listener_owner(known.socket_dir.as_deref(), known.port) != known.listener_uid
    {
        tracing::info!(
            port = known.port,
            "the recorded server's port is not its listener's now; checking the backend"
        );
        return None;
    }
    let password = match backend {
        BackendKind::Native => super::secret::native_password(settings, known.port)
            .or_else(|| super::secret::local_password(settings).ok())?,
        _ => super::secret::local_password(settings).ok()?,
    };
    Some(Server::local_at(
        backend,
        known.socket_dir.as_deref(),
        known.port,
        &password,
    ))
}

/// Forgets every record of a server of this kind (it is being stopped).
pub(super) fn forget_all(settings: &Settings, kind: BackendKind) {
    for requested in [BackendKind::Auto, kind] {
        let path = settings.state_dir.join(format!("server-{requested}.json"));
        let names_kind = std::fs::read(&path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<Known>(&bytes).ok())
            .is_some_and(|known| known.backend == kind.as_str());
        if names_kind {
            let _ = std::fs::remove_file(path);
        }
    }
}
