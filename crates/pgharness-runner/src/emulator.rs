//! The emulated AWS side (`cargo pgharness emulate`): fake-aws (SSM service and agent, RDS IAM
//! front) as a background process in front of a local Postgres, described by
//! `target/pgharness/emulator.env`. The process is this very program's hidden `__fake-aws`
//! command (fake-aws's own command line, `fake_aws::cli`), so that any workspace can run it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use pgharness::backend::ProcessId;
use pgharness::{BackendKind, Settings};

use crate::error::{Action, Error, Result};
use crate::events::{Reporter, RunEvent};
pub use crate::run::EmulatorOptions;

/// The IAM database user the emulated cluster has.
pub const USER: &str = "iam_app";

pub fn env_path(settings: &Settings) -> PathBuf {
    settings.state_dir.join("emulator.env")
}

/// Where the runner records the fake-aws process it started (pid and start time) and for which
/// workspace: a pid alone may have passed to another process, and a copied checkout's
/// record names the original's emulator.
fn process_path(settings: &Settings) -> PathBuf {
    settings.state_dir.join("emulator.process")
}

/// The fake-aws process this workspace started, if it still runs.
fn process(settings: &Settings) -> Option<ProcessId> {
    let text = std::fs::read_to_string(process_path(settings)).ok()?;
    let mut lines = text.lines();
    let process: ProcessId = lines.next()?.parse().ok()?;
    let workspace = lines.next()?;
    (Path::new(workspace) == settings.root && process.is_running()).then_some(process)
}

/// The running emulator's KEY=value lines, if it runs.
pub fn running(settings: &Settings) -> Option<HashMap<String, String>> {
    let process = process(settings)?;
    let text = std::fs::read_to_string(env_path(settings)).ok()?;
    let values: HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, v)| (k.to_owned(), v.to_owned())))
        .collect();
    let pid: i32 = values.get("FAKE_AWS_PID")?.parse().ok()?;
    (pid == process.pid).then_some(values)
}

/// The environment a client of the emulator needs: its endpoints, test credentials and CA
/// bundle, and nothing of the user's own AWS configuration.
pub fn client_env(values: &HashMap<String, String>) -> Vec<(String, String)> {
    let get = |k: &str| values.get(k).cloned().unwrap_or_default();
    vec![
        ("AWS_ENDPOINT_URL_SSM".into(), get("AWS_ENDPOINT_URL_SSM")),
        ("AWS_ACCESS_KEY_ID".into(), get("AWS_ACCESS_KEY_ID")),
        ("AWS_SECRET_ACCESS_KEY".into(), get("AWS_SECRET_ACCESS_KEY")),
        ("AWS_SESSION_TOKEN".into(), get("AWS_SESSION_TOKEN")),
        ("AWS_REGION".into(), get("AWS_REGION")),
        ("AWS_DEFAULT_REGION".into(), get("AWS_REGION")),
        ("AWS_PROFILE".into(), String::new()),
        ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        ("PGHARNESS_RDS_HOST".into(), get("FAKE_AWS_RDS_HOST")),
        ("PGHARNESS_RDS_PORT".into(), get("FAKE_AWS_RDS_PORT")),
        ("PGHARNESS_RDS_REGION".into(), get("AWS_REGION")),
        ("PGHARNESS_RDS_USER".into(), USER.into()),
        ("PGHARNESS_RDS_CA_BUNDLE".into(), get("PGHARNESS_CA_BUNDLE")),
        (
            "PGHARNESS_RDS_SSM_TARGET".into(),
            get("FAKE_AWS_SSM_TARGET"),
        ),
    ]
}

/// The settings of the emulated cluster's Postgres: the workspace's, on a local backend
/// (`--local-backend`, else the one `auto` picks), with a TCP listener on a native server
/// (fake-aws's RDS front dials it as RDS's proxy fleet dials the cluster).
pub async fn cluster_settings(
    settings: &Settings,
    backend: Option<BackendKind>,
) -> Result<Settings> {
    let mut local = settings.clone();
    local.url = None;
    local.native_tcp = true;
    // Started once per run, with progress shown: a fresh container's first start took 58 s on
    // this kind of machine while its disk was slow after bulk deletes (CI's earlier legs).
    local.acquire_timeout = local
        .acquire_timeout
        .max(std::time::Duration::from_secs(180));
    local.backend = match backend {
        Some(kind) if kind != BackendKind::Auto => kind,
        _ => pgharness::backend::resolve_local(&local, &pgharness::events::log_only).await?,
    };
    Ok(local)
}

