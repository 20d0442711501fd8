//! `cargo xtask bench`: figures for the things that must be fast, printed with their
//! targets. Nothing here fails a build; CI tests behaviour, this measures it.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use aws_credential_types::Credentials;
use fake_aws::ssm::{SsmConfig, SsmService};
use fake_aws::{CredentialStore, KeyPair};
use pgharness::{BackendKind, TestDb};
use ssm_tunnel::{Tunnel, TunnelConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(clap::Args)]
pub(crate) struct Bench {
    /// Schemas to create for the acquire figures.
    #[arg(long, default_value_t = 40)]
    schemas: usize,
    /// Megabytes to push through the tunnel.
    #[arg(long, default_value_t = 16)]
    megabytes: usize,
    /// The local backend for the acquire figures.
    #[arg(long, value_parser = crate::parse_backend)]
    backend: Option<BackendKind>,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn row(what: &str, measured: String, target: &str) {
    println!("  {what:<46} {measured:>16}   target {target}");
}

impl Bench {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        println!(
            "pgharness bench (debug builds are slower; use `cargo run --release -p xtask -- bench` for figures to compare)"
        );
        self.acquire().await?;
        token_minting();
        for pacing in [false, true] {
            self.tunnel(pacing).await?;
        }
        Ok(ExitCode::SUCCESS)
    }

    /// Time from asking for a database to having it migrated, one test at a time.
    async fn acquire(&self) -> anyhow::Result<()> {
        let mut settings = crate::settings(self.backend)?;
        settings.teardown = pgharness::Teardown::Inline;
        let (server, kind, _) = crate::servers::start(&settings).await?;
        settings.backend = kind;
        let mut times = Vec::new();
        let mut drops = Vec::new();
        for i in 0..self.schemas {
            let db = TestDb::builder()
                .settings(settings.clone())
                .test_name(format!("bench_{i}"))
                .build()
                .await?;
            times.push(db.acquire_time());
            let started = Instant::now();
            drop(db);
            drops.push(started.elapsed());
        }
        times.sort();
        drops.sort();
        println!(
            "schema per test ({} backend, {}, {} schemas, todo-app migrations):",
            kind,
            server.describe(),
            self.schemas
        );
        row(
            "acquire p50",
            format!("{:.1} ms", percentile(&times, 0.5).as_secs_f64() * 1000.0),
            "< 50 ms",
        );
        row(
            "acquire p95",
            format!("{:.1} ms", percentile(&times, 0.95).as_secs_f64() * 1000.0),
            "< 100 ms",
        );
        row(
            "teardown (inline drop) p50",
            format!("{:.1} ms", percentile(&drops, 0.5).as_secs_f64() * 1000.0),
            "< 20 ms",
        );
        Ok(())
    }

