//! The container and native backends: one server shared by concurrent starters, stopped on
//! request, and (native) stopped when idle.
#![cfg(feature = "container")] // the container tests; the default feature

mod common;

use std::time::{Duration, Instant};

use common::isolated_settings;
use pgharness::BackendKind;
use pgharness::backend::{self, container};
use pgharness::events::log_only;

#[tokio::test]
async fn racing_starters_share_one_container_until_it_is_stopped() {
    let settings = isolated_settings(BackendKind::Container, "race");
    let (a, b, c, d) = tokio::join!(
        backend::ensure(&settings, &log_only),
        backend::ensure(&settings, &log_only),
        backend::ensure(&settings, &log_only),
        backend::ensure(&settings, &log_only),
    );
    let ports: Vec<String> = [a, b, c, d]
        .into_iter()
        .map(|s| s.expect("the container starts").describe())
        .collect();
    assert!(ports.windows(2).all(|w| w[0] == w[1]), "{ports:?}");
    assert!(backend::is_running(&settings, BackendKind::Container).await);

    let docker = container::docker().await.unwrap();
    let image = container::resolve_image(&docker, &settings).await.unwrap();
    let server = backend::ensure(&settings, &log_only).await.unwrap();
    let password = String::from_utf8_lossy(server.config().get_password().unwrap()).into_owned();
    let info = docker
        .inspect_container(
            &container::container_name(&settings, &image, &password),
            None,
        )
        .await
        .unwrap();
    let labels = info.config.and_then(|c| c.labels).unwrap_or_default();
    assert_eq!(
        labels.get(container::LABEL_MANAGED).map(String::as_str),
        Some("true")
    );
    assert_eq!(
        labels[container::LABEL_TTL],
        settings.container_ttl.as_secs().to_string()
    );
    let bindings = info
        .host_config
        .as_ref()
        .and_then(|h| h.port_bindings.clone())
        .unwrap_or_default();
    let published: Vec<_> = bindings
        .values()
        .flatten()
        .flatten()
        .map(|b| b.host_ip.clone().unwrap_or_default())
        .collect();
    assert_eq!(published, ["127.0.0.1"], "published on loopback only");
    let mounts = info.host_config.and_then(|h| h.tmpfs).unwrap_or_default();
    assert!(
        mounts.contains_key("/var/lib/postgresql/data"),
        "data must be on tmpfs: {mounts:?}"
    );

    let client = common::admin(&server).await;
    let fsync: String = client.query_one("SHOW fsync", &[]).await.unwrap().get(0);
    assert_eq!(fsync, "off");

    let stopped = backend::stop(&settings, BackendKind::Container)
        .await
        .unwrap();
    assert_eq!(stopped.len(), 1, "{stopped:?}");
    assert!(!backend::is_running(&settings, BackendKind::Container).await);
}

#[tokio::test]
async fn a_container_past_its_deadline_is_reaped_and_not_before() {
    let mut settings = isolated_settings(BackendKind::Container, "reap");
    settings.container_ttl = Duration::from_secs(600);
    backend::ensure(&settings, &log_only)
        .await
        .expect("the container starts");
    let now = std::time::SystemTime::now();
    let kept = container::reap_expired_at(now).await.unwrap();
    assert!(
        backend::is_running(&settings, BackendKind::Container).await,
        "{kept:?}"
    );
    // The clock seam: ten minutes and a bit later, its TTL has passed.
    let removed = container::reap_expired_at(now + Duration::from_secs(660))
        .await
        .unwrap();
    assert!(
        !backend::is_running(&settings, BackendKind::Container).await,
        "{removed:?}"
    );
    assert!(!removed.is_empty());
}

#[tokio::test]
async fn a_missing_image_says_how_to_get_one() {
    let mut settings = isolated_settings(BackendKind::Container, "noimage");
    settings.image = Some("pgharness/does-not-exist:0".into());
    let error = backend::ensure(&settings, &log_only)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("pgharness/does-not-exist:0") && error.contains("could not be pulled"),
        "{error}"
    );
}

