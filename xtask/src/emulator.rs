//! The emulated AWS side (`cargo xtask emulate`): fake-aws (SSM service and agent, RDS IAM
//! front) as a background process in front of a local Postgres, described by
//! `target/pgharness/emulator.env`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use pgharness::backend::ProcessId;
use pgharness::{BackendKind, Settings};

use crate::ui::Progress;

/// The IAM database user the emulated cluster has.
pub(crate) const USER: &str = "iam_app";

pub(crate) fn env_path(settings: &Settings) -> PathBuf {
    settings.state_dir.join("emulator.env")
}

/// Where xtask records the fake-aws process it started (pid and start time) and for which
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
pub(crate) fn running(settings: &Settings) -> Option<HashMap<String, String>> {
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
pub(crate) fn client_env(values: &HashMap<String, String>) -> Vec<(String, String)> {
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

/// Options of the emulated cluster.
#[derive(clap::Args, Clone, Debug, Default)]
pub(crate) struct EmulatorOptions {
    /// Round-trip time to emulate on the SSM data channel (e.g. 30ms).
    #[arg(long, value_parser = pgharness::parse_duration)]
    pub(crate) rtt: Option<Duration>,
    /// Loss, duplication and reordering probability on the data channel (e.g. 0.05).
    #[arg(long)]
    pub(crate) faults: Option<f64>,
    /// Where the emulated cluster's data lives: auto, container or native.
    #[arg(long = "local-backend", value_parser = crate::parse_backend)]
    pub(crate) local_backend: Option<BackendKind>,
}

/// The settings of the emulated cluster's Postgres: the workspace's, on a local backend
/// (`--local-backend`, else the one `auto` picks), with a TCP listener on a native server
/// (fake-aws's RDS front dials it as RDS's proxy fleet dials the cluster).
pub(crate) async fn cluster_settings(
    settings: &Settings,
    backend: Option<BackendKind>,
) -> anyhow::Result<Settings> {
    let mut local = settings.clone();
    local.url = None;
    local.native_tcp = true;
    local.backend = match backend {
        Some(kind) if kind != BackendKind::Auto => kind,
        _ => pgharness::backend::resolve_local(&local, &pgharness::events::log_only).await?,
    };
    Ok(local)
}

/// Starts the emulator unless it runs; returns its values and whether this call started it.
pub(crate) async fn ensure(
    settings: &Settings,
    options: &EmulatorOptions,
) -> anyhow::Result<(HashMap<String, String>, bool)> {
    if let Some(values) = running(settings) {
        return Ok((values, false));
    }
    let progress = Progress::start("starting the emulated AWS (fake-aws) and its Postgres");
    let local = cluster_settings(settings, options.local_backend).await?;
    let sink = |event| progress.event(event);
    let server = pgharness::backend::ensure(&local, &sink)
        .await
        .context("failed to start the emulated cluster's Postgres")?;
    let admin = crate::servers::superuser_client(&server).await?;
    // The IAM user's password on this Postgres: the server's own secret (in a 0600 file),
    // which fake-aws logs in with after the IAM check. Nothing else can log in as it.
    let password_file = pgharness::backend::secret::password_file(&local)?;
    let password = std::fs::read_to_string(&password_file)?.trim().to_owned();
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
                bail!("`{statement}` failed on the emulated cluster's Postgres: {error}");
            }
        }
    }
    progress.say("building fake-aws".into());
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = std::process::Command::new(&cargo)
        .current_dir(crate::project_root())
        .args(["build", "--quiet", "-p", "fake-aws", "--bin", "fake-aws"])
        .status()?;
    if !status.success() {
        bail!("building fake-aws failed ({status})");
    }
    let binary = target_dir(settings).join("debug/fake-aws");
    let port = server.config().get_ports()[0];
    std::fs::create_dir_all(&settings.state_dir)?;
    let env_file = env_path(settings);
    let _ = std::fs::remove_file(&env_file);
    let log = pgharness::backend::secret::create_private(&settings.state_dir.join("emulator.log"))?;
    let mut command = std::process::Command::new(&binary);
    command
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
        .with_context(|| format!("failed to start {}", binary.display()))?;
    let process = ProcessId::of(child.id() as i32).context("fake-aws exited at once")?;
    std::fs::write(
        process_path(settings),
        format!("{process}\n{}\n", settings.root.display()),
    )?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(values) = running(settings) {
            progress.finish(&format!(
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
            ));
            return Ok((values, true));
        }
        if Instant::now() > deadline {
            bail!(
                "fake-aws did not start within 30s; see {}",
                settings.state_dir.join("emulator.log").display()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn target_dir(settings: &Settings) -> PathBuf {
    settings
        .state_dir
        .parent()
        .map(PathBuf::from)
        .unwrap_or_else(|| crate::project_root().join("target"))
}

/// Stops the emulator if it runs.
pub(crate) async fn stop(settings: &Settings) -> anyhow::Result<Option<String>> {
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

/// StartSession calls and open sessions, from fake-aws's stats endpoint.
/// An SSM client of the running emulator, with its endpoint, region and keys.
pub(crate) fn ssm_client(values: &HashMap<String, String>) -> anyhow::Result<aws_sdk_ssm::Client> {
    let get = |k: &str| {
        values
            .get(k)
            .cloned()
            .with_context(|| format!("the emulator's env file has no {k}"))
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
pub(crate) struct SsmStats {
    /// StartSession calls so far.
    pub(crate) start_session_calls: u64,
    /// The sessions still open.
    pub(crate) open: Vec<String>,
}

pub(crate) fn stats(values: &HashMap<String, String>) -> anyhow::Result<SsmStats> {
    let endpoint = values
        .get("AWS_ENDPOINT_URL_SSM")
        .context("the emulator has no SSM endpoint")?;
    let address = endpoint.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(address)
        .with_context(|| format!("fake-aws at {address} does not answer"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET /_fake/stats HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let body = response.split("\r\n\r\n").nth(1).context("no body")?;
    let json: serde_json::Value = serde_json::from_str(body)?;
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

#[derive(clap::Args)]
pub(crate) struct Emulate {
    #[command(flatten)]
    options: EmulatorOptions,
    /// Stop the emulator instead.
    #[arg(long)]
    stop: bool,
}

impl Emulate {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        let settings = crate::settings(None)?;
        if self.stop {
            match stop(&settings).await? {
                Some(what) => eprintln!("xtask: stopped {what}"),
                None => eprintln!("xtask: the emulator was not running"),
            }
            return Ok(ExitCode::SUCCESS);
        }
        let (values, _) = ensure(&settings, &self.options).await?;
        for (key, value) in client_env(&values) {
            if !key.starts_with("AWS_SECRET") && !key.starts_with("AWS_SESSION") {
                println!("{key}={value}");
            }
        }
        eprintln!(
            "xtask: the emulator runs in the background; `cargo xtask up --backend rds --emulated` uses it, `cargo xtask emulate --stop` stops it"
        );
        Ok(ExitCode::SUCCESS)
    }
}
