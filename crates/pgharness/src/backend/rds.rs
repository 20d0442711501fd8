//! The `rds` backend, as test processes see it: the run's local auth proxy, started by
//! `cargo pgharness up --backend rds` (or `cargo pgharness test --backend rds`), described in
//! `target/pgharness/env`. Test processes never open SSM sessions or mint tokens
//! themselves; the one background process does, for the whole run.

use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use crate::error::Error;
use crate::server::Server;
use crate::settings::{BackendKind, SecretUrl, Settings};

/// What `cargo pgharness up` wrote: `KEY=value` lines. `Debug` hides the URL's password.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EnvFile {
    /// `PGHARNESS_BACKEND`.
    pub backend: String,
    /// `DATABASE_URL`: where clients connect (the local auth proxy for rds).
    pub url: Option<SecretUrl>,
    /// `PGHARNESS_RDS_PROXY_PID`: the background process.
    pub proxy_pid: Option<i32>,
    /// `PGHARNESS_RDS_PROXY_STARTED`: its start time, which with the pid names it (a pid
    /// alone may have passed to another process since).
    pub proxy_started: Option<u64>,
    /// `PGHARNESS_WORKSPACE`: the workspace that wrote the file; a copy of it in another
    /// checkout is not that checkout's (see [`EnvFile::read`]).
    pub workspace: Option<PathBuf>,
    /// `PGHARNESS_RDS_SESSION`: its SSM session, if it tunnels.
    pub session: Option<String>,
}

/// The startup option (`-c pgharness.lease=<test>:<sessions>`) through which a test's
/// connections ask the RDS proxy for their sessions together (rds-iam's `leases`; the two
/// names are checked equal in pgharness-rds, which sees both crates).
pub const LEASE_OPTION: &str = "pgharness.lease";

/// `target/pgharness/env`.
pub fn env_file_path(settings: &Settings) -> PathBuf {
    settings.state_dir.join("env")
}

/// `target/pgharness/pg_service.conf` (0600): the env file's `DATABASE_URL` as libpq's
/// service `pgharness`, so that `PGSERVICEFILE=… PGSERVICE=pgharness psql` connects with no
/// password on any command line (`/proc/<pid>/cmdline` is readable by every local user).
pub fn service_file_path(settings: &Settings) -> PathBuf {
    settings.state_dir.join("pg_service.conf")
}

/// The libpq service section for `url`: `host`, `port`, `user`, `password`, `dbname`.
fn service_section(url: &str) -> Option<String> {
    let url = url::Url::parse(url).ok()?;
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8_lossy()
            .into_owned()
    };
    let mut text = String::from("[pgharness]\n");
    // A Unix socket's directory is percent-encoded in the URL (`%2Fdev%2Fshm%2F…`); libpq
    // reads the service file's values as they are.
    text.push_str(&format!("host={}\n", decode(url.host_str()?)));
    text.push_str(&format!("port={}\n", url.port().unwrap_or(5432)));
    if !url.username().is_empty() {
        text.push_str(&format!("user={}\n", decode(url.username())));
    }
    if let Some(password) = url.password() {
        text.push_str(&format!("password={}\n", decode(password)));
    }
    let database = url.path().trim_start_matches('/');
    if !database.is_empty() {
        text.push_str(&format!("dbname={}\n", decode(database)));
    }
    Some(text)
}

impl EnvFile {
    /// Reads this workspace's env file, if there is one: a file another workspace wrote
    /// (copied here with a checkout) is none of this one's.
    pub fn read(settings: &Settings) -> Result<Option<EnvFile>, Error> {
        Ok(EnvFile::read_in(&settings.state_dir)?.filter(|file| {
            let ours = file
                .workspace
                .as_deref()
                .is_none_or(|workspace| workspace == settings.root);
            if !ours {
                tracing::info!(
                    workspace = ?file.workspace,
                    "the env file was written by another workspace; ignoring it"
                );
            }
            ours
        }))
    }