#[tokio::test]
async fn native_starters_share_one_server_until_it_is_stopped() {
    let settings = isolated_settings(BackendKind::Native, "native");
    let (a, b) = tokio::join!(
        backend::ensure(&settings, &log_only),
        backend::ensure(&settings, &log_only)
    );
    let (a, b) = (a.expect("native starts"), b.expect("native starts"));
    assert_eq!(a.describe(), b.describe());
    assert!(backend::is_running(&settings, BackendKind::Native).await);
    let client = common::admin(&a).await;
    let row = client
        .query_one(
            "SELECT current_setting('fsync'), current_setting('data_directory')",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "off");
    let data_dir: String = row.get(1);
    assert!(
        data_dir.starts_with("/dev/shm/"),
        "data should be on tmpfs: {data_dir}"
    );
    drop(client);

    let stopped = backend::stop(&settings, BackendKind::Native).await.unwrap();
    assert_eq!(stopped.len(), 1, "{stopped:?}");
    assert!(!backend::is_running(&settings, BackendKind::Native).await);
    assert!(
        a.config().connect(tokio_postgres::NoTls).await.is_err(),
        "the server still answers"
    );
    assert!(
        !std::path::Path::new(&data_dir).exists(),
        "data directory left behind"
    );
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

#[tokio::test]
async fn as_root_the_native_server_runs_as_an_account_of_its_own_not_postgres() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not run: as another user the server runs as that user");
        return;
    }
    let settings = isolated_settings(BackendKind::Native, "account");
    let server = backend::ensure(&settings, &log_only)
        .await
        .expect("native starts");
    let client = common::admin(&server).await;
    let pid: i32 = client
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let uid: u32 = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    let account = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .unwrap()
        .expect("the server's uid is an account");
    assert_eq!(account.name, backend::native::SERVER_ACCOUNT);
    assert_ne!(account.name, "postgres");
    drop(client);
    backend::stop(&settings, BackendKind::Native).await.unwrap();
}

