//! `cargo pgharness doctor`: every check a run depends on, each with a pass/fail line and, when
//! it fails, what to do.

use std::process::ExitCode;
#[cfg(feature = "rds")]
use std::sync::Arc;
#[cfg(feature = "rds")]
use std::time::Duration;

use pgharness::{BackendKind, Settings};
#[cfg(feature = "rds")]
use rds_iam::credentials::{CredentialSource, DefaultChain};
#[cfg(feature = "rds")]
use rds_iam::{RdsTarget, TcpDialer, TlsPolicy, TokenCache, TokenRequest};
#[cfg(feature = "rds")]
use ssm_tunnel::{Tunnel, TunnelConfig};

#[derive(clap::Args)]
pub struct Doctor {
    /// What to check: auto/container/native (local), or rds.
    #[arg(long, value_parser = crate::parse_backend)]
    backend: Option<BackendKind>,
    /// With `--backend rds`: check against the running emulator (`cargo pgharness emulate`).
    #[arg(long)]
    emulated: bool,
}

struct Report {
    failed: usize,
}

impl Report {
    fn pass(&mut self, check: &str, detail: impl std::fmt::Display) {
        println!("  ok    {check}: {detail}");
    }

    fn fail(&mut self, check: &str, problem: impl std::fmt::Display, fix: &str) {
        self.failed += 1;
        println!("  FAIL  {check}: {problem}\n        fix: {fix}");
    }
}

impl Doctor {
    pub(crate) async fn run(self, root: &std::path::Path) -> anyhow::Result<ExitCode> {
        let mut report = Report { failed: 0 };
        let settings = crate::settings(root, self.backend)?;
        if settings.backend == BackendKind::Rds {
            #[cfg(not(feature = "rds"))]
            report.fail(
                "rds",
                "this cargo-pgharness was built without the `rds` feature",
                "reinstall it with `--features rds`",
            );
            #[cfg(feature = "rds")]
            if self.emulated {
                match pgharness_runner::emulator::running(&settings) {
                    Some(values) => {
                        report.pass("emulator", "fake-aws is running");
                        // The checks run in a child with the emulator's environment, as the
                        // RDS proxy of `up --emulated` does.
                        let status = std::process::Command::new(pgharness_runner::self_exe())
                            .args(["doctor", "--backend", "rds"])
                            .envs(pgharness_runner::emulator::client_env(&values))
                            .status()?;
                        return Ok(if status.success() { ExitCode::SUCCESS } else { ExitCode::FAILURE });
                    }
                    None => report.fail(
                        "emulator",
                        "fake-aws is not running (no live process behind target/pgharness/emulator.env)",
                        "start it with `cargo pgharness emulate`",
                    ),
                }
            }
            #[cfg(feature = "rds")]
            rds_checks(&crate::settings(root, Some(BackendKind::Rds))?, &mut report).await;
        } else {
            local_checks(&settings, &mut report).await;
        }
        println!();
        if report.failed == 0 {
            println!("all checks passed");
            Ok(ExitCode::SUCCESS)
        } else {
            println!("{} check(s) failed", report.failed);
            Ok(ExitCode::FAILURE)
        }
    }
}

async fn local_checks(settings: &Settings, report: &mut Report) {
    #[cfg(feature = "container")]
    match pgharness::backend::container::docker().await {
        Ok(docker) => match pgharness::backend::container::resolve_image(&docker, settings).await {
            Ok(image) => report.pass("docker", format!("answers; image {image}")),
            Err(why) => report.fail(
                "docker image",
                why,
                "run `cargo pgharness image`, or set PGHARNESS_IMAGE",
            ),
        },
        Err(why) => report.fail("docker", why, "start Docker, or use the native backend"),
    }
    match pgharness::backend::native::find_bindir(settings) {
        Ok(dir) => report.pass("postgres binaries", dir.display()),
        Err(why) => report.fail(
            "postgres binaries",
            why,
            "apt-get install postgresql, or set PGHARNESS_PG_BIN",
        ),
    }
    match std::process::Command::new("psql").arg("--version").output() {
        Ok(output) => report.pass("psql", String::from_utf8_lossy(&output.stdout).trim()),
        Err(_) => report.fail("psql", "not found", "apt-get install postgresql-client"),
    }
}

