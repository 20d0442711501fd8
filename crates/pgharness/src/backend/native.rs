//! The `native` backend: `initdb` + `postgres` from the local Postgres binaries, one server
//! per workspace shared by every test process under a file lock. Data lives on tmpfs
//! (`/dev/shm`) when there is one. The server listens only on a Unix socket in a 0700
//! directory of its user (no port for another local user to squat or to try passwords
//! on); `native_tcp` adds a TCP listener on 127.0.0.1 with password login. As root it runs
//! the server as an unprivileged user, since postgres refuses to run as root. A small watchdog shell process owns the server
//! and stops it after `native_idle` with no client connected, or on `cargo pgharness down`.
//!
//! **Nothing can be planted.** Each start makes the server's directory anew under a name
//! nobody can predict (`pgharness-<key>-<random>`), exclusively and 0700, and everything in
//! it is created exclusively (`create_new`: an existing name, a symlink among them, is an
//! error) while only this process can write there; the server's account gets it after.
//! Its path is kept in the workspace's own record (`target/pgharness/native-<key>.json`).
//! A directory another local user made under any name is never used, followed or removed.

use std::fs::File;
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::unistd::User;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{ProcessId, secret};
use crate::connect;
use crate::error::Error;
use crate::events::{Event, EventSink, emit};
use crate::server::Server;
use crate::settings::{BackendKind, Settings};

const WATCHDOG: &str = include_str!("native_watchdog.sh");

/// Who may log in, and how: anyone who can reach the Unix socket (a 0700 directory of the
/// server's account) without a password; over TCP (`native_tcp`) the tests' and other login
/// roles with their passwords, and never the administrator, whose password would make any
/// local user who learned it a superuser able to run programs as the server's account.
const HBA: &str = "\
local all all trust
host all postgres all reject
host all all 127.0.0.1/32 scram-sha-256
host all all ::1/128 scram-sha-256
";

fn backend_error(message: impl Into<String>) -> Error {
    Error::Backend {
        backend: "native",
        message: message.into(),
    }
}

/// What a running native server left behind for the next test process.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    watchdog_pid: i32,
    /// The watchdog's start time: with the pid, what names the process (`ProcessId`). A
    /// record without it (an older version's) is never signalled.
    #[serde(default)]
    watchdog_started: Option<u64>,
    /// The workspace that started the server: a record copied into another checkout (`cp -a`)
    /// is never used, stopped or deleted from there.
    #[serde(default)]
    workspace: Option<PathBuf>,
    /// The uid the server runs as: the listener on `port` must be its, or the port is
    /// another local user's now and no password is sent there.
    #[serde(default)]
    server_uid: Option<u32>,
    port: u16,
    /// Whether it listens on TCP 127.0.0.1 too (`native_tcp`); a record without it (an
    /// older version's) did.
    #[serde(default = "listened_on_tcp")]
    tcp: bool,
    base_dir: PathBuf,
    bindir: PathBuf,
}

fn listened_on_tcp() -> bool {
    true
}

impl State {
    fn watchdog(&self) -> Option<ProcessId> {
        self.watchdog_started.map(|started| ProcessId {
            pid: self.watchdog_pid,
            started,
        })
    }

    /// The directory of its Unix socket (`.s.PGSQL.<port>`) when tests reach it there; none
    /// when it listens on TCP.
    fn socket_dir(&self) -> Option<PathBuf> {
        (!self.tcp).then(|| socket_dir(&self.base_dir))
    }

    /// The server as tests reach it: over TCP when it listens there, else its socket.
    fn server(&self, password: &str) -> Server {
        let server = Server::local_at(
            BackendKind::Native,
            self.socket_dir().as_deref(),
            self.port,
            password,
        );
        // Over TCP the administrator is refused (`HBA`): it goes through the socket.
        if self.tcp {
            server.with_admin_socket(&socket_dir(&self.base_dir), self.port)
        } else {
            server
        }
    }

    /// Where it listens, for messages.
    fn describe(&self) -> String {
        listener(self.tcp, &self.base_dir, self.port)
    }

    /// Whether the record was written by this workspace's own server.
    fn belongs_to(&self, settings: &Settings) -> bool {
        self.workspace.as_deref() == Some(settings.root.as_path())
    }
}