    /// Bytes per second through a tunnel to an echo server behind fake-aws's agent.
    async fn tunnel(&self, pacing: bool) -> anyhow::Result<()> {
        let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let echo_addr = echo.local_addr()?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = echo.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.into_split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        let keys = KeyPair::random_temporary();
        let mut config = SsmConfig {
            pacing,
            ..SsmConfig::default()
        };
        config.host_map.insert("echo.bench".into(), echo_addr);
        let target = config.online_targets[0].clone();
        let ssm = SsmService::start(config, Arc::new(CredentialStore::new([keys.clone()]))).await?;
        let client = ssm_client(&ssm, &keys);
        let opened = Instant::now();
        let tunnel = Tunnel::open_with(TunnelConfig::new(&target, "echo.bench", 7), client)
            .await
            .context("tunnel")?;
        let open_time = opened.elapsed();
        let stream = tunnel.connect().await?;
        let (mut read, mut write) = tokio::io::split(stream);
        let total = self.megabytes * 1024 * 1024;
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            let chunk = vec![0x5a; 64 * 1024];
            let mut sent = 0;
            while sent < total {
                let n = chunk.len().min(total - sent);
                write.write_all(&chunk[..n]).await?;
                sent += n;
            }
            write.flush().await?;
            Ok::<_, std::io::Error>(write)
        });
        let mut buffer = vec![0; 64 * 1024];
        let mut received = 0;
        while received < total {
            let n = read.read(&mut buffer).await?;
            anyhow::ensure!(n > 0, "the tunnel closed after {received} bytes");
            received += n;
        }
        let elapsed = started.elapsed();
        drop(writer.await??);
        tunnel.close().await?;
        let rate = total as f64 / elapsed.as_secs_f64() / 1e6;
        let upload = self.upload(&ssm, &keys, &target).await?;
        println!(
            "SSM tunnel to fake-aws ({}agent pacing, {} MB):",
            if pacing { "" } else { "no " },
            self.megabytes
        );
        row(
            "session open (StartSession + handshake)",
            format!("{:.1} ms", open_time.as_secs_f64() * 1000.0),
            "< 500 ms",
        );
        row(
            "upload (client → remote)",
            format!("{upload:.1} MB/s"),
            "> 0.6 MB/s (the official plugin's upload)",
        );
        let note = if pacing {
            "- (bounded by the agent's 1 KiB/ms pacing)"
        } else {
            "-"
        };
        row(
            "round trip (up and back through an echo)",
            format!("{rate:.1} MB/s"),
            note,
        );
        Ok(())
    }

    /// Upload only: bytes into a sink that reports when it has them all.
    async fn upload(&self, ssm: &SsmService, keys: &KeyPair, target: &str) -> anyhow::Result<f64> {
        let total = self.megabytes * 1024 * 1024;
        let sink = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let sink_addr = sink.local_addr()?;
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = sink.accept().await {
                let mut buffer = vec![0; 64 * 1024];
                let mut received = 0;
                while received < total {
                    match stream.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => received += n,
                    }
                }
                let _ = done_tx.send((received, Instant::now()));
            }
        });
        ssm.reconfigure(|config| {
            config.host_map.insert("sink.bench".into(), sink_addr);
        });
        let tunnel = Tunnel::open_with(
            TunnelConfig::new(target, "sink.bench", 9),
            ssm_client(ssm, keys),
        )
        .await
        .context("tunnel")?;
        let mut stream = tunnel.connect().await?;
        let chunk = vec![0xa5; 64 * 1024];
        let started = Instant::now();
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            stream.write_all(&chunk[..n]).await?;
            sent += n;
        }
        stream.flush().await?;
        let (received, at) = done_rx.await.context("the sink ended early")?;
        anyhow::ensure!(
            received == total,
            "the sink got {received} of {total} bytes"
        );
        tunnel.close().await?;
        Ok(total as f64 / at.duration_since(started).as_secs_f64() / 1e6)
    }
}

/// An SSM client for fake-aws with its test keys.
fn ssm_client(ssm: &SsmService, keys: &KeyPair) -> aws_sdk_ssm::Client {
    aws_sdk_ssm::Client::from_conf(
        aws_sdk_ssm::Config::builder()
            .behavior_version(aws_sdk_ssm::config::BehaviorVersion::latest())
            .region(aws_sdk_ssm::config::Region::new("eu-west-2"))
            .endpoint_url(ssm.endpoint_url())
            .credentials_provider(keys.to_credentials())
            .build(),
    )
}

fn token_minting() {
    let request = rds_iam::TokenRequest::new(
        "db.cluster-x.eu-west-2.rds.amazonaws.com",
        5432,
        "app",
        None,
    )
    .expect("a valid request");
    let credentials =
        Credentials::new("AKIDBENCH", "secret", Some("session".into()), None, "bench");
    let n = 2000;
    let started = Instant::now();
    for i in 0..n {
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000 + i);
        let _ = rds_iam::token::mint(&request, &credentials, time);
    }
    let per = started.elapsed() / n as u32;
    println!("IAM auth tokens:");
    row(
        "mint (SigV4 presign), per token",
        format!("{:.1} µs", per.as_secs_f64() * 1e6),
        "< 1 ms (cached 14m30s anyway)",
    );
}