#[tokio::test]
async fn a_copied_checkout_never_uses_stops_or_deletes_the_original_server() {
    let original = isolated_settings(BackendKind::Native, "original");
    let server = backend::ensure(&original, &log_only)
        .await
        .expect("native starts");
    // `cp -a` of the checkout: the copy's target/pgharness holds the original's records.
    let copy = isolated_settings(BackendKind::Native, "copy");
    copy_dir(&original.state_dir, &copy.state_dir);
    assert!(
        backend::known(&copy).is_none(),
        "the copy's tests would connect to the original's server"
    );
    let stopped = backend::stop(&copy, BackendKind::Native).await.unwrap();
    assert!(stopped.is_empty(), "{stopped:?}");
    let client = common::admin(&server).await;
    let data_dir: String = client
        .query_one("SELECT current_setting('data_directory')", &[])
        .await
        .expect("the original's server still answers")
        .get(0);
    assert!(
        std::path::Path::new(&data_dir).is_dir(),
        "its data is still there"
    );
    drop(client);
    // The copy gets a server of its own.
    let own = backend::ensure(&copy, &log_only)
        .await
        .expect("native starts");
    assert_ne!(own.describe(), server.describe());
    backend::stop(&copy, BackendKind::Native).await.unwrap();
    assert_eq!(
        backend::stop(&original, BackendKind::Native)
            .await
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_stale_pid_in_a_server_record_is_never_signalled() {
    let settings = isolated_settings(BackendKind::Native, "stale");
    std::fs::create_dir_all(&settings.state_dir).unwrap();
    // An unrelated process that now has the pid a record names.
    let mut bystander = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .unwrap();
    let pid = bystander.id() as i32;
    let started = backend::ProcessId::of(pid).unwrap().started;
    let base = settings.state_dir.join("stale-base");
    for (name, started) in [("a", Some(started + 1)), ("b", None)] {
        std::fs::create_dir_all(&base).unwrap();
        let record = serde_json::json!({
            "watchdog_pid": pid,
            "watchdog_started": started,
            "workspace": settings.root,
            "port": 1,
            "base_dir": base,
            "bindir": "/usr/lib/postgresql/17/bin",
        });
        std::fs::write(
            settings.state_dir.join(format!("native-{name}.json")),
            record.to_string(),
        )
        .unwrap();
        let stopped = backend::stop(&settings, BackendKind::Native).await.unwrap();
        assert!(stopped.is_empty(), "{stopped:?}");
        assert!(
            bystander.try_wait().unwrap().is_none(),
            "down signalled a process that only has the recorded pid (record {name})"
        );
    }
    bystander.kill().unwrap();
    bystander.wait().unwrap();
}

#[tokio::test]
async fn a_native_server_that_exits_at_start_fails_at_once_with_its_fatal_line() {
    // The machine's Postgres, but a `postgres` that refuses to start as a server (as one
    // given more connection slots than the machine has memory for does).
    let real = backend::native::find_bindir(&isolated_settings(BackendKind::Native, "probe"))
        .expect("the Postgres binaries");
    let bindir =
        std::env::temp_dir().join(format!("pgharness-it-fatal-bin-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir_all(&bindir).unwrap();
    for entry in std::fs::read_dir(&real).unwrap().flatten() {
        if entry.file_name() != "postgres" {
            std::fs::copy(entry.path(), bindir.join(entry.file_name())).unwrap();
        }
    }
    let wrapper = bindir.join("postgres");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\ncase \"$*\" in *fsync=off*) \
             echo 'FATAL:  could not map anonymous shared memory: Cannot allocate memory' >&2; exit 1;; \
             *) exec '{}' \"$@\";; esac\n",
            real.join("postgres").display()
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut settings = isolated_settings(BackendKind::Native, "fatal");
    settings.pg_bin = Some(bindir.clone());
    settings.acquire_timeout = Duration::from_secs(60);
    let started = Instant::now();
    let error = backend::ensure(&settings, &log_only)
        .await
        .expect_err("the server cannot start");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "waited {:?}: the FATAL line was not noticed",
        started.elapsed()
    );
    let text = error.to_string();
    assert!(text.contains("exited at start"), "{text}");
    assert!(text.contains("Cannot allocate memory"), "{text}");
    // Nothing left: no data on tmpfs, no record, no watchdog.
    let leftovers: Vec<_> = std::fs::read_dir(&settings.state_dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("native-") && name.ends_with(".json"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert!(!backend::is_running(&settings, BackendKind::Native).await);
    let _ = std::fs::remove_dir_all(&bindir);
}

/// A listener of another local user (`nobody`) on `port` that asks whoever connects for a
/// cleartext password and prints what it gets.
/// Once the server on `port` has gone, another local user (nobody) takes the port and asks
/// for a cleartext password: the recorded server is not believed, a test of the workspace
/// gets a server of its own, and the squatter gets no connection at all.
async fn squat_then_test(settings: &pgharness::Settings, port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while backend::listener_uid(port).is_some() {
        assert!(Instant::now() < deadline, "the port was not given up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    use std::io::BufRead;
    use std::os::unix::process::CommandExt;
    let mut squatter = std::process::Command::new("python3")
        .args(["-c", SQUATTER, &port.to_string()])
        .uid(65534)
        .gid(65534)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut said = std::io::BufReader::new(squatter.stdout.take().unwrap());
    let mut line = String::new();
    said.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "listening");
    assert!(
        backend::known(settings).is_none(),
        "a record whose port another user's process holds is believed"
    );
    let db = pgharness::TestDb::builder()
        .settings(settings.clone())
        .without_migrations()
        .build()
        .await
        .expect("a server of its own is started");
    assert_ne!(db.server().config().get_ports()[0], port);
    drop(db);
    squatter.kill().unwrap();
    squatter.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut said, &mut rest).unwrap();
    assert!(
        !rest.contains("connection"),
        "a test process connected to another user's listener: {rest}"
    );
}

const SQUATTER: &str = r#"
import socket, struct, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
print("listening", flush=True)
while True:
    c, _ = s.accept()
    print("connection", flush=True)
    c.recv(65536)
    c.sendall(b"R" + struct.pack("!ii", 8, 3))
    print("got", c.recv(65536), flush=True)
    c.close()
"#;

#[tokio::test]
async fn the_container_s_server_has_no_password_in_its_environment_and_no_host_account() {
    let settings = isolated_settings(BackendKind::Container, "container-secret");
    let docker = container::docker().await.unwrap();
    let image = container::resolve_image(&docker, &settings).await.unwrap();
    if image != container::LOCAL_IMAGE {
        // The official image's entrypoint exports the password to the server itself.
        eprintln!("not run: {image} is not pgharness's own image");
        return;
    }
    let server = backend::ensure(&settings, &log_only)
        .await
        .expect("the container starts");
    let password = String::from_utf8_lossy(server.config().get_password().unwrap()).into_owned();
    let name = container::container_name(&settings, &image, &password);
    // Not in the container's configuration (what `docker inspect` shows)…
    let info = docker.inspect_container(&name, None).await.unwrap();
    let env = info.config.and_then(|c| c.env).unwrap_or_default();
    assert!(
        env.iter().all(|e| !e.contains(&password)),
        "the container's environment holds the password"
    );
    // …nor in its processes' environments, which the host shows to their uid.
    let top = docker.top_processes(&name, None).await.unwrap();
    let titles = top.titles.unwrap_or_default();
    let pid_column = titles.iter().position(|t| t == "PID").unwrap();
    let pids: Vec<i32> = top
        .processes
        .unwrap_or_default()
        .iter()
        .filter_map(|row| row.get(pid_column)?.parse().ok())
        .collect();
    assert!(!pids.is_empty());
    for pid in pids {
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&environ).contains(&password),
            "process {pid} of the container has the password in its environment"
        );
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let uid: u32 = status
            .lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap();
        assert!(
            nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
                .unwrap()
                .is_none(),
            "process {pid} of the container runs as uid {uid}, a host account"
        );
    }
    backend::stop(&settings, BackendKind::Container)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_port_another_user_took_after_the_server_stopped_gets_no_password() {
    if !nix::unistd::geteuid().is_root() {
        // Binding a port as another user needs root; CI runs as root.
        eprintln!("not run: needs root to run a listener as another user");
        return;
    }
    // A server with a TCP listener (`native_tcp`): by default there is no port to squat.
    let mut settings = isolated_settings(BackendKind::Native, "squat");
    settings.native_tcp = true;
    let server = backend::ensure(&settings, &log_only)
        .await
        .expect("native starts");
    let port = server.config().get_ports()[0];
    // The server goes away and leaves its records (as when it idles out).
    let record = std::fs::read_dir(&settings.state_dir)
        .unwrap()
        .flatten()
        .find(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("native-") && name.ends_with(".json")
        })
        .expect("the native record");
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(record.path()).unwrap()).unwrap();
    let watchdog = state["watchdog_pid"].as_i64().unwrap() as i32;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(watchdog),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    squat_then_test(&settings, port).await;
    backend::stop(&settings, BackendKind::Native).await.unwrap();
}

#[tokio::test]
async fn a_container_port_another_user_took_after_the_container_went_gets_no_password() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("not run: needs root to run a listener as another user");
        return;
    }
    let settings = isolated_settings(BackendKind::Container, "container-squat");
    let server = backend::ensure(&settings, &log_only)
        .await
        .expect("the container starts");
    let port = server.config().get_ports()[0];
    assert!(
        backend::known(&settings).is_some(),
        "the container is recorded"
    );
    // The container goes behind pgharness's back (`docker rm -f`, a daemon restart) and its
    // record stays.
    let root = settings.root.display().to_string();
    let ids = std::process::Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label={}={root}", container::LABEL_ROOT))
        .output()
        .expect("docker");
    let ids = String::from_utf8_lossy(&ids.stdout).to_string();
    assert_eq!(ids.lines().count(), 1, "{ids}");
    let removed = std::process::Command::new("docker")
        .args(["rm", "-f", ids.trim()])
        .output()
        .expect("docker");
    assert!(removed.status.success());
    squat_then_test(&settings, port).await;
    backend::stop(&settings, BackendKind::Container)
        .await
        .unwrap();
}