#[cfg(feature = "rds")]
async fn rds_checks(settings: &Settings, report: &mut Report) {
    let (host, user, bundle) = match settings.rds.require() {
        Ok(required) => {
            report.pass(
                "settings",
                format!(
                    "host {}, user {}, port {}",
                    required.0, required.1, settings.rds.port
                ),
            );
            required
        }
        Err(error) => {
            report.fail("settings", &error, "see the settings table in README.md");
            return;
        }
    };
    let region = settings
        .rds
        .region
        .clone()
        .or_else(|| std::env::var("AWS_REGION").ok());
    let endpoint = match TokenRequest::new(&host, settings.rds.port, &user, region.as_deref()) {
        Ok(endpoint) => {
            report.pass("region", &endpoint.region);
            endpoint
        }
        Err(error) => {
            report.fail("region", &error, "set PGHARNESS_RDS_REGION or AWS_REGION");
            return;
        }
    };
    let credentials = match DefaultChain::load().await {
        Ok(chain) => match chain.credentials().await {
            Ok(credentials) => {
                report.pass(
                    "AWS credentials",
                    format!("access key {}", credentials.access_key_id()),
                );
                Some(chain)
            }
            Err(error) => {
                report.fail("AWS credentials", &error, "set AWS_PROFILE (and `aws sso login`) or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY");
                None
            }
        },
        Err(error) => {
            report.fail(
                "AWS credentials",
                &error,
                "configure the AWS CLI (`aws configure`)",
            );
            None
        }
    };
    let tls = match rds_iam::tls::load_bundle(&bundle) {
        Ok(certs) => {
            report.pass(
                "CA bundle",
                format!("{} certificate(s) in {}", certs.len(), bundle.display()),
            );
            rds_iam::tls::client_config(&TlsPolicy::VerifyFull {
                ca_bundle: bundle.clone(),
            })
            .ok()
        }
        Err(error) => {
            report.fail("CA bundle", &error, "download the bundle for your region (or global-bundle.pem) from the RDS documentation");
            None
        }
    };
    let Some(credentials) = credentials else {
        return;
    };
    let Some(tls) = tls else { return };
    let dialer: Arc<dyn rds_iam::Dialer>;
    let mut tunnel = None;
    match &settings.rds.ssm_target {
        Some(target) => {
            match ssm_tunnel::control::client(Some(&endpoint.region)).await {
                Ok(client) => match client.describe_instance_information().send().await {
                    Ok(output) => {
                        let online = output
                            .instance_information_list()
                            .iter()
                            .any(|i| i.instance_id() == Some(target.as_str()) && i.ping_status().is_some_and(|s| s.as_str() == "Online"));
                        if online {
                            report.pass("SSM target", format!("{target} is online"));
                        } else {
                            report.fail("SSM target", format!("{target} is not online in {}", endpoint.region), "start the jumphost and its SSM agent; check the instance id and region");
                        }
                    }
                    Err(error) => report.fail(
                        "SSM target",
                        format!("DescribeInstanceInformation failed: {:#}", anyhow::Error::new(error)),
                        "check AWS_ENDPOINT_URL_SSM, the region, and ssm:DescribeInstanceInformation permission",
                    ),
                },
                Err(error) => report.fail("SSM target", &error, "set the region"),
            }
            let mut config = TunnelConfig::new(target, &host, settings.rds.port);
            config.region = Some(endpoint.region.clone());
            config.handshake_timeout = Duration::from_secs(20);
            match Tunnel::open(config).await {
                Ok(opened) => {
                    report.pass("SSM tunnel", format!("session {}", opened.session_id()));
                    let opened = Arc::new(opened);
                    dialer = Arc::new(pgharness_rds::TunnelDialer(opened.clone()));
                    tunnel = Some(opened);
                }
                Err(error) => {
                    report.fail("SSM tunnel", &error, "see the SSM target check above");
                    return;
                }
            }
        }
        None => dialer = Arc::new(TcpDialer::new(format!("{host}:{}", settings.rds.port))),
    }
    let tokens = TokenCache::new(Arc::new(credentials));
    let target = RdsTarget {
        endpoint,
        database: settings.rds.database.clone(),
        tls,
        wake_deadline: settings.rds.wake_deadline,
    };
    match rds_iam::connect(&target, None, dialer.as_ref(), &tokens, &|waiting| {
        println!("        {waiting}")
    })
    .await
    {
        Ok(client) => {
            report.pass(
                "IAM login",
                format!("{user} logged in to {host} over verified TLS"),
            );
            let row = client
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'rds_iam') AND pg_has_role(current_user, 'rds_iam', 'member'),
                            has_database_privilege(current_database(), 'CREATE')",
                    &[],
                )
                .await;
            match row {
                Ok(row) => {
                    if row.get::<_, bool>(0) {
                        report.pass("rds_iam", format!("{user} has the rds_iam role"));
                    } else {
                        report.fail(
                            "rds_iam",
                            format!("{user} lacks the rds_iam role"),
                            "run the SQL from `cargo pgharness rds grant-sql` as the database owner",
                        );
                    }
                    if row.get::<_, bool>(1) {
                        report.pass(
                            "CREATE",
                            format!("{user} may create schemas in {}", settings.rds.database),
                        );
                    } else {
                        report.fail(
                            "CREATE",
                            format!("{user} may not create schemas"),
                            "GRANT CONNECT, CREATE ON DATABASE … (see `cargo pgharness rds grant-sql`)",
                        );
                    }
                }
                Err(error) => report.fail("privileges", &error, "check the database user"),
            }
        }
        // Each failure names its own cause.
        Err(error) if error.is_certificate_rejected() => report.fail(
            "TLS certificate",
            &error,
            "the certificate is not for [rds] host, or not from [rds] ca_bundle: set host to the cluster endpoint's name (not an IP or a CNAME) and ca_bundle to the RDS bundle of its region",
        ),
        Err(error) if error.is_login_refused() => report.fail(
            "IAM login",
            &error,
            "check the user's rds_iam grant and the IAM policy (`cargo pgharness rds grant-sql`)",
        ),
        Err(error) => report.fail(
            "connection",
            &error,
            "check that the endpoint is reachable (the SSM target and its security group, or your network)",
        ),
    }
    if let Some(tunnel) = tunnel {
        tunnel.terminate().await;
    }
}
