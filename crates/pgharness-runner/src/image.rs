//! A Postgres image built from Debian's packages, for machines that
//! reach no container registry. debootstrap makes a Debian 13 (trixie) root filesystem
//! with postgresql-17, an entrypoint following the official image's contract is added,
//! and `docker import` turns it into an image.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use pgharness::backend::container::{self, DEFAULT_IMAGE, LOCAL_IMAGE};
use pgharness::{BackendKind, Settings};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::error::{Action, Error, Result};
use crate::events::{Reporter, RunEvent};

const ENTRYPOINT: &str = include_str!("../assets/postgres-entrypoint.sh");
const SUITE: &str = "trixie";
const PACKAGES: &str = "postgresql-17,ca-certificates";

/// Whether `tag` exists in the local Docker.
pub async fn exists(tag: &str) -> Result<bool> {
    Ok(container::docker().await?.inspect_image(tag).await.is_ok())
}

/// True when starting failed only for want of an image that this machine can build.
pub async fn worth_building(settings: &Settings) -> bool {
    if !matches!(settings.backend, BackendKind::Auto | BackendKind::Container)
        || settings.image.is_some()
    {
        return false;
    }
    let Ok(docker) = container::docker().await else {
        return false;
    };
    for image in [DEFAULT_IMAGE, LOCAL_IMAGE] {
        if docker.inspect_image(image).await.is_ok() {
            return false;
        }
    }
    let native_available = pgharness::backend::native::find_bindir(settings).is_ok();
    if settings.backend == BackendKind::Auto && native_available {
        return false;
    }
    nix::unistd::geteuid().is_root() && (which("debootstrap") || which("apt-get"))
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// The Debian mirror apt already uses, else the public one.
fn mirror() -> String {
    if let Ok(mirror) = std::env::var("DEBIAN_MIRROR") {
        return mirror;
    }
    let sources =
        std::fs::read_to_string("/etc/apt/sources.list.d/debian.sources").unwrap_or_default();
    sources
        .lines()
        .find_map(|line| {
            line.strip_prefix("URIs:")
                .map(|uris| uris.split_whitespace().next().unwrap_or("").to_owned())
        })
        .filter(|uri| uri.ends_with("/debian"))
        .unwrap_or_else(|| "http://deb.debian.org/debian".to_owned())
}

/// The process group of the step running now (0: none), for an interrupted build to stop.
static STEP_GROUP: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

async fn run_step(
    report: Reporter<'_>,
    what: &str,
    command: &mut tokio::process::Command,
) -> Result<()> {
    report(RunEvent::StepProgress(what.to_owned()));
    // A group of its own, so that an interrupted build stops the step and everything it
    // started (debootstrap runs dpkg in the chroot, `docker import` a tar).
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .action(|| format!("failed to start: {what}"))?;
    if let Some(pid) = child.id() {
        STEP_GROUP.store(pid as i32, std::sync::atomic::Ordering::SeqCst);
    }
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(Error::program(what, "started without its output pipes"));
    };
    let errors = tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        let mut tail = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            tail.push(line);
            if tail.len() > 20 {
                tail.remove(0);
            }
        }
        tail
    });
    let mut lines = BufReader::new(stdout).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        report(RunEvent::StepProgress(format!("{what}: {}", line.trim())));
    }
    let status = child
        .wait()
        .await
        .action(|| format!("failed to wait for: {what}"))?;
    STEP_GROUP.store(0, std::sync::atomic::Ordering::SeqCst);
    let tail = errors.await.unwrap_or_default();
    if !status.success() {
        return Err(Error::program(
            what,
            format!("failed ({status}):\n{}", tail.join("\n")),
        ));
    }
    Ok(())
}