/// Finds the directory holding `initdb` and `postgres`: `PGHARNESS_PG_BIN`, then
/// `pg_config --bindir`, then PATH, then the newest `/usr/lib/postgresql/*/bin`.
pub fn find_bindir(settings: &Settings) -> Result<PathBuf, Error> {
    let usable = |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
    if let Some(dir) = &settings.pg_bin {
        return if usable(dir) {
            Ok(dir.clone())
        } else {
            Err(backend_error(format!(
                "PGHARNESS_PG_BIN={} has no initdb and postgres (point it at the directory that has both)",
                dir.display()
            )))
        };
    }
    if let Ok(output) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
        if output.status.success() && usable(&dir) {
            return Ok(dir);
        }
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            if usable(&dir) {
                // Resolve symlinks so that `postgres` finds its share directory.
                let real = std::fs::canonicalize(dir.join("postgres"))
                    .ok()
                    .and_then(|p| p.parent().map(Path::to_path_buf))
                    .filter(|d| usable(d))
                    .unwrap_or(dir);
                return Ok(real);
            }
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| usable(dir))
        .collect();
    versions.sort();
    versions.pop().map(|(_, dir)| dir).ok_or_else(|| {
        backend_error(
            "initdb and postgres were not found in PGHARNESS_PG_BIN, `pg_config --bindir`, PATH \
             or /usr/lib/postgresql/*/bin (install the server: `apt-get install postgresql`, \
             or set PGHARNESS_PG_BIN)",
        )
    })
}

fn socket_dir(base: &Path) -> PathBuf {
    base.join("sock")
}

/// Where a server listens, for messages: its TCP address, else its socket.
fn listener(tcp: bool, base: &Path, port: u16) -> String {
    if tcp {
        format!("127.0.0.1:{port}")
    } else {
        socket_dir(base)
            .join(format!(".s.PGSQL.{port}"))
            .display()
            .to_string()
    }
}

struct Paths {
    state: PathBuf,
    lock: PathBuf,
    /// What names this workspace's server among others (the start of its directory's name).
    key: String,
}

fn paths(settings: &Settings, bindir: &Path) -> Paths {
    let mut hasher = Sha256::new();
    hasher.update(settings.root.to_string_lossy().as_bytes());
    hasher.update([0]);
    hasher.update(bindir.to_string_lossy().as_bytes());
    hasher.update(settings.max_connections.to_be_bytes());
    if settings.native_tcp {
        // A server with a TCP listener is another server than the socket-only one.
        hasher.update(b"tcp");
    }
    let key = hex::encode(&hasher.finalize()[..5]);
    Paths {
        state: settings.state_dir.join(format!("native-{key}.json")),
        lock: settings.state_dir.join(format!("native-{key}.lock")),
        key,
    }
}

/// Makes a server's directory: on tmpfs (`/dev/shm`) when there is one, else in the state
/// directory; named `pgharness-<key>-<random>`, created exclusively with mode 0700, so that
/// no other user can have made it, or anything in it, first.
fn make_base(settings: &Settings, key: &str) -> Result<PathBuf, Error> {
    use std::os::unix::fs::DirBuilderExt;
    let shm = Path::new("/dev/shm");
    let parent = if shm.is_dir() {
        shm
    } else {
        &settings.state_dir
    };
    loop {
        let random = uuid::Uuid::new_v4().simple().to_string();
        let base = parent.join(format!("pgharness-{key}-{}", &random[..16]));
        match std::fs::DirBuilder::new().mode(0o700).create(&base) {
            Ok(()) => return Ok(base),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(error) => return Err(Error::io("failed to create", &base, error)),
        }
    }
}

/// Creates a new file only its owner may read or write (`create_new`: never an existing
/// one, never through a symlink) and writes `contents`.
fn write_new(path: &Path, contents: &[u8], mode: u32) -> Result<File, Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = File::options()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| Error::io("failed to create", path, e))?;
    file.write_all(contents)
        .map_err(|e| Error::io("failed to write", path, e))?;
    Ok(file)
}

/// Hands `path` (made by this process, never a symlink) to the server's account.
fn hand_over(path: &Path, user: &Option<User>) -> Result<(), Error> {
    if let Some(user) = user {
        std::os::unix::fs::lchown(path, Some(user.uid.as_raw()), Some(user.gid.as_raw()))
            .map_err(|e| Error::io("failed to hand over", path, e))?;
    }
    Ok(())
}