/// A server started anew refuses the password of the one before it (on its TCP port), and
/// psql finds the new one in pgpass.
async fn only_the_new_password_opens(
    settings: &pgharness::Settings,
    server: &pgharness::Server,
    old: Vec<u8>,
) {
    let mut stale = server.config();
    stale.password(old);
    let error = stale
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("the old password is refused");
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{error}"
    );
    let port = server.config().get_ports()[0].to_string();
    let psql = std::process::Command::new("psql")
        .env("PGPASSFILE", backend::secret::pgpass_path(settings))
        .args(["-h", "127.0.0.1", "-p", &port, "-U", pgharness::TESTS_ROLE])
        .args(["-d", "postgres", "-w", "-XAtc", "SELECT 1"])
        .output()
        .expect("psql");
    assert!(
        psql.status.success(),
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
}

#[tokio::test]
async fn each_container_has_a_password_of_its_own() {
    let settings = isolated_settings(BackendKind::Container, "container-per-start");
    let first = backend::ensure(&settings, &log_only)
        .await
        .expect("the container starts");
    let old = first.config().get_password().unwrap().to_vec();
    // Joining the running container keeps its password.
    let joined = backend::ensure(&settings, &log_only).await.expect("joins");
    assert_eq!(joined.describe(), first.describe());
    assert_eq!(joined.config().get_password().unwrap(), &old[..]);
    backend::stop(&settings, BackendKind::Container)
        .await
        .unwrap();
    let second = backend::ensure(&settings, &log_only)
        .await
        .expect("a new container starts");
    assert_ne!(second.config().get_password().unwrap(), &old[..]);
    only_the_new_password_opens(&settings, &second, old).await;
    backend::stop(&settings, BackendKind::Container)
        .await
        .unwrap();
}

