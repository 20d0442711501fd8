//! Backends: where the Postgres server comes from. Each one starts or joins ONE server
//! shared by every test process of a run; none of them stops it when a test ends.

#[cfg(feature = "container")]
pub mod container;
mod known;
pub mod native;
mod process;
pub mod rds;
pub mod secret;

pub use process::{ProcessId, listener_owner, listener_uid, socket_owner};

use crate::error::Error;
use crate::events::{Event, EventSink, emit};
use crate::server::Server;
use crate::settings::{BackendKind, Settings};

/// What a build without the `container` feature says when that backend is asked for.
#[cfg(not(feature = "container"))]
const WITHOUT_CONTAINER: &str = "pgharness was built without its `container` cargo feature \
     (`default-features = false`); add `features = [\"container\"]` to the dependency, or use \
     the native or url backend";

/// Starts or joins the server the settings ask for. Idempotent and safe to race: every
/// test process calls it, and they all end up on the same server.
pub async fn ensure(settings: &Settings, sink: EventSink<'_>) -> Result<Server, Error> {
    let server = match settings.backend {
        BackendKind::Url => url(settings),
        #[cfg(feature = "container")]
        BackendKind::Container => container::ensure(settings, sink).await,
        #[cfg(not(feature = "container"))]
        BackendKind::Container => Err(Error::Backend {
            backend: "container",
            message: WITHOUT_CONTAINER.into(),
        }),
        BackendKind::Native => native::ensure(settings, sink).await,
        BackendKind::Rds => rds::ensure(settings),
        BackendKind::Auto => auto(settings, sink).await,
    }?;
    if matches!(
        server.backend(),
        BackendKind::Container | BackendKind::Native
    ) {
        secret::ensure_tests_role(&server, settings).await?;
        known::remember(settings, &server);
    }
    Ok(server)
}

/// The local server that `ensure` last started or joined for these settings, as recorded
/// under `target/pgharness/`, without checking it: a test process connects straight to it
/// and falls back to [`ensure`] only when that connection fails. `None` when nothing is
/// recorded, or when the settings could resolve elsewhere (`url` set, an RDS proxy up).
pub fn known(settings: &Settings) -> Option<Server> {
    if settings.url.is_some()
        || !matches!(
            settings.backend,
            BackendKind::Auto | BackendKind::Container | BackendKind::Native
        )
        || (settings.backend == BackendKind::Auto && rds::is_running(settings))
    {
        return None;
    }
    known::recall(settings)
}

/// The backend `auto` would pick, without starting anything.
pub async fn resolve(settings: &Settings, sink: EventSink<'_>) -> Result<BackendKind, Error> {
    if settings.backend != BackendKind::Auto {
        return Ok(settings.backend);
    }
    let mut attempts = Vec::new();
    // A server brought up by `cargo pgharness up --backend rds` serves every run until `down`.
    if rds::is_running(settings) {
        return Ok(BackendKind::Rds);
    }
    if settings.url.is_some() {
        return Ok(BackendKind::Url);
    }
    attempts.push((
        "url".to_owned(),
        "PGHARNESS_URL is not set (set it to use an existing server)".to_owned(),
    ));
    resolve_local_after(settings, sink, attempts).await
}

/// The local backend `auto` would pick (a container if Docker answers, else the Postgres
/// binaries), whatever the settings say otherwise: for tests and tools that need an admin
/// on a server pgharness starts (they create roles), also in a run of the rds backend.
pub async fn resolve_local(settings: &Settings, sink: EventSink<'_>) -> Result<BackendKind, Error> {
    resolve_local_after(settings, sink, Vec::new()).await
}