/// Starts the shared server, or joins it when it already runs.
pub async fn ensure(settings: &Settings, sink: EventSink<'_>) -> Result<Server, Error> {
    let bindir = find_bindir(settings)?;
    let paths = paths(settings, &bindir);
    std::fs::create_dir_all(&settings.state_dir)
        .map_err(|e| Error::io("failed to create", &settings.state_dir, e))?;
    let lock = super::lock_file(&paths.lock).await?;
    let (state, started, password) = match read_state(&paths.state).filter(|s| alive(s, settings)) {
        Some(state) => {
            // A server of an older version has the workspace's password.
            let password = match secret::native_password(settings, state.port) {
                Some(password) => password,
                None => secret::local_password(settings)?,
            };
            (state, false, password)
        }
        None => {
            let (state, password) = start(settings, &bindir, &paths, sink)?;
            (state, true, password)
        }
    };
    let server = state.server(&password);
    let what = format!("the native Postgres server on {}", state.describe());
    let config = server.admin_config();
    let mut ready = tokio::select! {
        ready = connect::wait_ready(&config, settings.acquire_timeout, sink, &what) => ready,
        fatal = startup_failure(&state.base_dir), if started => {
            // A server that exits at start says why at once (its FATAL line), and leaves
            // nothing behind: not its watchdog, not its data on tmpfs, not its record.
            if let Some(watchdog) = state.watchdog() {
                watchdog.terminate(Duration::from_secs(5)).await;
            }
            let _ = std::fs::remove_dir_all(&state.base_dir);
            let _ = std::fs::remove_file(&paths.state);
            let _ = std::fs::remove_file(paths.state.with_extension("password"));
            drop(lock);
            return Err(backend_error(format!(
                "the native Postgres server exited at start: {fatal}; check the settings it was given (max_connections = {}) and the machine's memory",
                settings.max_connections
            )));
        }
    };
    if started && ready.is_ok() {
        ready = secret::lower_scram_cost(&server.admin_config(), &password).await;
    }
    drop(lock);
    ready.map_err(|e| {
        backend_error(format!(
            "{e}; its log: {}",
            state.base_dir.join("server.log").display()
        ))
    })?;
    Ok(server)
}

/// Waits until the server's log says it failed to start (a `FATAL:` or `PANIC:` line, and
/// no `postmaster.pid`: the postmaster removes it when it gives up); returns that line.
async fn startup_failure(base: &Path) -> String {
    let (log, pid_file) = (base.join("server.log"), base.join("data/postmaster.pid"));
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let Ok(text) = std::fs::read_to_string(&log) else {
            continue;
        };
        let fatal = text
            .lines()
            .find(|line| line.contains("FATAL:") || line.contains("PANIC:"));
        if let Some(line) = fatal
            && !pid_file.exists()
        {
            return line.trim().to_owned();
        }
    }
}

/// Whether this workspace's native server runs.
pub fn is_running(settings: &Settings) -> bool {
    let Ok(bindir) = find_bindir(settings) else {
        return false;
    };
    read_state(&paths(settings, &bindir).state).is_some_and(|state| alive(&state, settings))
}