#[tokio::test]
async fn each_native_server_start_has_a_password_of_its_own() {
    // Over TCP (`native_tcp`), where the password is what admits a client.
    let mut settings = isolated_settings(BackendKind::Native, "per-start");
    settings.native_tcp = true;
    let first = backend::ensure(&settings, &log_only)
        .await
        .expect("native starts");
    let old = first.config().get_password().unwrap().to_vec();
    backend::stop(&settings, BackendKind::Native).await.unwrap();
    let second = backend::ensure(&settings, &log_only)
        .await
        .expect("native starts again");
    assert_ne!(second.config().get_password().unwrap(), &old[..]);
    only_the_new_password_opens(&settings, &second, old).await;
    backend::stop(&settings, BackendKind::Native).await.unwrap();
}

#[tokio::test]
async fn an_idle_native_server_stops_by_itself() {
    let mut settings = isolated_settings(BackendKind::Native, "idle");
    settings.native_idle = Duration::from_secs(1);
    backend::ensure(&settings, &log_only)
        .await
        .expect("native starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while backend::is_running(&settings, BackendKind::Native).await {
        assert!(Instant::now() < deadline, "the idle server did not stop");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    backend::stop(&settings, BackendKind::Native).await.unwrap();
}

#[tokio::test]
async fn auto_without_any_backend_lists_what_it_tried() {
    let mut settings = isolated_settings(BackendKind::Auto, "nothing");
    settings.image = Some("pgharness/does-not-exist:0".into());
    settings.pg_bin = Some("/nonexistent/bin".into());
    let error = backend::ensure(&settings, &log_only)
        .await
        .unwrap_err()
        .to_string();
    for expected in [
        "url: PGHARNESS_URL is not set",
        "container:",
        "native: PGHARNESS_PG_BIN=/nonexistent/bin",
    ] {
        assert!(
            error.contains(expected),
            "missing `{expected}` in:\n{error}"
        );
    }
}

#[tokio::test]
async fn test_processes_connect_straight_to_the_recorded_server_and_fall_back_when_it_is_gone() {
    let settings = isolated_settings(BackendKind::Native, "known");
    assert!(backend::known(&settings).is_none(), "nothing recorded yet");
    let server = backend::ensure(&settings, &log_only)
        .await
        .expect("native starts");
    let recorded = backend::known(&settings).expect("ensure records the server it started");
    assert_eq!(recorded.describe(), server.describe());

    // A stale record (a port nobody listens on) is not believed: its port has no listener of
    // the server's user. The full check finds the real server and the test gets its schema
    // there.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let stale_port = closed.local_addr().unwrap().port();
    drop(closed);
    let record = settings.state_dir.join("server-native.json");
    let text = std::fs::read_to_string(&record).unwrap();
    let port = server.config().get_ports()[0];
    std::fs::write(
        &record,
        text.replace(
            &format!("\"port\":{port}"),
            &format!("\"port\":{stale_port}"),
        ),
    )
    .unwrap();
    assert!(
        backend::known(&settings).is_none(),
        "a record naming a port without the server's listener is believed"
    );
    std::fs::write(&record, &text).unwrap();
    assert!(backend::known(&settings).is_some());
    // A socket directory that others could write to is not believed either: a socket
    // there may be anyone's.
    let socket_dir = match server.config().get_hosts()[0].clone() {
        tokio_postgres::config::Host::Unix(dir) => dir,
        other => panic!("the native server is reached through its socket, not {other:?}"),
    };
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o733)).unwrap();
    let believed = backend::known(&settings).is_some();
    std::fs::set_permissions(&socket_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(
        !believed,
        "a record naming a socket in a shared directory is believed"
    );
    std::fs::write(
        &record,
        text.replace(
            &format!("\"port\":{port}"),
            &format!("\"port\":{stale_port}"),
        ),
    )
    .unwrap();
    let db = pgharness::TestDb::builder()
        .settings(settings.clone())
        .without_migrations()
        .build()
        .await
        .expect("falls back to the running server");
    assert_eq!(db.server().describe(), server.describe());
    drop(db);
    assert_eq!(
        backend::known(&settings).unwrap().describe(),
        server.describe(),
        "the record is mended"
    );

    backend::stop(&settings, BackendKind::Native).await.unwrap();
    assert!(
        backend::known(&settings).is_none(),
        "a stopped server is forgotten"
    );
}

/// psql's arguments to run `sql` as the superuser on `host` (an address or a socket
/// directory) and `port`.
fn psql_args<'a>(host: &'a str, port: &'a str, sql: &'a str) -> [&'a str; 10] {
    [
        "-h", host, "-p", port, "-U", "postgres", "-d", "postgres", "-XAtc", sql,
    ]
}

/// psql as another OS user (nobody), with no password of its own; its output.
fn psql_as_nobody(args: &[&str]) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "psql"])
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", "/nonexistent")
        .output()
        .expect("setpriv and psql run")
}

