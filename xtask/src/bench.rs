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
    #[arg(long, value_parser = cargo_pgharness::parse_backend)]
    backend: Option<BackendKind>,
    /// Also write every figure to this file as JSON: `[{"name", "value", "unit", "target"}]`.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Only the schema-pool figures (no token, tunnel or RDS-path figures).
    #[arg(long, conflicts_with_all = ["tunnel_only", "rds_only"])]
    pool_only: bool,
    /// Only the token and SSM tunnel figures.
    #[arg(long, conflicts_with = "rds_only")]
    tunnel_only: bool,
    /// Only the RDS-path figures: acquire through the emulated path at RTT 0 and 30 ms.
    #[arg(long)]
    rds_only: bool,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// One measured figure, as printed and as written by `--json`.
#[derive(serde::Serialize)]
struct Figure {
    name: String,
    value: f64,
    unit: String,
    target: String,
}

static FIGURES: std::sync::Mutex<Vec<Figure>> = std::sync::Mutex::new(Vec::new());

/// Prints a figure with its target and keeps it for `--json`.
fn figure(name: &str, value: f64, unit: &str, target: &str, what: &str) {
    let target_text = if target.is_empty() {
        String::new()
    } else {
        format!("target {target} {unit}")
    };
    println!("  {what:<62} {value:>10.2} {unit:<5} {target_text}");
    FIGURES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(Figure {
            name: name.to_owned(),
            value,
            unit: unit.to_owned(),
            target: target.to_owned(),
        });
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// A copy of the benchmark's migration set under a hash of its own (a pool of its own).
fn bench_migrations() -> anyhow::Result<std::path::PathBuf> {
    let source = crate::project_root().join("xtask/assets/bench-migrations/0001_app.sql");
    let text = std::fs::read_to_string(&source)
        .with_context(|| format!("failed to read {}", source.display()))?;
    let id = uuid::Uuid::new_v4();
    let dir = std::env::temp_dir().join(format!("pgharness-bench-{id}"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("0001_app.sql"), format!("-- bench {id}\n{text}"))?;
    Ok(dir)
}

/// `n` tests one after another on this thread, each claiming a schema and giving it back
/// (inline reset): their acquire and teardown times.
fn claim_loop(
    settings: &pgharness::Settings,
    n: usize,
    label: &str,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut times = Vec::new();
        let mut teardowns = Vec::new();
        for i in 0..n {
            let (acquire, teardown) = plain_test(settings, format!("bench_{label}_{i}")).await?;
            times.push(acquire);
            teardowns.push(teardown);
        }
        times.sort();
        teardowns.sort();
        Ok((times, teardowns))
    })
}

/// One plain test: it claims its schema, writes a row and ends; its acquire and teardown.
async fn plain_test(
    settings: &pgharness::Settings,
    name: String,
) -> anyhow::Result<(Duration, Duration)> {
    let db = TestDb::builder()
        .settings(settings.clone())
        .test_name(name)
        .build()
        .await?;
    db.client()
        .batch_execute("INSERT INTO t04_tasks (name) VALUES ('x')")
        .await?;
    let acquire = db.acquire_time();
    let started = Instant::now();
    drop(db);
    Ok((acquire, started.elapsed()))
}

/// What [`pgpool_claim_loop`] measured per test.
struct PgPoolTimes {
    /// The acquire of a plain test (as [`claim_loop`] measures it), claimed in the same loop:
    /// the tests alternate, so that the machine's drift between loops (±2 ms here) hits
    /// both kinds alike.
    claimed: Vec<Duration>,
    /// The acquire of a test that gets a `PgPool`, until it holds an open connection of it.
    acquire: Vec<Duration>,
    /// What the pool added to that test's acquire: from its `TestDb` built to the connection
    /// in hand.
    inject: Vec<Duration>,
    /// Until its first query through the pool (an INSERT, prepared by sqlx) has answered.
    first_answer: Vec<Duration>,
    /// One query's round trip on the pool's first connection (p50 of 20 per test).
    round_trip: Vec<Duration>,
}

