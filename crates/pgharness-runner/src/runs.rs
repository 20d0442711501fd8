//! Runs of `cargo pgharness test` that share one workspace's server: each holds a shared lock
//! on `target/pgharness/runs.lock` from before it starts or joins the server until it ends,
//! and only the last one to end (the one that then gets the lock exclusively) stops a server
//! that a test run started. A server started by `cargo pgharness up`, or kept for inspection,
//! is left alone.

use std::fs::File;
use std::path::PathBuf;

use pgharness::{BackendKind, Settings};

use crate::error::{Action, Error, Result};

/// This run's share of the workspace's runs lock.
pub struct RunsLock {
    file: File,
}

impl RunsLock {
    /// Takes a shared lock, waiting while a last run is stopping the server.
    pub async fn join(settings: &Settings) -> Result<RunsLock> {
        std::fs::create_dir_all(&settings.state_dir)
            .action(|| format!("failed to create {}", settings.state_dir.display()))?;
        let path = settings.state_dir.join("runs.lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .action(|| format!("failed to open {}", path.display()))?;
        let file = tokio::task::spawn_blocking(move || file.lock_shared().map(|()| file))
            .await
            .map_err(|error| Error::program("the runs lock", error.to_string()))?
            .action(|| format!("failed to lock {}", path.display()))?;
        Ok(RunsLock { file })
    }

    /// Ends this run's share. `Some` (holding the lock exclusively until dropped) when no
    /// other run is live: this run is the last.
    pub async fn leave(self) -> Result<Option<File>> {
        let file = self.file;
        let action = || "failed to unlock runs.lock".to_owned();
        file.unlock().action(action)?;
        match file.try_lock() {
            Ok(()) => Ok(Some(file)),
            Err(std::fs::TryLockError::WouldBlock) => Ok(None),
            Err(std::fs::TryLockError::Error(error)) => Err(error).action(action),
        }
    }
}

fn marker(settings: &Settings, kind: BackendKind) -> PathBuf {
    settings.state_dir.join(format!("started-by-test-{kind}"))
}

/// Records that a test run started this backend's server (so the last run stops it).
pub fn mark_started_by_a_run(settings: &Settings, kind: BackendKind) -> Result<()> {
    let path = marker(settings, kind);
    std::fs::write(&path, b"").action(|| format!("failed to write {}", path.display()))
}

pub fn started_by_a_run(settings: &Settings, kind: BackendKind) -> bool {
    marker(settings, kind).exists()
}

/// The server is no longer a test run's to stop (kept for inspection, or `--keep-server`).
pub fn forget_started_by_a_run(settings: &Settings) {
    for kind in [BackendKind::Container, BackendKind::Native] {
        let _ = std::fs::remove_file(marker(settings, kind));
    }
}
