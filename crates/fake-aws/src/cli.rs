//! fake-aws's command line, as a library: the `fake-aws` binary and `cargo pgharness`'s
//! hidden `__fake-aws` command (the emulator any workspace can start) both run it. It
//! prints what clients need as `KEY=value` lines (also written to `--env-file`), then serves
//! until SIGINT or SIGTERM. (`anyhow` here: this is a program's entry point kept in the
//! library so that other programs can mount it.)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use crate::rds::{PauseConfig, RdsFront, RdsFrontConfig};
use crate::ssm::{Faults, SsmConfig, SsmService};
use crate::{CredentialStore, KeyPair};

/// fake-aws's command line.
#[derive(Parser, Debug)]
#[command(
    name = "fake-aws",
    about = "An offline stand-in for AWS RDS IAM auth (and SSM)"
)]
pub struct Cli {
    /// The real Postgres that IAM logins are relayed to.
    #[arg(long)]
    backend: SocketAddr,
    /// A file holding the IAM users' password on the backend (the front logs in with it
    /// after the IAM check, as RDS does); without it the backend must trust them.
    #[arg(long)]
    backend_password_file: Option<std::path::PathBuf>,
    /// The RDS endpoint name (certificate and tokens).
    #[arg(
        long,
        default_value = "aurora-test.cluster-c0ffee.eu-west-2.rds.amazonaws.com"
    )]
    hostname: String,
    /// The endpoint port tokens must be signed for.
    #[arg(long, default_value_t = 5432)]
    port: u16,
    /// The region tokens must be signed for.
    #[arg(long, default_value = "eu-west-2")]
    region: String,
    /// A user with the rds_iam grant (repeat for more).
    #[arg(long = "user", default_value = "iam_app")]
    users: Vec<String>,
    /// How long tokens are accepted (e.g. 15m, 30s).
    #[arg(long, default_value = "15m", value_parser = parse_duration)]
    token_ttl: Duration,
    /// Pause the cluster after this long idle (Aurora Serverless v2 with min capacity 0).
    #[arg(long, value_parser = parse_duration)]
    pause_after: Option<Duration>,
    /// How long a resume takes.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    resume_takes: Duration,
    /// Where the endpoint listens.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Where the CA bundle is written.
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Also write the KEY=value lines here.
    #[arg(long)]
    env_file: Option<PathBuf>,
    /// Also run the SSM service and agent; sessions to the RDS host reach the RDS endpoint.
    #[arg(long)]
    ssm: bool,
    /// The jumphost's instance id (SSM).
    #[arg(long, default_value = "i-0fake0jumphost0")]
    ssm_target: String,
    /// The agent version the handshake announces (3.0.196.0 or older: basic mode).
    #[arg(long, default_value = "3.3.987.0")]
    agent_version: String,
    /// Round-trip time to emulate on the data channel (e.g. 30ms).
    #[arg(long, value_parser = parse_duration)]
    rtt: Option<Duration>,
    /// Turn off the agent's 1 ms pacing per message.
    #[arg(long)]
    no_pacing: bool,
    /// Loss, duplication and reordering probability on the data channel (e.g. 0.05); each
    /// can also be set alone below.
    #[arg(long, default_value_t = 0.0, value_parser = parse_probability)]
    faults: f64,
    /// Probability that a data-channel message is dropped (overrides --faults).
    #[arg(long, value_parser = parse_probability)]
    loss: Option<f64>,
    /// Probability that a data-channel message is delivered twice (overrides --faults).
    #[arg(long, value_parser = parse_probability)]
    duplicate: Option<f64>,
    /// Probability that a data-channel message is held back 1–40 ms (overrides --faults).
    #[arg(long, value_parser = parse_probability)]
    reorder: Option<f64>,
    /// Close the first websocket of each session with `1000 Bye` after this long (the
    /// service's hourly close; the client must resume).
    #[arg(long, value_parser = parse_duration)]
    bye_after: Option<Duration>,
    /// Close the first websocket of each session with `1000 Bye` after this many bytes
    /// from the client.
    #[arg(long)]
    bye_after_bytes: Option<u64>,
    /// Wait this long before sending the handshake request.
    #[arg(long, value_parser = parse_duration)]
    slow_handshake: Option<Duration>,
    /// Basic mode: after DisconnectToPort, forward what the remote host still sends until
    /// it closes, after the flag's ack (the race a client must survive without handing a
    /// closed connection's bytes to the next one).
    #[arg(long)]
    late_bytes: bool,
    /// Sessions with no data for this long end with `channel_closed` (AWS: 20m).
    #[arg(long, value_parser = parse_duration)]
    idle_timeout: Option<Duration>,
    /// StartSession answers this error instead (`TargetNotConnected`, `AccessDeniedException`, …).
    #[arg(long)]
    refuse_start: Option<String>,
    /// Outbound payloads split into chunks of at most this many bytes (the agent: 1024).
    #[arg(long)]
    chunk_size: Option<usize>,
    /// The HandshakeComplete CustomerMessage (a service message for the user).
    #[arg(long, default_value = "")]
    customer_message: String,
}