/// Alternates a plain test (as [`claim_loop`]) and one that gets an sqlx `PgPool` as
/// `#[pgharness::test]` injects it (`lending`: the pool's first connection is the control
/// session, as for a test that takes no `TestDb`; else a connection of its own), `n` of each.
fn pgpool_claim_loop(
    settings: &pgharness::Settings,
    n: usize,
    lending: bool,
) -> anyhow::Result<PgPoolTimes> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut times = PgPoolTimes {
            claimed: Vec::new(),
            acquire: Vec::new(),
            inject: Vec::new(),
            first_answer: Vec::new(),
            round_trip: Vec::new(),
        };
        for i in 0..n {
            times
                .claimed
                .push(plain_test(settings, format!("bench_plain_{i}")).await?.0);

            let started = Instant::now();
            let db = TestDb::builder()
                .settings(settings.clone())
                .test_name(format!("bench_pgpool_{i}"))
                .build()
                .await?;
            let built = Instant::now();
            let mut closers = if lending {
                pgharness::Closers::lending()
            } else {
                pgharness::Closers::default()
            };
            let pool =
                <pgharness::sqlx::PgPool as pgharness::Inject>::inject(&db, &mut closers).await;
            // The test holds a connection of its pool: the acquire.
            drop(pool.acquire().await?);
            times.acquire.push(started.elapsed());
            times.inject.push(built.elapsed());
            pgharness::sqlx::query("INSERT INTO t04_tasks (name) VALUES ('x')")
                .execute(&pool)
                .await?;
            times.first_answer.push(started.elapsed());
            let mut round_trips = Vec::new();
            for _ in 0..20 {
                let started = Instant::now();
                pgharness::sqlx::query("SELECT 1").execute(&pool).await?;
                round_trips.push(started.elapsed());
            }
            round_trips.sort();
            times.round_trip.push(percentile(&round_trips, 0.5));
            closers.close().await;
            drop(db);
        }
        for series in [
            &mut times.claimed,
            &mut times.acquire,
            &mut times.inject,
            &mut times.first_answer,
            &mut times.round_trip,
        ] {
            series.sort();
        }
        Ok(times)
    })
}