/// Stops this workspace's native servers (for `cargo pgharness down`).
pub async fn stop(settings: &Settings) -> Result<Vec<String>, Error> {
    let records = match std::fs::read_dir(&settings.state_dir) {
        Ok(entries) => entries
            .flatten()
            .map(|entry| entry.path())
            .filter(|path| {
                path.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("native-") && n.ends_with(".json"))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    stop_records(settings, records).await
}

/// Stops the one native server these settings choose (a run's, the emulated cluster's),
/// leaving the workspace's others (another server's settings differ: `native_tcp`,
/// `max_connections`) alone.
pub async fn stop_chosen(settings: &Settings) -> Result<Vec<String>, Error> {
    let Ok(bindir) = find_bindir(settings) else {
        return Ok(Vec::new());
    };
    let state = paths(settings, &bindir).state;
    if !state.exists() {
        return Ok(Vec::new());
    }
    stop_records(settings, vec![state]).await
}

async fn stop_records(settings: &Settings, records: Vec<PathBuf>) -> Result<Vec<String>, Error> {
    let mut stopped = Vec::new();
    for path in records {
        let lock = super::lock_file(&path.with_extension("lock")).await?;
        match read_state(&path) {
            // Copied here with the rest of another checkout: that checkout's server and
            // data are its own. Only the copy of the record goes.
            Some(state) if !state.belongs_to(settings) => {
                tracing::info!(record = %path.display(), "not stopping the native server of another workspace");
            }
            Some(state) => {
                // Only the recorded watchdog itself is signalled, never a process that has
                // its pid now.
                let watchdog = state.watchdog().filter(ProcessId::is_running);
                if let Some(watchdog) = watchdog {
                    watchdog.terminate(Duration::from_secs(30)).await;
                    stopped.push(format!("native server on {}", state.describe()));
                }
                let _ = std::fs::remove_dir_all(&state.base_dir);
            }
            None => {}
        }
        let _ = std::fs::remove_file(&path);
        let _ = std::fs::remove_file(path.with_extension("password"));
        drop(lock);
    }
    Ok(stopped)
}

fn read_state(path: &Path) -> Option<State> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Whether the record names this workspace's server and it still runs, verified before a
/// password goes anywhere: its watchdog (pid and start time), and the listener the record
/// names is the server's user's (the port's on TCP; the socket and its private directory
/// otherwise).
fn alive(state: &State, settings: &Settings) -> bool {
    let ours = state.belongs_to(settings)
        && state
            .watchdog()
            .is_some_and(|watchdog| watchdog.is_running());
    if !ours {
        return false;
    }
    let Some(uid) = state.server_uid else {
        return false;
    };
    let socket_dir = state.socket_dir();
    super::listener_owner(socket_dir.as_deref(), state.port) == Some(uid)
        && match socket_dir {
            Some(dir) => std::os::unix::net::UnixStream::connect(
                dir.join(format!(".s.PGSQL.{}", state.port)),
            )
            .is_ok(),
            None => TcpStream::connect_timeout(
                &(Ipv4Addr::LOCALHOST, state.port).into(),
                Duration::from_secs(1),
            )
            .is_ok(),
        }
}

/// The account a native server runs as when pgharness runs as root.
pub const SERVER_ACCOUNT: &str = "pgharness";

/// The user the server runs as: ourselves, or, when we are root, a dedicated unprivileged
/// account of its own (made on first use). Never the machine's shared `postgres` account:
/// a test is a superuser of its server and can run programs as the server's user (`COPY …
/// TO PROGRAM`); as `postgres` it would log in to every other cluster of that account by
/// peer authentication, the machine's own Postgres included.
fn server_user() -> Result<Option<User>, Error> {
    if !nix::unistd::geteuid().is_root() {
        return Ok(None);
    }
    if let Ok(Some(user)) = User::from_name(SERVER_ACCOUNT) {
        return Ok(Some(user));
    }
    let made = Command::new("useradd")
        .args(["--system", "--user-group", "--no-create-home"])
        .args(["--shell", "/usr/sbin/nologin", "--home-dir", "/nonexistent"])
        .arg(SERVER_ACCOUNT)
        .output();
    if let Ok(Some(user)) = User::from_name(SERVER_ACCOUNT) {
        return Ok(Some(user));
    }
    let why = match made {
        Ok(output) => String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        Err(error) => error.to_string(),
    };
    Err(backend_error(format!(
        "running as root, the native server needs an unprivileged account of its own, and \
         `useradd --system --user-group {SERVER_ACCOUNT}` failed ({why}); create it yourself, \
         or run as a user other than root"
    )))
}

fn free_port() -> Result<u16, Error> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .map_err(|e| Error::io("failed to find a free port on", "127.0.0.1", e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::io("failed to find a free port on", "127.0.0.1", e))
}

fn as_user(command: &mut Command, user: &Option<User>) {
    if let Some(user) = user {
        command.uid(user.uid.as_raw()).gid(user.gid.as_raw());
        command.env("HOME", &user.dir);
    }
}

/// Starts a server with a password of its own (made anew at each start: one a local user
/// learned from an earlier server opens nothing now); returns its record and password. The
/// port names its socket (`.s.PGSQL.<port>`), and is its TCP port with `native_tcp`.
fn start(
    settings: &Settings,
    bindir: &Path,
    paths: &Paths,
    sink: EventSink<'_>,
) -> Result<(State, String), Error> {
    let user = server_user()?;
    let port = free_port()?;
    let password =
        secret::renew_native_password(settings, &paths.state.with_extension("password"), port)?;
    let password = password.as_str();
    // The last server's directory, from the workspace's own record (never a path guessed).
    if let Some(old) = read_state(&paths.state).filter(|s| s.belongs_to(settings)) {
        let _ = std::fs::remove_dir_all(&old.base_dir);
    }
    let base = &make_base(settings, &paths.key)?;
    let data = base.join("data");
    for dir in [&data, &socket_dir(base)] {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(dir)
            .map_err(|e| Error::io("failed to create", dir, e))?;
    }
    emit(
        sink,
        Event::InitialisingCluster {
            data_dir: data.display().to_string(),
        },
    );
    // The Unix socket is in a 0700 directory of the server's user, so trust there admits
    // nobody else (and costs no SCRAM handshake). TCP on 127.0.0.1, with `native_tcp`,
    // asks for the server's password.
    let pwfile = base.join("pwfile");
    write_new(&pwfile, format!("{password}\n").as_bytes(), 0o600)?;
    let script = base.join("watchdog.sh");
    write_new(&script, WATCHDOG.as_bytes(), 0o600)?;
    let log_path = base.join("server.log");
    let log = write_new(&log_path, b"", 0o600)?;
    let hba = base.join("pg_hba.conf");
    write_new(&hba, HBA.as_bytes(), 0o600)?;
    // Everything made: now the server's account's (its directories before their contents).
    for path in [
        base,
        &data,
        &socket_dir(base),
        &pwfile,
        &script,
        &log_path,
        &hba,
    ] {
        hand_over(path, &user)?;
    }
    let mut initdb = Command::new(bindir.join("initdb"));
    initdb
        .arg("-D")
        .arg(&data)
        .arg(format!("--pwfile={}", pwfile.display()))
        .args([
            "-U",
            secret::ADMIN_USER,
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ])
        .current_dir(base)
        .stdin(Stdio::null());
    as_user(&mut initdb, &user);
    let output = initdb.output();
    let _ = std::fs::remove_file(&pwfile);
    let output = output.map_err(|e| Error::io("failed to run", bindir.join("initdb"), e))?;
    if !output.status.success() {
        return Err(backend_error(format!(
            "initdb failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )));
    }

    emit(
        sink,
        Event::StartingServer {
            listen: listener(settings.native_tcp, base, port),
        },
    );
    let mut watchdog = Command::new("sh");
    watchdog
        .arg(&script)
        .env("PGH_BIN", bindir)
        .env("PGH_DATA", &data)
        .env("PGH_SOCK", socket_dir(base))
        .env("PGH_BASE", base)
        .env("PGH_HBA", &hba)
        .env("PGH_PORT", port.to_string())
        .env(
            "PGH_LISTEN",
            if settings.native_tcp { "127.0.0.1" } else { "" },
        )
        .env(
            "PGH_IDLE",
            settings.native_idle.as_secs().max(1).to_string(),
        )
        .env("PGH_MAX_CONNECTIONS", settings.max_connections.to_string())
        .current_dir(base)
        .stdin(Stdio::null())
        .stdout(
            log.try_clone()
                .map_err(|e| Error::io("failed to open", &log_path, e))?,
        )
        .stderr(log)
        // Its own process group: Ctrl-C in the terminal and nextest's cleanup of a test's
        // process group leave the shared server alone.
        .process_group(0);
    as_user(&mut watchdog, &user);
    let child = watchdog
        .spawn()
        .map_err(|e| Error::io("failed to start", &script, e))?;
    let watchdog = ProcessId::of(child.id() as i32);
    let state = State {
        watchdog_pid: child.id() as i32,
        watchdog_started: watchdog.map(|w| w.started),
        workspace: Some(settings.root.clone()),
        server_uid: Some(
            user.as_ref()
                .map_or_else(|| nix::unistd::geteuid().as_raw(), |u| u.uid.as_raw()),
        ),
        port,
        tcp: settings.native_tcp,
        base_dir: base.clone(),
        bindir: bindir.to_path_buf(),
    };
    let text = serde_json::to_string_pretty(&state).unwrap_or_default();
    std::fs::write(&paths.state, text)
        .map_err(|e| Error::io("failed to write", &paths.state, e))?;
    tracing::info!(listen = %state.describe(), data = %data.display(), "started native Postgres");
    Ok((state, password.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_wrong_pg_bin_is_named_with_the_fix() {
        let mut settings = Settings::load_from(Path::new("/nonexistent"), Vec::new()).unwrap();
        settings.pg_bin = Some(PathBuf::from("/nonexistent/bin"));
        let error = find_bindir(&settings).unwrap_err().to_string();
        assert!(
            error.contains("PGHARNESS_PG_BIN=/nonexistent/bin"),
            "{error}"
        );
    }
}