/// A probability, 0 to 1.
fn parse_probability(text: &str) -> Result<f64, String> {
    match text.trim().parse::<f64>() {
        Ok(p) if (0.0..=1.0).contains(&p) => Ok(p),
        _ => Err(format!(
            "`{text}` is not a probability between 0 and 1 (e.g. 0.05)"
        )),
    }
}

/// humantime's durations (`30s`, `15m`, `1h`) or bare seconds; errors, never panics, on
/// overflow.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| format!("`{text}` seconds is out of range"));
    }
    humantime::parse_duration(text)
        .map_err(|e| format!("`{text}` is not a duration like 30s or 15m ({e})"))
}

/// Serves until SIGINT or SIGTERM, after printing (and writing to `--env-file`) what
/// clients need.
pub async fn serve(cli: Cli) -> anyhow::Result<()> {
    let keys = KeyPair::random_temporary();
    let mut config = RdsFrontConfig::new(cli.backend, cli.users.clone());
    config.hostname = cli.hostname;
    config.port = cli.port;
    config.region = cli.region;
    config.token_ttl = cli.token_ttl;
    if let Some(path) = &cli.backend_password_file {
        let text = std::fs::read_to_string(path).with_context(|| {
            format!(
                "failed to read the backend password from {}",
                path.display()
            )
        })?;
        config.backend_password = Some(text.trim().to_owned());
    }
    config.listen = cli.listen;
    config.pause = cli.pause_after.map(|idle_after| PauseConfig {
        idle_after,
        resume_takes: cli.resume_takes,
    });
    if let Some(dir) = cli.state_dir {
        config.state_dir = dir;
    }
    let credentials = Arc::new(CredentialStore::new([keys.clone()]));
    let front = RdsFront::start(config, credentials.clone()).await?;
    let ssm = if cli.ssm {
        let mut config = SsmConfig {
            online_targets: vec![cli.ssm_target.clone()],
            agent_version: cli.agent_version.clone(),
            pacing: !cli.no_pacing,
            ..SsmConfig::default()
        };
        config
            .host_map
            .insert(front.hostname().to_owned(), front.local_addr());
        config.faults = Faults {
            latency: cli.rtt.map_or(Duration::ZERO, |rtt| rtt / 2),
            loss: cli.loss.unwrap_or(cli.faults),
            duplicate: cli.duplicate.unwrap_or(cli.faults),
            reorder: cli.reorder.unwrap_or(cli.faults),
            bye_after_bytes: cli.bye_after_bytes,
            bye_after: cli.bye_after,
            slow_handshake: cli.slow_handshake.unwrap_or_default(),
            late_bytes: cli.late_bytes,
        };
        if let Some(idle) = cli.idle_timeout {
            config.idle_timeout = idle;
        }
        config.refuse_start = cli.refuse_start.clone();
        config.customer_message = cli.customer_message.clone();
        if let Some(chunk) = cli.chunk_size {
            anyhow::ensure!(chunk > 0, "--chunk-size must be at least 1");
            config.chunk_size = chunk;
        }
        Some(SsmService::start(config, credentials).await?)
    } else {
        None
    };
    // Test credentials of this fake only; they grant nothing anywhere else.
    let mut lines = vec![
        format!("FAKE_AWS_RDS_ADDR={}", front.local_addr()),
        format!("FAKE_AWS_RDS_HOST={}", front.hostname()),
        format!("FAKE_AWS_RDS_PORT={}", front.port()),
        format!("FAKE_AWS_RDS_USERS={}", cli.users.join(",")),
        format!("AWS_REGION={}", front.region()),
        // AWS CLI v1 and botocore read only this one.
        format!("AWS_DEFAULT_REGION={}", front.region()),
        format!("AWS_ACCESS_KEY_ID={}", keys.access_key_id),
        format!("AWS_SECRET_ACCESS_KEY={}", keys.secret_access_key),
        format!(
            "AWS_SESSION_TOKEN={}",
            keys.session_token.clone().unwrap_or_default()
        ),
        format!("PGHARNESS_CA_BUNDLE={}", front.ca_bundle().display()),
        format!("FAKE_AWS_PID={}", std::process::id()),
    ];
    if let Some(ssm) = &ssm {
        lines.push(format!("AWS_ENDPOINT_URL_SSM={}", ssm.endpoint_url()));
        lines.push(format!("FAKE_AWS_SSM_TARGET={}", cli.ssm_target));
    }
    let text = lines.join("\n") + "\n";
    if let Some(path) = &cli.env_file {
        // It holds the test credentials' secret key: only its owner reads it.
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let mut file = std::fs::File::options()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("failed to write {}", path.display()))?;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        std::io::Write::write_all(&mut file, text.as_bytes())
            .with_context(|| format!("failed to write {}", path.display()))?;
    }
    use std::io::Write;
    let mut stdout = std::io::stdout();
    // A closed stdout (a background run) is not an error.
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());

    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!(
        logins = front.logins(),
        refused = front.refused(),
        "fake-aws stopping"
    );
    if let Some(ssm) = &ssm {
        tracing::info!(
            start_session_calls = ssm.start_session_calls(),
            open_sessions = ssm.open_sessions(),
            "fake SSM stopping"
        );
    }
    Ok(())
}
