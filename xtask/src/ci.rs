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
        emulated: backend == BackendKind::Rds,
        emulator: crate::emulator::EmulatorOptions {
            rtt: Some(std::time::Duration::from_millis(10)),
            ..Default::default()
        },
        nextest_args: args.iter().map(|s| s.to_string()).collect(),
    };
    if test.run().await? != ExitCode::SUCCESS {
        bail!("tests failed on the {backend} backend");
    }
    Ok(())
}

impl Ci {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        crate::prereq::install_missing(&[crate::prereq::PSQL, crate::prereq::SERVER])?;
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
        // The example suite through the whole emulated RDS path: SSM tunnel, smux, TLS,
        // IAM tokens, the local auth proxy; one SSM session for the run.
        tests(BackendKind::Rds, &["-p", "todo-app", "--profile", "ci"]).await?;
        // The SSM protocol decoders under a bounded fuzz run.
        if crate::fuzz::Fuzz::bounded(30).run().await? != ExitCode::SUCCESS {
            bail!("fuzzing failed");
        }
        eprintln!("xtask ci: all green");
        Ok(ExitCode::SUCCESS)
    }
}