/// Builds `tag` from Debian packages (needs root, Docker and the Debian mirror).
pub async fn build(tag: &str, report: Reporter<'_>) -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        return Err(Error::program(
            "debootstrap",
            "building the image needs root; run `sudo cargo pgharness image`, or set PGHARNESS_IMAGE to an image you have",
        ));
    }
    report(RunEvent::StepStarted(format!(
        "building {tag} from Debian packages"
    )));
    if !which("debootstrap") {
        run_step(
            report,
            "apt-get update",
            tokio::process::Command::new("apt-get").args(["update", "-q"]),
        )
        .await?;
        run_step(
            report,
            "apt-get install debootstrap",
            tokio::process::Command::new("apt-get")
                .args(["install", "-y", "-q", "debootstrap"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
        )
        .await?;
    }
    remove_leftovers();
    let rootfs = PathBuf::from(format!("{ROOTFS_PREFIX}{}", std::process::id()));
    use tokio::signal::unix::{SignalKind, signal};
    let signals = || -> std::io::Result<_> {
        Ok((
            signal(SignalKind::terminate())?,
            signal(SignalKind::interrupt())?,
            signal(SignalKind::hangup())?,
        ))
    };
    let (mut terminate, mut interrupt, mut hangup) =
        signals().action(|| "failed to listen for signals".to_owned())?;
    let interrupted = |how: &str| Err(Error::Interrupted(format!("({how}) while building {tag}")));
    let result = tokio::select! {
        result = build_in(report, &rootfs, tag) => result,
        _ = terminate.recv() => interrupted("SIGTERM"),
        _ = interrupt.recv() => interrupted("SIGINT"),
        _ = hangup.recv() => interrupted("SIGHUP"),
    };
    // A step still running was cut short: stop it and all it started before its files go.
    let group = STEP_GROUP.swap(0, std::sync::atomic::Ordering::SeqCst);
    if group > 0 {
        let group = nix::unistd::Pid::from_raw(group);
        let _ = nix::sys::signal::killpg(group, nix::sys::signal::Signal::SIGKILL);
        // Until the whole group is gone (nothing writes into the files removed next).
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while nix::sys::signal::killpg(group, None).is_ok() && std::time::Instant::now() < deadline
        {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
    remove_rootfs(&rootfs);
    if let Err(error) = result {
        report(RunEvent::StepFinished(format!(
            "building {tag} failed; its temporary files are removed"
        )));
        return Err(error);
    }
    report(RunEvent::StepFinished(format!("built {tag}")));
    Ok(())
}

/// Where a build's root filesystem goes (`<prefix><pid>`).
const ROOTFS_PREFIX: &str = "/var/tmp/pgharness-image-";

/// The root filesystems of earlier builds that were killed outright (SIGKILL leaves no
/// chance to clean up): those whose process no longer runs.
fn remove_leftovers() {
    let Ok(entries) = std::fs::read_dir("/var/tmp") else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let pid = path
            .to_str()
            .and_then(|p| p.strip_prefix(ROOTFS_PREFIX))
            .and_then(|pid| pid.parse::<i32>().ok());
        if let Some(pid) = pid
            && !pgharness::backend::process_alive(pid)
        {
            remove_rootfs(&path);
        }
    }
}

/// Removes a build's root filesystem. debootstrap mounts proc and sys inside it (and a
/// build cut short leaves them mounted): those are unmounted first, and nothing is removed
/// while anything is still mounted below it, since removing through a mount would delete
/// the host's own files.
fn remove_rootfs(rootfs: &Path) {
    if !rootfs.exists() {
        return;
    }
    let mounted_below = || -> Vec<String> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut below: Vec<String> = mounts
            .lines()
            .filter_map(|line| line.split_whitespace().nth(1))
            // /proc/self/mounts escapes spaces and the like as octal; our paths have none.
            .filter(|point| Path::new(point).starts_with(rootfs))
            .map(str::to_owned)
            .collect();
        below.sort_by_key(|point| std::cmp::Reverse(point.len()));
        below
    };
    for point in mounted_below() {
        let _ = std::process::Command::new("umount")
            .args(["-l", &point])
            .status();
    }
    let left = mounted_below();
    if !left.is_empty() {
        tracing::warn!(
            ?left,
            "not removing {}: still mounted below it",
            rootfs.display()
        );
        return;
    }
    if let Err(error) = std::fs::remove_dir_all(rootfs) {
        tracing::warn!(%error, "could not remove {}", rootfs.display());
    }
}

async fn build_in(report: Reporter<'_>, rootfs: &Path, tag: &str) -> Result<()> {
    let mirror = mirror();
    run_step(
        report,
        "debootstrap",
        tokio::process::Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
            .arg(rootfs)
            .arg(&mirror),
    )
    .await
    .map_err(|error| {
        Error::program(
            "debootstrap",
            format!(
                "Debian {SUITE} from {mirror} failed (set DEBIAN_MIRROR to another mirror): {error}"
            ),
        )
    })?;
    let entrypoint = rootfs.join("usr/local/bin/docker-entrypoint.sh");
    std::fs::write(&entrypoint, ENTRYPOINT)
        .and_then(|()| {
            std::fs::set_permissions(
                &entrypoint,
                std::os::unix::fs::PermissionsExt::from_mode(0o755),
            )
        })
        .action(|| format!("failed to write {}", entrypoint.display()))?;
    let _ = std::fs::remove_dir_all(rootfs.join("var/cache/apt/archives"));
    let _ = std::fs::remove_dir_all(rootfs.join("var/lib/apt/lists"));
    let script = format!(
        "tar -C '{}' -c . | docker import \
           --change 'ENTRYPOINT [\"/usr/local/bin/docker-entrypoint.sh\"]' \
           --change 'CMD [\"postgres\"]' \
           --change 'ENV PGDATA=/var/lib/postgresql/data' \
           --change 'ENV LANG=C.UTF-8' \
           --change 'EXPOSE 5432' - '{tag}'",
        rootfs.display()
    );
    run_step(
        report,
        "docker import",
        tokio::process::Command::new("sh").args(["-c", &script]),
    )
    .await
}