    /// Reads the env file of the state directory `state_dir`, if there is one.
    pub(crate) fn read_in(state_dir: &std::path::Path) -> Result<Option<EnvFile>, Error> {
        let path = state_dir.join("env");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("failed to read", &path, e)),
        };
        let mut file = EnvFile::default();
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "PGHARNESS_BACKEND" => file.backend = value.to_owned(),
                "DATABASE_URL" => file.url = Some(SecretUrl::new(value)),
                "PGHARNESS_RDS_PROXY_PID" => file.proxy_pid = value.parse().ok(),
                "PGHARNESS_RDS_PROXY_STARTED" => file.proxy_started = value.parse().ok(),
                "PGHARNESS_WORKSPACE" => file.workspace = Some(PathBuf::from(value)),
                "PGHARNESS_RDS_SESSION" => file.session = Some(value.to_owned()),
                _ => {}
            }
        }
        Ok(Some(file))
    }

    /// Writes it readable by its owner only (it holds the proxy's password).
    pub fn write(&self, settings: &Settings) -> Result<(), Error> {
        std::fs::create_dir_all(&settings.state_dir)
            .map_err(|e| Error::io("failed to create", &settings.state_dir, e))?;
        let path = env_file_path(settings);
        let mut text = format!("PGHARNESS_BACKEND={}\n", self.backend);
        if let Some(url) = &self.url {
            text.push_str(&format!("DATABASE_URL={}\n", url.expose()));
        }
        if let Some(pid) = self.proxy_pid {
            text.push_str(&format!("PGHARNESS_RDS_PROXY_PID={pid}\n"));
        }
        if let Some(started) = self.proxy_started {
            text.push_str(&format!("PGHARNESS_RDS_PROXY_STARTED={started}\n"));
        }
        text.push_str(&format!(
            "PGHARNESS_WORKSPACE={}\n",
            settings.root.display()
        ));
        if let Some(session) = &self.session {
            text.push_str(&format!("PGHARNESS_RDS_SESSION={session}\n"));
        }
        let temporary = path.with_extension("tmp");
        let _ = std::fs::remove_file(&temporary);
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .map_err(|e| Error::io("failed to create", &temporary, e))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .map_err(|e| Error::io("failed to write", &temporary, e))?;
        std::fs::rename(&temporary, &path).map_err(|e| Error::io("failed to write", &path, e))?;
        let service = service_file_path(settings);
        match self
            .url
            .as_ref()
            .and_then(|url| service_section(url.expose()))
        {
            Some(section) => super::secret::write_private(&service, &section),
            None => match std::fs::remove_file(&service) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    Err(Error::io("failed to remove", &service, e))
                }
                _ => Ok(()),
            },
        }
    }

    /// The background proxy, as recorded (pid and start time).
    pub fn proxy(&self) -> Option<super::ProcessId> {
        Some(super::ProcessId {
            pid: self.proxy_pid?,
            started: self.proxy_started?,
        })
    }

    /// Whether its background proxy still runs: the recorded process itself, not another
    /// that has its pid now.
    pub fn proxy_alive(&self) -> bool {
        self.proxy().is_some_and(|proxy| proxy.is_running())
    }
}

const START_IT: &str = "start it with `cargo pgharness up --backend rds` (or run the tests with `cargo pgharness test --backend rds`)";

/// After a connection to the proxy failed: the error that names a proxy which is gone, if
/// it is (its pid no longer runs, or the env file is gone with it). A connection refused by
/// a dead proxy is not worth waiting out, and "connection refused" alone does not say why.
pub(crate) fn proxy_gone(state_dir: &std::path::Path) -> Option<Error> {
    let file = EnvFile::read_in(state_dir).ok()?;
    match file {
        Some(file) if file.backend == "rds" && file.proxy_alive() => None,
        Some(file) if file.backend == "rds" => Some(Error::Backend {
            backend: "rds",
            message: format!(
                "the RDS proxy (pid {}) is not running (it stopped or was killed during the run); {START_IT}",
                file.proxy_pid.unwrap_or_default()
            ),
        }),
        _ => Some(Error::Backend {
            backend: "rds",
            message: format!(
                "the RDS proxy stopped during the run ({} is gone); {START_IT}",
                state_dir.join("env").display()
            ),
        }),
    }
}

/// The server the run's RDS proxy serves.
pub(crate) fn ensure(settings: &Settings) -> Result<Server, Error> {
    let fix = START_IT;
    let file = EnvFile::read(settings)?
        .filter(|f| f.backend == "rds")
        .ok_or_else(|| Error::Backend {
            backend: "rds",
            message: format!(
                "no RDS proxy is running for this workspace ({} has none); {fix}",
                env_file_path(settings).display()
            ),
        })?;
    if !file.proxy_alive() {
        return Err(Error::Backend {
            backend: "rds",
            message: format!(
                "the RDS proxy (pid {}) is not running; {fix}",
                file.proxy_pid.unwrap_or_default()
            ),
        });
    }
    let url = file.url.ok_or_else(|| Error::Backend {
        backend: "rds",
        message: format!("the env file has no DATABASE_URL; {fix}"),
    })?;
    Server::from_url(BackendKind::Rds, url)
}

/// Whether the run's RDS proxy runs.
pub(crate) fn is_running(settings: &Settings) -> bool {
    matches!(EnvFile::read(settings), Ok(Some(file)) if file.backend == "rds" && file.proxy_alive())
}

#[cfg(test)]
mod tests {
    use super::service_section;

    #[test]
    fn the_service_section_decodes_the_url() {
        assert_eq!(
            service_section("postgres://iam%40app:p%2Fw@127.0.0.1:6000/app%20db").as_deref(),
            Some(
                "[pgharness]\nhost=127.0.0.1\nport=6000\nuser=iam@app\npassword=p/w\ndbname=app db\n"
            )
        );
        // The native server's URL: its socket directory as the host, percent-encoded.
        assert_eq!(
            service_section("postgres://u@%2Fdev%2Fshm%2Fpgh%2Fsock:40939/postgres").as_deref(),
            Some("[pgharness]\nhost=/dev/shm/pgh/sock\nport=40939\nuser=u\ndbname=postgres\n")
        );
        assert_eq!(service_section("not a url"), None);
    }
}
