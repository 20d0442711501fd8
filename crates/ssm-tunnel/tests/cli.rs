//! The `ssm-tunnel` CLI as a script uses it: in the background with no terminal and stdout
//! closed, a ready file to wait for, SIGTERM to end the session; and failing fast.

mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{DB_HOST, TARGET, env};

fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_ssm-tunnel")
}

async fn query_port(port: u16) -> String {
    let mut config = common::admin_login();
    config.host("127.0.0.1").port(port);
    let (client, connection) = config
        .connect(tokio_postgres::NoTls)
        .await
        .expect("through the forwarded port");
    tokio::spawn(connection);
    client
        .query_one("SELECT current_user::text", &[])
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_script_waits_for_the_ready_file_connects_and_terminates_with_sigterm() {
    // A service message for the user: printed on stderr, as AWS's plugin prints it.
    let env =
        env(|config| config.customer_message = "Authorized use only: pgharness CI".into()).await;
    let dir = std::env::temp_dir().join(format!("ssm-tunnel-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let ready = dir.join("ready");
    // The script, as a user would write it.
    let script = format!(
        r#"set -e
"{binary}" --target {TARGET} --host {DB_HOST} --port 5432 --local-port 0 --ready-file "{ready}" >/dev/null 2>"{dir}/stderr" &
pid=$!
for _ in $(seq 1 300); do [ -s "{ready}" ] && break; sleep 0.1; done
[ -s "{ready}" ] || {{ echo "no ready file"; kill $pid; exit 1; }}
echo "pid=$pid"
cat "{ready}"
"#,
        binary = binary(),
        ready = ready.display(),
        dir = dir.display()
    );
    let output = Command::new("bash")
        .args(["-c", &script])
        .envs(env.child_env())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let pid: i32 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("pid="))
        .unwrap()
        .parse()
        .unwrap();
    let line = stdout
        .lines()
        .find(|l| l.starts_with("ready "))
        .expect("one ready line")
        .to_owned();
    // `ready 127.0.0.1:<port> session=<id>`
    let mut words = line.split_whitespace().skip(1);
    let address = words.next().unwrap();
    let session = words
        .next()
        .unwrap()
        .strip_prefix("session=")
        .unwrap()
        .to_owned();
    assert!(address.starts_with("127.0.0.1:"), "{line}");
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap();
    assert!(
        stderr.contains("Authorized use only: pgharness CI"),
        "{stderr}"
    );
    let port: u16 = address.rsplit(':').next().unwrap().parse().unwrap();

    assert_eq!(query_port(port).await, "postgres");
    assert_eq!(
        query_port(port).await,
        "postgres",
        "a second connection over the same session"
    );
    assert_eq!(env.ssm.open_sessions(), 1);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
        // The bash that started it has exited; the process is reaped by init.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat.contains(") Z ") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let records = env.ssm.sessions();
    let record = records
        .iter()
        .find(|r| r.id == session)
        .expect("the session is known to fake-aws");
    assert!(
        record.ended,
        "SIGTERM must terminate the session: {record:?}"
    );
    assert_eq!(env.ssm.open_sessions(), 0);
    let stderr = std::fs::read_to_string(dir.join("stderr")).unwrap_or_default();
    assert!(
        stderr.contains(&format!("session {session} terminated")),
        "{stderr}"
    );
    std::fs::remove_dir_all(dir).ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_port_exits_at_once_without_starting_a_session() {
    let env = env(|_| {}).await;
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = busy.local_addr().unwrap().port();
    let output = Command::new(binary())
        .args([
            "--target",
            TARGET,
            "--host",
            DB_HOST,
            "--port",
            "5432",
            "--local-port",
            &port.to_string(),
        ])
        .envs(env.child_env())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{stderr}"
    );
    // At once: the port is tried before any AWS call (a wall-clock bound here failed on a
    // loaded CI machine; what "at once" means is that nothing was asked of SSM).
    assert_eq!(env.ssm.start_session_calls(), 0, "no session was started");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusals_and_missing_settings_exit_with_their_codes() {
    let env = env(|_| {}).await;
    let run = |target: &str, drop_region: bool| {
        let mut command = Command::new(binary());
        command
            .args(["--target", target, "--host", DB_HOST, "--port", "5432"])
            .envs(env.child_env());
        if drop_region {
            command.env_remove("AWS_REGION");
        }
        command.output().unwrap()
    };
    let output = run("i-0notconnected0000", false);
    assert_eq!(output.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&output.stderr).contains("TargetNotConnected"));
    let output = run(TARGET, true);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("no AWS region"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut command = Command::new(binary());
    command
        .args(["--target", TARGET, "--host", DB_HOST, "--port", "5432"])
        .envs(env.child_env());
    for variable in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
    ] {
        command.env_remove(variable);
    }
    let output = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("no AWS credentials") && stderr.contains("AWS_PROFILE"),
        "{stderr}"
    );
    assert_eq!(env.ssm.open_sessions(), 0);
}
