//! What the tests need from the machine, installed with apt when it is missing and we may
//! (root with apt-get); otherwise an error naming the package.

use anyhow::bail;
use pgharness::BackendKind;

/// A program the tests need and the Debian package that brings it.
pub struct Need {
    what: &'static str,
    package: &'static str,
    present: fn(&std::path::Path) -> bool,
}

/// `psql`, for the printed commands that open a kept schema (and tests that run it).
pub const PSQL: Need = Need {
    what: "psql",
    package: "postgresql-client",
    present: |_| {
        std::process::Command::new("psql")
            .arg("--version")
            .output()
            .is_ok()
    },
};

/// The Postgres server binaries, for the native backend.
pub const SERVER: Need = Need {
    what: "the Postgres server (initdb, postgres)",
    package: "postgresql",
    present: |root| {
        crate::settings(root, Some(BackendKind::Native))
            .map(|settings| pgharness::backend::native::find_bindir(&settings).is_ok())
            .unwrap_or(false)
    },
};

/// Installs what of `needs` is missing (apt, as root), else says which package to install.
pub fn install_missing(needs: &[Need], root: &std::path::Path) -> anyhow::Result<()> {
    let missing: Vec<&Need> = needs.iter().filter(|need| !(need.present)(root)).collect();
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
        "pgharness: installing {} ({})",
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
