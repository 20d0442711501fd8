//! `cargo xtask fuzz`: a bounded cargo-fuzz run of the ssm-proto decoders (`fuzz/`). The
//! toolchain here is stable; cargo-fuzz's sanitizer flags are enabled with RUSTC_BOOTSTRAP.

use std::process::ExitCode;

use anyhow::{Context, bail};

#[derive(clap::Args)]
pub(crate) struct Fuzz {
    /// How long to fuzz.
    #[arg(long, default_value_t = 30)]
    seconds: u32,
    /// The fuzz target.
    #[arg(long, default_value = "ssm_decode")]
    target: String,
}

impl Fuzz {
    #[cfg(feature = "rds")]
    pub(crate) fn bounded(seconds: u32) -> Fuzz {
        Fuzz {
            seconds,
            target: "ssm_decode".into(),
        }
    }

    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let installed = std::process::Command::new(&cargo)
            .args(["fuzz", "--version"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !installed {
            eprintln!("xtask: installing cargo-fuzz");
            let status = std::process::Command::new(&cargo)
                .args(["install", "cargo-fuzz", "--locked"])
                .status()?;
            if !status.success() {
                bail!("`cargo install cargo-fuzz` failed ({status})");
            }
        }
        eprintln!("xtask fuzz: {} for {}s", self.target, self.seconds);
        let status = std::process::Command::new(&cargo)
            .current_dir(crate::project_root().join("fuzz"))
            .env("RUSTC_BOOTSTRAP", "1")
            .args([
                "fuzz",
                "run",
                &self.target,
                "--",
                &format!("-max_total_time={}", self.seconds),
            ])
            .status()
            .context("failed to run cargo fuzz")?;
        if !status.success() {
            bail!(
                "the fuzzer found a failure (see fuzz/artifacts/{}/)",
                self.target
            );
        }
        Ok(ExitCode::SUCCESS)
    }
}