/// Starts the emulator unless it runs; returns its values and whether this call started it.
pub async fn ensure(
    settings: &Settings,
    options: &EmulatorOptions,
    report: Reporter<'_>,
) -> Result<(HashMap<String, String>, bool)> {
    if let Some(values) = running(settings) {
        return Ok((values, false));
    }
    report(RunEvent::StepStarted(
        "starting the emulated AWS (fake-aws) and its Postgres".into(),
    ));
    let local = cluster_settings(settings, options.local_backend).await?;
    let sink = |event| report(RunEvent::Step(event));
    let server = pgharness::backend::ensure(&local, &sink).await?;
    let admin = crate::servers::superuser_client(&server).await?;
    // The IAM user's password on this Postgres: the server's own secret (in a 0600 file),
    // which fake-aws logs in with after the IAM check. Nothing else can log in as it.
    let password_file = pgharness::backend::secret::password_file(&local)?;
    let password = std::fs::read_to_string(&password_file)
        .action(|| format!("failed to read {}", password_file.display()))?
        .trim()
        .to_owned();
    // Its verifier, not the password, goes into SQL (statements reach debug logs).
    let salt = *uuid::Uuid::new_v4().as_bytes();
    let verifier = pgharness::backend::secret::scram_verifier(
        &password,
        pgharness::backend::secret::SCRAM_ITERATIONS,
        &salt,
    );
    // The IAM user as RDS has it: LOGIN, the rds_iam role, CONNECT and CREATE.
    for statement in [
        format!("CREATE ROLE {USER} LOGIN"),
        format!("ALTER ROLE {USER} PASSWORD '{verifier}'"),
        "CREATE ROLE rds_iam".to_owned(),
        format!("GRANT rds_iam TO {USER}"),
        format!("GRANT CONNECT, CREATE ON DATABASE postgres TO {USER}"),
    ] {
        if let Err(error) = admin.batch_execute(&statement).await {
            let code = error.code().map(|c| c.code()).unwrap_or_default();
            if code != "42710" && code != "23505" {
                return Err(Error::Rds(format!(
                    "`{statement}` failed on the emulated cluster's Postgres: {error}"
                )));
            }
        }
    }
    let port = server.config().get_ports()[0];
    std::fs::create_dir_all(&settings.state_dir)
        .action(|| format!("failed to create {}", settings.state_dir.display()))?;
    let env_file = env_path(settings);
    let _ = std::fs::remove_file(&env_file);
    let log = pgharness::backend::secret::create_private(&settings.state_dir.join("emulator.log"))?;
    let binary = crate::self_exe();
    let mut command = std::process::Command::new(&binary);
    command
        .arg(crate::FAKE_AWS_COMMAND)
        .args([
            "--backend",
            &format!("127.0.0.1:{port}"),
            "--user",
            USER,
            "--ssm",
        ])
        .arg("--backend-password-file")
        .arg(&password_file)
        .arg("--state-dir")
        .arg(settings.state_dir.join("emulator-certs"))
        .arg("--env-file")
        .arg(&env_file);
    if let Some(rtt) = options.rtt {
        command.args(["--rtt", &format!("{}ms", rtt.as_millis())]);
    }
    if let Some(faults) = options.faults {
        command.args(["--faults", &faults.to_string(), "--no-pacing"]);
    }
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    let child = command
        .spawn()
        .action(|| format!("failed to start fake-aws ({})", binary.display()))?;
    let emulator_log = settings.state_dir.join("emulator.log");
    let process = ProcessId::of(child.id() as i32).ok_or_else(|| {
        Error::Rds(format!(
            "fake-aws exited at once; see {}",
            emulator_log.display()
        ))
    })?;
    let record = process_path(settings);
    std::fs::write(&record, format!("{process}\n{}\n", settings.root.display()))
        .action(|| format!("failed to write {}", record.display()))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(values) = running(settings) {
            report(RunEvent::StepFinished(format!(
                "emulated AWS ready: SSM {}, RDS {} (RTT {})",
                values
                    .get("AWS_ENDPOINT_URL_SSM")
                    .map(String::as_str)
                    .unwrap_or("?"),
                values
                    .get("FAKE_AWS_RDS_HOST")
                    .map(String::as_str)
                    .unwrap_or("?"),
                options.rtt.map_or("none".to_owned(), |r| format!("{r:?}"))
            )));
            return Ok((values, true));
        }
        if Instant::now() > deadline {
            return Err(Error::Rds(format!(
                "fake-aws did not start within 30s; see {}",
                emulator_log.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops the emulator if it runs.
pub async fn stop(settings: &Settings) -> Result<Option<String>> {
    let Some(process) = running(settings).and_then(|_| process(settings)) else {
        // Another checkout's files, copied here, or a stale record: the files go, no signal.
        let _ = std::fs::remove_file(env_path(settings));
        let _ = std::fs::remove_file(process_path(settings));
        return Ok(None);
    };
    process.terminate(Duration::from_secs(10)).await;
    let _ = std::fs::remove_file(env_path(settings));
    let _ = std::fs::remove_file(process_path(settings));
    Ok(Some(format!("fake-aws (pid {})", process.pid)))
}

/// An SSM client of the running emulator, with its endpoint, region and keys.
pub fn ssm_client(values: &HashMap<String, String>) -> Result<aws_sdk_ssm::Client> {
    let get = |k: &str| {
        values
            .get(k)
            .cloned()
            .ok_or_else(|| Error::Rds(format!("the emulator's env file has no {k}")))
    };
    let credentials = aws_credential_types::Credentials::new(
        get("AWS_ACCESS_KEY_ID")?,
        get("AWS_SECRET_ACCESS_KEY")?,
        values.get("AWS_SESSION_TOKEN").cloned(),
        None,
        "fake-aws",
    );
    Ok(aws_sdk_ssm::Client::from_conf(
        aws_sdk_ssm::Config::builder()
            .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
            .region(aws_sdk_ssm::config::Region::new(get("AWS_REGION")?))
            .endpoint_url(get("AWS_ENDPOINT_URL_SSM")?)
            .credentials_provider(credentials)
            .build(),
    ))
}

/// What fake-aws's SSM service counted.
pub struct SsmStats {
    /// StartSession calls so far.
    pub start_session_calls: u64,
    /// The sessions still open.
    pub open: Vec<String>,
}

/// StartSession calls and open sessions, from fake-aws's stats endpoint.
pub fn stats(values: &HashMap<String, String>) -> Result<SsmStats> {
    let endpoint = values
        .get("AWS_ENDPOINT_URL_SSM")
        .ok_or_else(|| Error::Rds("the emulator has no SSM endpoint".into()))?;
    let address = endpoint.trim_start_matches("http://");
    let mut response = String::new();
    std::net::TcpStream::connect(address)
        .and_then(|mut stream| {
            stream.set_read_timeout(Some(Duration::from_secs(5)))?;
            write!(
                stream,
                "GET /_fake/stats HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
            )?;
            stream.read_to_string(&mut response)
        })
        .action(|| format!("fake-aws at {address} does not answer"))?;
    let json: serde_json::Value = response
        .split("\r\n\r\n")
        .nth(1)
        .and_then(|body| serde_json::from_str(body).ok())
        .ok_or_else(|| Error::Rds(format!("fake-aws at {address} answered no stats")))?;
    let open = json["Sessions"]
        .as_array()
        .map(|sessions| {
            sessions
                .iter()
                .filter(|s| s["Ended"] == serde_json::Value::Bool(false))
                .filter_map(|s| s["SessionId"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    Ok(SsmStats {
        start_session_calls: json["StartSessionCalls"].as_u64().unwrap_or(0),
        open,
    })
}