#[tokio::test]
async fn another_os_user_cannot_log_in_to_a_server_pgharness_started() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test switches to another OS user: run it as root (CI does)"
    );
    // By default, and with a TCP listener asked for (`native_tcp`).
    for tcp in [false, true] {
        let mut settings = isolated_settings(BackendKind::Native, "auth");
        settings.native_tcp = tcp;
        let server = backend::ensure(&settings, &log_only)
            .await
            .expect("native starts");
        let port = server.config().get_ports()[0].to_string();
        let over_tcp = psql_as_nobody(&psql_args(
            "127.0.0.1",
            &port,
            "COPY (SELECT 1) TO PROGRAM 'true'",
        ));
        assert!(
            !over_tcp.status.success(),
            "another user logged in over TCP"
        );
        let said = String::from_utf8_lossy(&over_tcp.stderr);
        if tcp {
            // The superuser is refused over TCP, whoever asks.
            assert!(said.contains("pg_hba.conf rejects"), "{said}");
            // And with it, the superuser is still refused over TCP (N2 of issue 27); the
            // tests' role gets in.
            let password = server.config().get_password().unwrap().to_vec();
            let mut over_tcp = tokio_postgres::Config::new();
            over_tcp
                .host("127.0.0.1")
                .port(port.parse().unwrap())
                .dbname("postgres")
                .password(password);
            let admin = over_tcp
                .clone()
                .user("postgres")
                .connect(tokio_postgres::NoTls)
                .await
                .err()
                .expect("the superuser logged in over TCP with the server's password");
            assert!(
                admin
                    .as_db_error()
                    .is_some_and(|e| e.message().contains("pg_hba.conf rejects")),
                "{admin:?}"
            );
            let (tests, connection) = over_tcp
                .clone()
                .user(pgharness::TESTS_ROLE)
                .connect(tokio_postgres::NoTls)
                .await
                .expect("the tests' role logs in over TCP");
            tokio::spawn(connection);
            let superuser: bool = tests
                .query_one(
                    "SELECT rolsuper FROM pg_roles WHERE rolname = current_user",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert!(!superuser);
            // The administrator still gets in, through the socket.
            common::admin(&server).await;
        } else {
            // No TCP listener at all: no port to try passwords on, none to squat.
            assert!(said.contains("refused"), "{said}");
            assert_eq!(backend::listener_uid(port.parse().unwrap()), None);
        }
        // Over the Unix socket: its directory admits only the server's user.
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_dir(&settings.state_dir)
                .unwrap()
                .flatten()
                .find(|e| {
                    e.file_name().to_string_lossy().starts_with("native-")
                        && e.file_name().to_string_lossy().ends_with(".json")
                })
                .map(|e| std::fs::read_to_string(e.path()).unwrap())
                .unwrap(),
        )
        .unwrap();
        let sock = std::path::Path::new(state["base_dir"].as_str().unwrap()).join("sock");
        let socket = psql_as_nobody(&psql_args(sock.to_str().unwrap(), &port, "SELECT 1"));
        assert!(
            !socket.status.success(),
            "another user logged in over the socket"
        );

        // The secret files are the owner's alone.
        let pgpass = settings.state_dir.join("pgpass");
        use std::os::unix::fs::PermissionsExt;
        let passwords: Vec<std::path::PathBuf> = std::fs::read_dir(&settings.state_dir)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.to_string_lossy().ends_with(".password"))
            .collect();
        assert_eq!(passwords.len(), 1, "the server's own password file");
        for file in std::iter::once(&pgpass).chain(&passwords) {
            let mode = std::fs::metadata(file).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", file.display());
        }
        // The owner gets in with the command printed for a kept schema (libpq reads the
        // socket directory from the URL's host, or the password from pgpass).
        let command = server.psql_command("public", &settings.state_dir);
        assert!(
            !command.contains(
                server
                    .config()
                    .get_password()
                    .map_or("-", |p| { std::str::from_utf8(p).unwrap() })
            ),
            "{command}"
        );
        let owner = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("{command} -w -XAtc 'SELECT current_user'"))
            .env_remove("PGPASSWORD")
            .output()
            .unwrap();
        assert!(
            owner.status.success(),
            "{command}: {}",
            String::from_utf8_lossy(&owner.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&owner.stdout).trim(),
            pgharness::TESTS_ROLE
        );
        backend::stop(&settings, BackendKind::Native).await.unwrap();
    }
}

