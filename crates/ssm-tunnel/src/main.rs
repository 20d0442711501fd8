//! `ssm-tunnel`: forwards a local port to a remote host through an SSM jumphost, built for
//! scripts. It binds the local port first, then opens the session, then prints exactly one
//! line, `ready 127.0.0.1:<port> session=<id>` (and writes it to `--ready-file`). It ends
//! the session on SIGINT, SIGTERM and SIGHUP. Failures exit non-zero at once:
//!
//! | code | meaning |
//! |---|---|
//! | 2 | a setting is missing or wrong (region, credentials) |
//! | 3 | the local port is busy or cannot be bound |
//! | 4 | SSM refused the session (`TargetNotConnected`, `AccessDeniedException`, …) |
//! | 5 | the session ended by itself (idle timeout, terminated elsewhere) |
//! | 1 | anything else |

use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use ssm_tunnel::{Error, Tunnel, TunnelConfig};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser)]
#[command(
    name = "ssm-tunnel",
    version,
    about = "Native SSM port forwarding for scripts"
)]
struct Cli {
    /// The jumphost's instance id.
    #[arg(long)]
    target: String,
    /// The remote host, as the jumphost resolves it (e.g. the RDS endpoint).
    #[arg(long)]
    host: String,
    /// The remote port.
    #[arg(long)]
    port: u16,
    /// The local port (0: any free port).
    #[arg(long, default_value_t = 0)]
    local_port: u16,
    /// The AWS region (else AWS_REGION or the profile's).
    #[arg(long)]
    region: Option<String>,
    /// Write the ready line here once the port accepts connections.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Listen on [::1] instead of 127.0.0.1.
    #[arg(long)]
    ipv6: bool,
}

fn fail(code: u8, message: &str) -> ExitCode {
    eprintln!("ssm-tunnel: {message}");
    ExitCode::from(code)
}

fn code_for(error: &Error) -> u8 {
    match error {
        Error::Config(_) => 2,
        Error::NoCredentials { .. } => 2,
        Error::Api { .. } => 4,
        Error::SessionClosed(_) => 5,
        _ => 1,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SSM_TUNNEL_LOG")
                .or_else(|_| tracing_subscriber::EnvFilter::try_from_default_env())
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();

    // Bind first: a busy port fails before any session exists.
    let address: SocketAddr = if cli.ipv6 {
        (Ipv6Addr::LOCALHOST, cli.local_port).into()
    } else {
        (Ipv4Addr::LOCALHOST, cli.local_port).into()
    };
    let listener = match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => listener,
        Err(error) => {
            return fail(
                3,
                &format!(
                    "cannot listen on {address}: {error} (choose another --local-port, or 0 for any)"
                ),
            );
        }
    };
    let local = match listener.local_addr() {
        Ok(local) => local,
        Err(error) => return fail(3, &format!("cannot read the local address: {error}")),
    };
    let mut signals = match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) {
        (Ok(int), Ok(term), Ok(hup)) => (int, term, hup),
        _ => return fail(1, "cannot install signal handlers"),
    };

    let mut config = TunnelConfig::new(&cli.target, &cli.host, cli.port);
    config.local_port = Some(local.port());
    config.region = cli.region.clone();
    let opening = Tunnel::open(config);
    let tunnel = tokio::select! {
        tunnel = opening => match tunnel {
            Ok(tunnel) => tunnel,
            Err(error) => return fail(code_for(&error), &error.to_string()),
        },
        _ = signals.0.recv() => return fail(130, "interrupted while opening the session"),
        _ = signals.1.recv() => return fail(143, "terminated while opening the session"),
        _ = signals.2.recv() => return fail(129, "hung up while opening the session"),
    };

    // The service's message for the user, on stderr as AWS's plugin shows it.
    let message = &tunnel.session().customer_message;
    if !message.is_empty() {
        eprintln!("{message}");
    }
    let line = format!("ready {local} session={}\n", tunnel.session_id());
    if let Some(path) = &cli.ready_file {
        // Write then rename, so a watcher never reads half a line.
        let temporary = path.with_extension("tmp");
        if let Err(error) =
            std::fs::write(&temporary, &line).and_then(|()| std::fs::rename(&temporary, path))
        {
            let _ = tunnel.close().await;
            return fail(
                2,
                &format!("cannot write the ready file {}: {error}", path.display()),
            );
        }
    }
    // A closed stdout (a background job) is fine.
    let mut stdout = std::io::stdout();
    let _ = stdout
        .write_all(line.as_bytes())
        .and_then(|()| stdout.flush());

    let outcome = tokio::select! {
        served = tunnel.serve(listener) => served,
        reason = tunnel.closed() => Err(Error::SessionClosed(reason)),
        _ = signals.0.recv() => Ok(()),
        _ = signals.1.recv() => Ok(()),
        _ = signals.2.recv() => Ok(()),
    };
    let session = tunnel.session_id().to_owned();
    let ended = tunnel.ended();
    let _ = tunnel.close().await;
    match (outcome, ended) {
        (Err(error), _) => fail(code_for(&error), &error.to_string()),
        (Ok(()), _) => {
            eprintln!("ssm-tunnel: session {session} terminated");
            ExitCode::SUCCESS
        }
    }
}
