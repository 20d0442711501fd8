//! `cargo xtask ci`: everything CI checks, in order, stopping at the first failure.

use std::process::ExitCode;

use anyhow::bail;
use pgharness::BackendKind;

use crate::test::Test;

#[derive(clap::Args)]
pub(crate) struct Ci {
    /// Skip `cargo fmt --check` and clippy.
    #[arg(long)]
    no_lint: bool,
}

fn cargo(args: &[&str]) -> anyhow::Result<()> {
    eprintln!("xtask ci: cargo {}", args.join(" "));
    let status =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(crate::project_root())
            .args(args)
            .status()?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

async fn tests(backend: BackendKind, args: &[&str]) -> anyhow::Result<()> {
    eprintln!(
        "xtask ci: tests on the {backend} backend: nextest {}",
        args.join(" ")
    );
    let test = Test {
        backend: Some(backend),
        keep_server: false,
        nextest_args: args.iter().map(|s| s.to_string()).collect(),
    };
    if test.run().await? != ExitCode::SUCCESS {
        bail!("tests failed on the {backend} backend");
    }
    Ok(())
}

/// Installs what the native leg and the tests need when it is missing and we may
/// (root with apt-get): the Postgres server and psql.
fn prerequisites() -> anyhow::Result<()> {
    let settings = crate::settings(Some(BackendKind::Native))?;
    let mut missing = Vec::new();
    if pgharness::backend::native::find_bindir(&settings).is_err() {
        missing.push("postgresql");
    }
    if std::process::Command::new("psql")
        .arg("--version")
        .output()
        .is_err()
    {
        missing.push("postgresql-client");
    }
    if missing.is_empty() {
        return Ok(());
    }
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "missing {}: install them (`sudo apt-get install {}`)",
            missing.join(", "),
            missing.join(" ")
        );
    }
    eprintln!("xtask ci: installing {}", missing.join(", "));
    for args in [
        vec!["update", "-q"],
        [
            vec!["install", "-y", "-q", "--no-install-recommends"],
            missing,
        ]
        .concat(),
    ] {
        let status = std::process::Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()?;
        if !status.success() {
            bail!("`apt-get {}` failed ({status})", args.join(" "));
        }
    }
    Ok(())
}

impl Ci {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        prerequisites()?;
        if !self.no_lint {
            cargo(&["fmt", "--all", "--", "--check"])?;
            cargo(&[
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ])?;
        }
        // Every test of the workspace on a container.
        tests(BackendKind::Container, &["--workspace", "--profile", "ci"]).await?;
        // The example suite on the native backend, 32 tests at once against
        // max_connections=100: the DB group keeps it inside the connection budget.
        tests(
            BackendKind::Native,
            &["-p", "todo-app", "--profile", "ci", "--test-threads", "32"],
        )
        .await?;
        eprintln!("xtask ci: all green");
        Ok(ExitCode::SUCCESS)
    }
}