/// Everything logged at any level, for the test that greps it for secrets.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn starting_and_joining_a_container_logs_no_password_at_any_level() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .init();
    let settings = isolated_settings(BackendKind::Container, "secret-logs");
    let server = backend::ensure(&settings, &log_only)
        .await
        .expect("the container starts");
    // Joining inspects the container (its configuration names the password file).
    backend::ensure(&settings, &log_only).await.expect("joins");
    assert!(backend::is_running(&settings, BackendKind::Container).await);
    let password = String::from_utf8_lossy(server.config().get_password().unwrap()).into_owned();
    backend::stop(&settings, BackendKind::Container)
        .await
        .unwrap();
    let logs = String::from_utf8_lossy(&captured.0.lock().unwrap()).into_owned();
    assert!(
        !logs.is_empty(),
        "nothing was captured: the check would prove nothing"
    );
    let leaks: Vec<&str> = logs.lines().filter(|l| l.contains(&password)).collect();
    assert!(
        leaks.is_empty(),
        "the password reached the logs: {leaks:#?}"
    );
}

#[tokio::test]
async fn a_container_whose_password_the_workspace_lost_is_replaced() {
    let settings = isolated_settings(BackendKind::Container, "lost-password");
    let before = backend::ensure(&settings, &log_only).await.expect("starts");
    // `cargo clean` while the container runs: the password file goes, the container stays.
    std::fs::remove_dir_all(&settings.state_dir).unwrap();
    let after = backend::ensure(&settings, &log_only)
        .await
        .expect("a container this workspace can log in to");
    assert_ne!(
        before.config().get_password(),
        after.config().get_password(),
        "a new password"
    );
    common::admin(&after)
        .await
        .query_one("SELECT 1", &[])
        .await
        .unwrap();
    let stopped = backend::stop(&settings, BackendKind::Container)
        .await
        .unwrap();
    assert_eq!(
        stopped.len(),
        1,
        "the old container was removed: {stopped:?}"
    );
}

/// Another local user's account (made on first use), to own what the tests plant.
fn hostile_user() -> nix::unistd::User {
    const NAME: &str = "pgharness-hostile";
    if let Ok(Some(user)) = nix::unistd::User::from_name(NAME) {
        return user;
    }
    let _ = std::process::Command::new("useradd")
        .args([
            "--system",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            NAME,
        ])
        .output();
    nix::unistd::User::from_name(NAME)
        .unwrap()
        .expect("useradd made the second user")
}

/// The directory 1bcc278 gave the native server of `settings`: `/dev/shm/pgharness-<first
/// 5 bytes of sha256(workspace, bindir, max_connections)>`, a name anyone could predict.
fn old_native_dir(settings: &pgharness::Settings) -> std::path::PathBuf {
    use sha2::Digest;
    let bindir = backend::native::find_bindir(settings).unwrap();
    let mut hasher = sha2::Sha256::new();
    hasher.update(settings.root.to_string_lossy().as_bytes());
    hasher.update([0]);
    hasher.update(bindir.to_string_lossy().as_bytes());
    hasher.update(settings.max_connections.to_be_bytes());
    let key = hex::encode(&hasher.finalize()[..5]);
    std::path::Path::new("/dev/shm").join(format!("pgharness-{key}"))
}