impl Bench {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        println!(
            "pgharness bench (debug builds are slower; use `cargo run --release -p xtask -- bench` for figures to compare)"
        );
        println!(
            "build: {}",
            if cfg!(debug_assertions) {
                "dev profile (hashing crates optimised)"
            } else {
                "release"
            }
        );
        if !self.tunnel_only && !self.rds_only {
            self.acquire().await?;
        }
        if !self.pool_only && !self.rds_only {
            token_minting();
            for pacing in [false, true] {
                self.tunnel(pacing).await?;
            }
        }
        if !self.pool_only && !self.tunnel_only {
            self.rds().await?;
        }
        if let Some(path) = &self.json {
            let figures = FIGURES.lock().unwrap_or_else(|p| p.into_inner());
            std::fs::write(path, serde_json::to_string_pretty(&*figures)?)
                .with_context(|| format!("failed to write {}", path.display()))?;
            println!("figures written to {}", path.display());
        }
        Ok(ExitCode::SUCCESS)
    }

    /// The schema pool on the benchmark's migration set: acquire when a test creates its
    /// schema (a miss) and when it claims a ready one (1 and 2 clients at once), the reset
    /// that recycles a schema, and what isolation adds to a nextest suite per test.
    async fn acquire(&self) -> anyhow::Result<()> {
        let mut settings = crate::settings(self.backend)?;
        settings.teardown = pgharness::Teardown::Inline;
        let (server, kind, _) = pgharness_runner::servers::start(&settings, &crate::report).await?;
        settings.backend = kind;
        let run_id = format!("bench-{}", std::process::id());
        settings.run_id = Some(run_id.clone());
        let admin = pgharness_runner::servers::admin_client(&server).await?;
        println!(
            "schema pool ({kind} backend, {}, benchmark migration set: 20 tables, 60 indexes, 30 foreign keys):",
            server.describe()
        );

        // Misses: a migration set no pool has, every time.
        let mut created = Vec::new();
        for i in 0..self.schemas.min(20) {
            let mut settings = settings.clone();
            settings.migrations = bench_migrations()?;
            let db = TestDb::builder()
                .settings(settings)
                .test_name(format!("bench_created_{i}"))
                .build()
                .await?;
            created.push(db.acquire_time());
            // A structural change, so that this one-off schema is dropped, not pooled.
            db.client()
                .batch_execute("CREATE TABLE bench_done ()")
                .await?;
        }
        created.sort();
        figure(
            "acquire_created_p50_ms",
            ms(percentile(&created, 0.5)),
            "ms",
            "",
            "acquire, created on a miss, p50",
        );

        // Hits: one migration set, its pool warmed, every schema recycled after its test.
        settings.migrations = bench_migrations()?;
        let ns = pgharness::ledger::Namespace::of(&server.config());
        pgharness::pool::Warmer::for_settings(&settings)?
            .warm(&admin, &ns, 3, 3)
            .await?;
        let (claimed, teardowns) = {
            let settings = settings.clone();
            let n = self.schemas;
            tokio::task::spawn_blocking(move || claim_loop(&settings, n, "one")).await??
        };
        figure(
            "acquire_claimed_p50_ms",
            ms(percentile(&claimed, 0.5)),
            "ms",
            "<= 5",
            "acquire, claimed from the pool, p50",
        );
        figure(
            "acquire_claimed_p95_ms",
            ms(percentile(&claimed, 0.95)),
            "ms",
            "<= 15",
            "acquire, claimed from the pool, p95",
        );
        // One after the other: the figures compare.
        let mut runs = Vec::new();
        for lending in [true, false] {
            let settings = settings.clone();
            let n = self.schemas;
            runs.push(
                tokio::task::spawn_blocking(move || pgpool_claim_loop(&settings, n, lending))
                    .await??,
            );
        }
        let (own, lent) = (runs.pop().expect("two runs"), runs.pop().expect("two runs"));
        figure(
            "acquire_pgpool_claimed_p50_ms",
            ms(percentile(&lent.claimed, 0.5)),
            "ms",
            "",
            "acquire, claimed, the plain tests between the PgPool tests below, p50",
        );
        figure(
            "acquire_pgpool_p50_ms",
            ms(percentile(&lent.acquire, 0.5)),
            "ms",
            &format!("<= {:.2}", ms(percentile(&lent.claimed, 0.5)) + 2.0),
            "acquire with an injected sqlx PgPool, a connection in hand, p50",
        );
        figure(
            "pgpool_inject_p50_ms",
            ms(percentile(&lent.inject, 0.5)),
            "ms",
            "",
            "  of it the pool's own part (its TestDb built to a connection in hand), p50",
        );
        figure(
            "acquire_pgpool_own_connection_p50_ms",
            ms(percentile(&own.acquire, 0.5)),
            "ms",
            "",
            "  the same, the pool's first connection a backend of its own, p50",
        );
        figure(
            "pgpool_inject_own_connection_p50_ms",
            ms(percentile(&own.inject, 0.5)),
            "ms",
            "",
            "    of it the pool's own part, p50",
        );
        figure(
            "pgpool_first_answer_p50_ms",
            ms(percentile(&lent.first_answer, 0.5)),
            "ms",
            "",
            "  the same, to its first query's answer (sqlx prepares it), p50",
        );
        figure(
            "pgpool_first_answer_own_connection_p50_ms",
            ms(percentile(&own.first_answer, 0.5)),
            "ms",
            "",
            "  the same, a backend of its own, p50",
        );
        figure(
            "pgpool_round_trip_lent_p50_us",
            percentile(&lent.round_trip, 0.5).as_secs_f64() * 1e6,
            "us",
            "",
            "sqlx round trip on the lent control session (relayed), p50",
        );
        figure(
            "pgpool_round_trip_own_p50_us",
            percentile(&own.round_trip, 0.5).as_secs_f64() * 1e6,
            "us",
            "",
            "sqlx round trip on a connection of its own, p50",
        );
        figure(
            "teardown_recycle_p50_ms",
            ms(percentile(&teardowns, 0.5)),
            "ms",
            "",
            "teardown with inline reset, p50",
        );
        // The default teardown: sent, not waited for; the server resets after the test.
        let detached = {
            let mut settings = settings.clone();
            settings.teardown = pgharness::Teardown::Detached;
            let n = self.schemas;
            tokio::task::spawn_blocking(move || claim_loop(&settings, n, "detached")).await??
        };
        figure(
            "teardown_detached_p50_ms",
            ms(percentile(&detached.1, 0.5)),
            "ms",
            "<= 3",
            "teardown detached (the default: the server resets after the test), p50",
        );
        figure(
            "acquire_claimed_after_detached_p50_ms",
            ms(percentile(&detached.0, 0.5)),
            "ms",
            "",
            "acquire, claimed, while earlier tests' detached resets run, p50",
        );
        let both: Vec<_> = {
            let settings = settings.clone();
            let n = self.schemas;
            tokio::task::spawn_blocking(move || {
                ["two_a", "two_b"]
                    .map(|label| {
                        let settings = settings.clone();
                        std::thread::spawn(move || claim_loop(&settings, n / 2, label))
                    })
                    .into_iter()
                    .map(|handle| {
                        handle
                            .join()
                            .map_err(|_| anyhow::anyhow!("a bench client panicked"))?
                    })
                    .collect::<anyhow::Result<Vec<_>>>()
            })
            .await??
        };
        let mut claimed2: Vec<Duration> = both.into_iter().flat_map(|(times, _)| times).collect();
        claimed2.sort();
        figure(
            "acquire_claimed_2_clients_p50_ms",
            ms(percentile(&claimed2, 0.5)),
            "ms",
            "<= 5",
            "acquire, claimed, 2 clients at once, p50",
        );
        figure(
            "acquire_claimed_2_clients_p95_ms",
            ms(percentile(&claimed2, 0.95)),
            "ms",
            "<= 15",
            "acquire, claimed, 2 clients at once, p95",
        );
        let row = admin
            .query_one(
                &format!(
                    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY reset_ms),
                            count(*) FILTER (WHERE path = 'claimed'), count(*) FILTER (WHERE path = 'created')
                       FROM {}.acquires WHERE run_id = $1",
                    pgharness::ledger::Namespace::of(&server.config())
                ),
                &[&run_id],
            )
            .await?;
        let reset: Option<f64> = row.get(0);
        figure(
            "reset_p50_ms",
            reset.unwrap_or(f64::NAN),
            "ms",
            "",
            "reset of a recycled schema (server time), p50",
        );
        println!(
            "  (pool hits {}, misses {})",
            row.get::<_, i64>(1),
            row.get::<_, i64>(2)
        );

        self.suite_overhead(&settings, &server).await
    }

    /// The schema pool through the emulated RDS path (fake-aws, one SSM session, the proxy's
    /// pooled upstream sessions) at RTT 0 and 30 ms: the claimed acquire's p50 at each, and
    /// the round trips the link adds to an acquire.
    async fn rds(&self) -> anyhow::Result<()> {
        println!(
            "RDS path, emulated (fake-aws; benchmark migration set; claims from a warmed pool):"
        );
        let mut p50s = Vec::new();
        for rtt in [Duration::ZERO, Duration::from_millis(30)] {
            let mut settings = crate::settings(Some(BackendKind::Rds))?;
            anyhow::ensure!(
                pgharness_runner::emulator::running(&settings).is_none(),
                "an emulator already runs, at an RTT this bench cannot know: stop it with `cargo pgharness down` and `cargo pgharness emulate --stop`"
            );
            let options = pgharness_runner::EmulatorOptions {
                rtt: (!rtt.is_zero()).then_some(rtt),
                ..Default::default()
            };
            let up =
                pgharness_runner::rds::up(&settings, true, &options, false, &crate::report).await?;
            let claimed = self.rds_claims(&mut settings).await;
            pgharness_runner::rds::down(&settings, &crate::report).await?;
            if up.started_emulator {
                pgharness_runner::emulator::stop(&settings).await?;
            }
            let p50 = percentile(&claimed?, 0.5);
            figure(
                &format!("rds_acquire_p50_rtt{}_ms", rtt.as_millis()),
                ms(p50),
                "ms",
                "",
                &format!("acquire at RTT {} ms, claimed, p50", rtt.as_millis()),
            );
            p50s.push(p50);
        }
        figure(
            "rds_acquire_rtts",
            (ms(p50s[1]) - ms(p50s[0])) / 30.0,
            "RTT",
            "<= 1.5",
            "round trips the link adds to an acquire: (p50 at 30 ms - p50 at 0) / 30 ms",
        );
        Ok(())
    }

    /// Claimed acquires through the run's RDS proxy, after warming the pool through it.
    async fn rds_claims(
        &self,
        settings: &mut pgharness::Settings,
    ) -> anyhow::Result<Vec<Duration>> {
        settings.teardown = pgharness::Teardown::Inline;
        settings.migrations = bench_migrations()?;
        settings.run_id = Some(format!("bench-rds-{}", std::process::id()));
        let server = pgharness::backend::ensure(settings, &pgharness::events::log_only).await?;
        let admin = pgharness_runner::servers::admin_client(&server).await?;
        let ns = pgharness::ledger::Namespace::of(&server.config());
        pgharness::pool::Warmer::for_settings(settings)?
            .warm(&admin, &ns, 3, 3)
            .await?;
        let (settings, n) = (settings.clone(), self.schemas.min(20));
        let (claimed, _) =
            tokio::task::spawn_blocking(move || claim_loop(&settings, n, "rds")).await??;
        Ok(claimed)
    }

    /// 40 trivial tests with the fixture against the same 40 with a plain connection, each
    /// under `cargo nextest run --test-threads 2`; the difference per test. As plain `cargo
    /// nextest run` runs them (the default detached teardown, and `teardown = inline`, where
    /// each test waits for its reset), and as `cargo xtask test` does (deferred teardown, a
    /// janitor resets off the critical path).
    async fn suite_overhead(
        &self,
        settings: &pgharness::Settings,
        server: &pgharness::Server,
    ) -> anyhow::Result<()> {
        let root = crate::project_root();
        let run = |filter: &str, extra: &[(&str, String)]| -> anyhow::Result<Duration> {
            let started = Instant::now();
            let output = std::process::Command::new(
                std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()),
            )
            .current_dir(&root)
            .args([
                "nextest",
                "run",
                "-p",
                "pgharness-bench-suite",
                "--run-ignored",
                "only",
                "--test-threads",
                "2",
                "--no-fail-fast",
                "-E",
                filter,
            ])
            .env("PGHARNESS_BACKEND", settings.backend.to_string())
            .env("PGHARNESS_MIGRATIONS", &settings.migrations)
            .env("BENCH_PLAIN_URL", server.url().expose())
            .envs(
                settings
                    .url
                    .as_ref()
                    .map(|url| ("PGHARNESS_URL", url.expose().to_owned())),
            )
            .envs(extra.iter().map(|(k, v)| (*k, v.clone())))
            .output()
            .context("failed to run cargo nextest")?;
            anyhow::ensure!(
                output.status.success(),
                "the bench suite failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
            Ok(started.elapsed())
        };
        let median = |mut times: Vec<Duration>| {
            times.sort();
            times[times.len() / 2].as_secs_f64() * 1000.0
        };
        // Build it, and warm the pool as a second run of a suite finds it.
        run("test(/^isolated::/)", &[])?;
        run("test(/^plain::/)", &[])?;
        let mut plain = Vec::new();
        let mut inline = Vec::new();
        let mut detached = Vec::new();
        let inline_env = [("PGHARNESS_TEARDOWN", "inline".to_owned())];
        for _ in 0..3 {
            plain.push(run("test(/^plain::/)", &[])?);
            inline.push(run("test(/^isolated::/)", &inline_env)?);
            detached.push(run("test(/^isolated::/)", &[])?);
        }
        let plain = median(plain);
        figure(
            "suite_overhead_per_test_ms",
            (median(detached) - plain) / 40.0,
            "ms",
            "<= 8",
            "suite overhead per test, cargo nextest run (default: detached teardown)",
        );
        figure(
            "suite_overhead_inline_per_test_ms",
            (median(inline) - plain) / 40.0,
            "ms",
            "",
            "suite overhead per test, cargo nextest run, teardown = inline",
        );
        let admin = std::sync::Arc::new(pgharness_runner::servers::admin_client(server).await?);
        let mut janitored = Vec::new();
        for round in 0..3 {
            let run_id = format!("bench-suite-{}-{round}", std::process::id());
            let janitor = pgharness_runner::janitor::Janitor::spawn(
                admin.clone(),
                pgharness::ledger::Namespace::of(&server.config()),
                run_id.clone(),
                settings,
                3,
            );
            let extra = [
                ("PGHARNESS_TEARDOWN", "deferred".to_owned()),
                ("PGHARNESS_RUN_ID", run_id),
            ];
            let elapsed = run("test(/^isolated::/)", &extra);
            janitor.stop().await;
            janitored.push(elapsed?);
        }
        figure(
            "suite_overhead_xtask_per_test_ms",
            (median(janitored) - plain) / 40.0,
            "ms",
            "<= 8",
            "suite overhead per test, as cargo xtask test runs it (janitor)",
        );
        Ok(())
    }

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
        let download = self.download(&ssm, &keys, &target).await?;
        println!(
            "SSM tunnel to fake-aws ({}agent pacing, {} MB):",
            if pacing { "" } else { "no " },
            self.megabytes
        );
        let suffix = if pacing { "_paced" } else { "" };
        figure(
            &format!("tunnel_session_open{suffix}_ms"),
            ms(open_time),
            "ms",
            "< 500",
            "session open (StartSession + handshake)",
        );
        figure(
            &format!("tunnel_upload{suffix}_mb_s"),
            upload,
            "MB/s",
            "> 0.6",
            "upload (client → remote; the official plugin's: 0.6 MB/s)",
        );
        figure(
            &format!("tunnel_download{suffix}_mb_s"),
            download,
            "MB/s",
            if pacing { "~0.70" } else { "" },
            if pacing {
                "download (remote → client; AWS's Go agent paced: 0.70 MB/s)"
            } else {
                "download (remote → client)"
            },
        );
        figure(
            &format!("tunnel_round_trip{suffix}_mb_s"),
            rate,
            "MB/s",
            "",
            if pacing {
                "round trip through an echo (bounded by the agent's pacing)"
            } else {
                "round trip through an echo"
            },
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
        let (tunnel, mut stream) = tunnel_to(ssm, keys, target, "sink.bench", sink_addr).await?;
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

    /// Download only: a source writes the bytes as the client connects; the rate is
    /// measured from the first byte received to the last.
    async fn download(
        &self,
        ssm: &SsmService,
        keys: &KeyPair,
        target: &str,
    ) -> anyhow::Result<f64> {
        let total = self.megabytes * 1024 * 1024;
        let source = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let source_addr = source.local_addr()?;
        tokio::spawn(async move {
            if let Ok((mut stream, _)) = source.accept().await {
                let chunk = vec![0x3c; 64 * 1024];
                let mut sent = 0;
                while sent < total {
                    let n = chunk.len().min(total - sent);
                    if stream.write_all(&chunk[..n]).await.is_err() {
                        break;
                    }
                    sent += n;
                }
            }
        });
        let (tunnel, mut stream) =
            tunnel_to(ssm, keys, target, "source.bench", source_addr).await?;
        let mut buffer = vec![0; 64 * 1024];
        let mut received = stream.read(&mut buffer).await?;
        let started = Instant::now();
        while received < total {
            let n = stream.read(&mut buffer).await?;
            anyhow::ensure!(n > 0, "the tunnel closed after {received} bytes");
            received += n;
        }
        let elapsed = started.elapsed();
        tunnel.close().await?;
        Ok(total as f64 / elapsed.as_secs_f64() / 1e6)
    }
}

/// A session through fake-aws to `addr` (known to its agent as `host`), and one stream.
async fn tunnel_to(
    ssm: &SsmService,
    keys: &KeyPair,
    target: &str,
    host: &str,
    addr: std::net::SocketAddr,
) -> anyhow::Result<(Tunnel, ssm_tunnel::TunnelStream)> {
    ssm.reconfigure(|config| {
        config.host_map.insert(host.into(), addr);
    });
    let tunnel = Tunnel::open_with(TunnelConfig::new(target, host, 9), ssm_client(ssm, keys))
        .await
        .context("tunnel")?;
    let stream = tunnel.connect().await?;
    Ok((tunnel, stream))
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
    figure(
        "token_mint_us",
        per.as_secs_f64() * 1e6,
        "µs",
        "< 1000",
        "mint (SigV4 presign), per token (cached 14m30s anyway)",
    );
}