async fn resolve_local_after(
    settings: &Settings,
    sink: EventSink<'_>,
    mut attempts: Vec<(String, String)>,
) -> Result<BackendKind, Error> {
    emit(
        sink,
        Event::Probing {
            backend: "container".into(),
        },
    );
    #[cfg(feature = "container")]
    match container::probe(settings).await {
        Ok(_) => return Ok(BackendKind::Container),
        Err(why) => attempts.push(("container".to_owned(), why.reason())),
    }
    #[cfg(not(feature = "container"))]
    attempts.push(("container".to_owned(), WITHOUT_CONTAINER.to_owned()));
    emit(
        sink,
        Event::Probing {
            backend: "native".into(),
        },
    );
    match native::find_bindir(settings) {
        Ok(_) => return Ok(BackendKind::Native),
        Err(why) => attempts.push(("native".to_owned(), why.reason())),
    }
    Err(Error::NoBackend { attempts })
}

async fn auto(settings: &Settings, sink: EventSink<'_>) -> Result<Server, Error> {
    let kind = resolve(settings, sink).await?;
    let mut settings = settings.clone();
    settings.backend = kind;
    Box::pin(ensure(&settings, sink)).await
}

fn url(settings: &Settings) -> Result<Server, Error> {
    let url = settings.url.clone().ok_or_else(|| Error::Setting {
        name: "url".into(),
        origin: "PGHARNESS_URL".into(),
        problem: "it is not set".into(),
        fix: "set PGHARNESS_URL=postgres://user:password@host:port/database".into(),
    })?;
    Server::from_url(BackendKind::Url, url)
}

/// Whether the server of this (resolved) backend already runs; `url` servers always "run".
pub async fn is_running(settings: &Settings, kind: BackendKind) -> bool {
    match kind {
        #[cfg(feature = "container")]
        BackendKind::Container => container::is_running(settings).await,
        #[cfg(not(feature = "container"))]
        BackendKind::Container => false,
        BackendKind::Native => native::is_running(settings),
        BackendKind::Rds => rds::is_running(settings),
        BackendKind::Url | BackendKind::Auto => true,
    }
}

/// Stops the server of one backend if pgharness started it; returns what it stopped.
pub async fn stop(settings: &Settings, kind: BackendKind) -> Result<Vec<String>, Error> {
    known::forget_all(settings, kind);
    match kind {
        #[cfg(feature = "container")]
        BackendKind::Container => container::stop(settings).await,
        #[cfg(not(feature = "container"))]
        BackendKind::Container => Ok(Vec::new()),
        BackendKind::Native => native::stop(settings).await,
        // The RDS proxy is a background process of the runner; `cargo pgharness down` stops it.
        BackendKind::Url | BackendKind::Auto | BackendKind::Rds => Ok(Vec::new()),
    }
}

/// Stops the one server these settings choose, if pgharness started it (a run's own, the
/// emulated cluster's); [`stop`] stops every server of the backend in the workspace.
pub async fn stop_chosen(settings: &Settings, kind: BackendKind) -> Result<Vec<String>, Error> {
    match kind {
        BackendKind::Native => {
            known::forget_all(settings, kind);
            native::stop_chosen(settings).await
        }
        _ => stop(settings, kind).await,
    }
}

/// Takes an exclusive lock on `path` (created if missing), waiting off the runtime's
/// threads; held until the file is dropped.
pub(crate) async fn lock_file(path: &std::path::Path) -> Result<std::fs::File, Error> {
    let path = path.to_path_buf();
    let file = std::fs::File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("failed to open lock file", &path, e))?;
    tokio::task::spawn_blocking(move || {
        file.lock()
            .map(|()| file)
            .map_err(|e| Error::io("failed to lock", &path, e))
    })
    .await
    .map_err(|e| Error::Backend {
        backend: "local",
        message: format!("lock task failed: {e}"),
    })?
}

/// Whether a process runs: it is in /proc and is not a zombie (exited but not yet reaped,
/// as a child of the caller stays until waited for).
pub fn process_alive(pid: i32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state is the first field after the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}

/// Sends SIGTERM to `pid` and waits up to `timeout` for it to go; true when it went.
pub async fn terminate_and_wait(pid: i32, timeout: std::time::Duration) -> bool {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let deadline = std::time::Instant::now() + timeout;
    while process_alive(pid) && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    !process_alive(pid)
}