/// N1 of issue 27: another user makes the directory the native server would use (the name
/// 1bcc278 derived from the workspace), with symlinks where the server's files go and a
/// subdirectory a process of theirs keeps non-empty. The server starts anyway, in a
/// directory of its own; nothing is written through the links, and what they made is left
/// as they made it.
#[tokio::test]
async fn a_server_directory_another_user_planted_is_never_used_or_followed() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test plants files as another OS user: run it as root (CI does)"
    );
    let settings = isolated_settings(BackendKind::Native, "planted");
    let planted = old_native_dir(&settings);
    let hostile = hostile_user();
    let (uid, gid) = (Some(hostile.uid.as_raw()), Some(hostile.gid.as_raw()));
    // Root's own files the links point at, and a path a copy of the password would go to.
    let victims = std::env::temp_dir().join(format!("pgharness-victims-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&victims).unwrap();
    let victim = victims.join("root-only");
    std::fs::write(&victim, "victim").unwrap();
    std::fs::set_permissions(&victim, std::fs::Permissions::from_mode(0o600)).unwrap();
    let stolen = victims.join("stolen-password");
    std::fs::create_dir(&planted).unwrap();
    std::os::unix::fs::symlink(&victim, planted.join("watchdog.sh")).unwrap();
    std::os::unix::fs::symlink(&victim, planted.join("server.log")).unwrap();
    std::os::unix::fs::symlink(&stolen, planted.join("pwfile")).unwrap();
    std::fs::create_dir(planted.join("sock")).unwrap();
    std::fs::write(planted.join("sock/kept-open"), "theirs").unwrap();
    for path in [
        planted.clone(),
        planted.join("watchdog.sh"),
        planted.join("server.log"),
        planted.join("pwfile"),
        planted.join("sock"),
        planted.join("sock/kept-open"),
    ] {
        std::os::unix::fs::lchown(&path, uid, gid).unwrap();
    }

    let started = backend::ensure(&settings, &log_only).await;
    let untouched = std::fs::read_to_string(&victim).unwrap();
    let victim_meta = std::fs::metadata(&victim).unwrap();
    let stolen_exists = stolen.exists();
    let planted_kept = std::fs::read_to_string(planted.join("sock/kept-open")).ok();
    let links_kept = ["watchdog.sh", "server.log", "pwfile"].map(|name| {
        std::fs::symlink_metadata(planted.join(name)).is_ok_and(|m| m.file_type().is_symlink())
    });
    let state: Option<serde_json::Value> = std::fs::read_dir(&settings.state_dir)
        .unwrap()
        .flatten()
        .find(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("native-") && name.ends_with(".json")
        })
        .and_then(|e| serde_json::from_str(&std::fs::read_to_string(e.path()).unwrap()).ok());
    let base = state
        .as_ref()
        .and_then(|s| s["base_dir"].as_str().map(std::path::PathBuf::from));
    let base_meta = base
        .as_ref()
        .and_then(|b| std::fs::symlink_metadata(b).ok());
    if started.is_ok() {
        backend::stop(&settings, BackendKind::Native).await.unwrap();
    }
    let base_left = base.as_ref().is_some_and(|b| b.exists());
    let _ = std::fs::remove_dir_all(&planted);
    let _ = std::fs::remove_dir_all(&victims);

    started.expect("the server starts whatever another user planted");
    assert_eq!(untouched, "victim", "written through a planted link");
    assert_eq!((victim_meta.uid(), victim_meta.mode() & 0o777), (0, 0o600));
    assert!(
        !stolen_exists,
        "the password went where another user pointed"
    );
    assert_eq!(planted_kept.as_deref(), Some("theirs"));
    assert_eq!(links_kept, [true; 3], "another user's files were changed");
    let (base, base_meta) = (base.unwrap(), base_meta.unwrap());
    assert_ne!(base, planted);
    assert!(base_meta.is_dir() && !base_meta.file_type().is_symlink());
    assert_eq!(base_meta.mode() & 0o777, 0o700);
    assert_ne!(base_meta.uid(), hostile.uid.as_raw());
    assert!(
        !base_left,
        "{} is left after the server stopped",
        base.display()
    );
}

/// N3 of issue 27: for a user other than root, a directory another user made at the name
/// the native server's would have had (1bcc278 derived it from the workspace) stops
/// nothing: the server starts in a directory of its own, and theirs is left alone.
#[tokio::test]
async fn a_directory_another_user_made_does_not_stop_a_non_root_user_s_server() {
    use std::os::unix::process::CommandExt;
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test runs a test process as another OS user: run it as root (CI does)"
    );
    let user = hostile_user();
    let (uid, gid) = (user.uid.as_raw(), user.gid.as_raw());
    // The other user's workspace, theirs alone.
    let workspace = std::env::temp_dir().join(format!("pgharness-n3-{}", uuid::Uuid::new_v4()));
    std::fs::create_dir(&workspace).unwrap();
    std::fs::write(workspace.join("pgharness.toml"), "").unwrap();
    for path in [&workspace, &workspace.join("pgharness.toml")] {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).unwrap();
    }
    let settings = pgharness::Settings::load_from(&workspace, Vec::new()).unwrap();
    // Made first, by someone else (root here), with something in it.
    let planted = old_native_dir(&settings);
    std::fs::create_dir(&planted).unwrap();
    std::fs::write(planted.join("theirs"), "theirs").unwrap();

    let output = std::process::Command::new(common::child_binary())
        .arg("native")
        .current_dir(&workspace)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &workspace)
        .env("PGHARNESS_BACKEND", "native")
        .uid(uid)
        .gid(gid)
        .output()
        .expect("the child runs");
    let stopped = backend::stop(&settings, BackendKind::Native).await;
    let kept = std::fs::read_to_string(planted.join("theirs")).ok();
    let _ = std::fs::remove_dir_all(&planted);
    let _ = std::fs::remove_dir_all(&workspace);
    assert!(
        output.status.success(),
        "the server of a user who is not root did not start: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).starts_with("p_"));
    assert_eq!(stopped.unwrap().len(), 1, "its server was running");
    assert_eq!(
        kept.as_deref(),
        Some("theirs"),
        "the other user's directory was changed"
    );
}
