//! The processes pgharness starts and records (a native server's watchdog, the RDS proxy,
//! fake-aws), named by pid *and* start time. A recorded pid outlives its process: the kernel
//! hands it to the next process that comes along, and a record that named the pid alone
//! would have `down` send SIGTERM to whatever runs under it now. A pid whose start time is
//! not the recorded one is not ours: never signalled, never taken for running.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// A process as recorded: its pid and when it started (clock ticks after boot, the kernel's
/// `starttime` in `/proc/<pid>/stat`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcessId {
    /// The pid.
    pub pid: i32,
    /// Its start time, in clock ticks after boot.
    pub started: u64,
}

/// The state and start time fields of `/proc/<pid>/stat`.
fn stat(pid: i32) -> Option<(String, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: fields count after it.
    let (_, rest) = text.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of the stat line, starttime field 22.
    let state = fields.first()?.to_string();
    let started = fields.get(19)?.parse().ok()?;
    Some((state, started))
}

impl ProcessId {
    /// The process running under `pid` now, if any.
    pub fn of(pid: i32) -> Option<ProcessId> {
        let (_, started) = stat(pid)?;
        Some(ProcessId { pid, started })
    }

    /// This process.
    pub fn current() -> ProcessId {
        let pid = std::process::id() as i32;
        ProcessId::of(pid).unwrap_or(ProcessId { pid, started: 0 })
    }

    /// Whether the recorded process still runs: its pid is in use, not by a zombie, and by
    /// a process that started when the recorded one did.
    pub fn is_running(&self) -> bool {
        match stat(self.pid) {
            Some((state, started)) => {
                started == self.started && !matches!(state.as_str(), "Z" | "X")
            }
            None => false,
        }
    }

    /// Sends SIGTERM if the recorded process still runs (never to a pid that another
    /// process now has), and waits up to `timeout` for it to go; true when it is gone.
    pub async fn terminate(&self, timeout: Duration) -> bool {
        if !self.is_running() {
            return true;
        }
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid),
            nix::sys::signal::Signal::SIGTERM,
        );
        let deadline = std::time::Instant::now() + timeout;
        while self.is_running() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        !self.is_running()
    }
}

/// `pid:started`, as records hold it.
impl fmt::Display for ProcessId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.pid, self.started)
    }
}

impl FromStr for ProcessId {
    type Err = String;

    fn from_str(text: &str) -> Result<ProcessId, String> {
        let (pid, started) = text
            .split_once(':')
            .ok_or_else(|| format!("`{text}` is not pid:started"))?;
        Ok(ProcessId {
            pid: pid.parse().map_err(|e| format!("`{pid}`: {e}"))?,
            started: started.parse().map_err(|e| format!("`{started}`: {e}"))?,
        })
    }
}

/// The owner (uid) of the socket listening on loopback `port`, from `/proc/net/tcp` and
/// `tcp6`. Before a password goes to a port it was recorded on, this says whether the
/// listener there now is the server pgharness started (its uid) or something another local
/// user bound to the port after the server went away (A3 in issue 18). `None`: nothing
/// listens there (or /proc has no answer).
///
/// The kernel lists listening sockets first (its listening hash, then the established one),
/// so reading stops at the first socket in another state: the whole table, thousands of
/// TIME_WAIT lines after a test run, takes ~10 ms to generate; its head, a fraction of one.
pub fn listener_uid(port: u16) -> Option<u32> {
    use std::io::BufRead;
    let wanted = format!("{port:04X}");
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(file) = std::fs::File::open(table) else {
            continue;
        };
        for line in std::io::BufReader::new(file).lines().skip(1) {
            let Ok(line) = line else {
                break;
            };
            let fields: Vec<&str> = line.split_whitespace().collect();
            // sl, local_address, rem_address, st, tx:rx, tr:when, retrnsmt, uid, …
            let (Some(local), Some(state), Some(uid)) =
                (fields.get(1), fields.get(3), fields.get(7))
            else {
                continue;
            };
            if *state != "0A" {
                break;
            }
            let Some((address, local_port)) = local.rsplit_once(':') else {
                continue;
            };
            let loopback_or_any = matches!(
                address,
                "0100007F"
                    | "00000000"
                    | "00000000000000000000000000000000"
                    | "00000000000000000000000001000000"
            );
            if local_port == wanted && loopback_or_any {
                return uid.parse().ok();
            }
        }
    }
    None
}

/// The uid behind the listener of a server pgharness started: its Unix socket's, in its
/// private `socket_dir`, or the loopback TCP port's when it has no socket directory.
pub fn listener_owner(socket_dir: Option<&std::path::Path>, port: u16) -> Option<u32> {
    match socket_dir {
        Some(dir) => socket_owner(dir, port),
        None => listener_uid(port),
    }
}

/// The uid that owns the Unix socket `.s.PGSQL.<port>` in `dir`, when `dir` is a private
/// directory of that same uid (a real directory, no access for group or others): then
/// nobody else can have made or replaced the socket, and a password sent there reaches
/// that uid's server. `None` otherwise.
pub fn socket_owner(dir: &std::path::Path, port: u16) -> Option<u32> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let dir_meta = std::fs::symlink_metadata(dir).ok()?;
    if !dir_meta.is_dir() || dir_meta.mode() & 0o077 != 0 {
        return None;
    }
    let socket = std::fs::symlink_metadata(dir.join(format!(".s.PGSQL.{port}"))).ok()?;
    (socket.file_type().is_socket() && socket.uid() == dir_meta.uid()).then_some(dir_meta.uid())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_owner_of_a_loopback_listener_is_found() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert_eq!(listener_uid(port), Some(nix::unistd::geteuid().as_raw()));
        drop(listener);
        assert_eq!(listener_uid(port), None);
    }

    #[test]
    fn a_process_is_known_by_its_pid_and_start_time() {
        let me = ProcessId::current();
        assert!(me.started > 0);
        assert!(me.is_running());
        assert_eq!(me.to_string().parse::<ProcessId>(), Ok(me));
        // The same pid with another start time is another process.
        let other = ProcessId {
            started: me.started + 1,
            ..me
        };
        assert!(!other.is_running());
    }

    #[tokio::test]
    async fn a_pid_that_now_belongs_to_another_process_is_not_signalled() {
        let mut sleeper = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = sleeper.id() as i32;
        let recorded = ProcessId {
            pid,
            started: ProcessId::of(pid).unwrap().started.saturating_sub(1),
        };
        assert!(recorded.terminate(Duration::from_secs(1)).await);
        assert!(
            sleeper.try_wait().unwrap().is_none(),
            "the process that has the pid now was signalled"
        );
        // The recorded process itself is signalled (it lingers as our zombie, not running).
        let real = ProcessId::of(pid).unwrap();
        assert!(real.terminate(Duration::from_secs(5)).await);
        let _ = sleeper.wait();
    }
}
