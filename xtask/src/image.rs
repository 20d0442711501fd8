//! `cargo xtask image`: a Postgres image built from Debian's packages, for machines that
//! reach no container registry. debootstrap makes a Debian 13 (trixie) root filesystem
//! with postgresql-17, an entrypoint following the official image's contract is added,
//! and `docker import` turns it into an image.

use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};

use anyhow::{Context, bail};
use pgharness::backend::container::{self, DEFAULT_IMAGE, LOCAL_IMAGE};
use pgharness::{BackendKind, Settings};
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::ui::Progress;

const ENTRYPOINT: &str = include_str!("../assets/postgres-entrypoint.sh");
const SUITE: &str = "trixie";
const PACKAGES: &str = "postgresql-17,ca-certificates";

#[derive(clap::Args)]
pub(crate) struct Image {
    /// The image name to create.
    #[arg(long, default_value = LOCAL_IMAGE)]
    tag: String,
    /// Rebuild even if the image exists.
    #[arg(long)]
    force: bool,
}

impl Image {
    pub(crate) async fn run(self) -> anyhow::Result<ExitCode> {
        let docker = container::docker().await?;
        if !self.force && docker.inspect_image(&self.tag).await.is_ok() {
            eprintln!("xtask: {} already exists (--force rebuilds it)", self.tag);
            return Ok(ExitCode::SUCCESS);
        }
        build(&self.tag).await?;
        Ok(ExitCode::SUCCESS)
    }
}

/// True when starting failed only for want of an image that this machine can build.
pub(crate) async fn worth_building(settings: &Settings) -> bool {
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
    progress: &Progress,
    what: &str,
    command: &mut tokio::process::Command,
) -> anyhow::Result<()> {
    progress.say(what.to_owned());
    // A group of its own, so that an interrupted build stops the step and everything it
    // started (debootstrap runs dpkg in the chroot, `docker import` a tar).
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("failed to start: {what}"))?;
    if let Some(pid) = child.id() {
        STEP_GROUP.store(pid as i32, std::sync::atomic::Ordering::SeqCst);
    }
    let stdout = child.stdout.take().context("no stdout")?;
    let stderr = child.stderr.take().context("no stderr")?;
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
        progress.say(format!("{what}: {}", line.trim()));
    }
    let status = child.wait().await?;
    STEP_GROUP.store(0, std::sync::atomic::Ordering::SeqCst);
    let tail = errors.await.unwrap_or_default();
    if !status.success() {
        bail!("{what} failed ({status}):\n{}", tail.join("\n"));
    }
    Ok(())
}

/// Builds `tag` from Debian packages (needs root, Docker and the Debian mirror).
pub(crate) async fn build(tag: &str) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!(
            "building the image needs root (debootstrap); run `sudo cargo xtask image`, or set PGHARNESS_IMAGE to an image you have"
        );
    }
    let progress = Progress::start(&format!("building {tag} from Debian packages"));
    if !which("debootstrap") {
        run_step(
            &progress,
            "apt-get update",
            tokio::process::Command::new("apt-get").args(["update", "-q"]),
        )
        .await?;
        run_step(
            &progress,
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
    let (mut terminate, mut interrupt, mut hangup) = (
        signal(SignalKind::terminate())?,
        signal(SignalKind::interrupt())?,
        signal(SignalKind::hangup())?,
    );
    let result = tokio::select! {
        result = build_in(&progress, &rootfs, tag) => result,
        _ = terminate.recv() => Err(anyhow::anyhow!("stopped (SIGTERM)")),
        _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted")),
        _ = hangup.recv() => Err(anyhow::anyhow!("hung up")),
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
    result.with_context(|| format!("building {tag} failed; its temporary files are removed"))?;
    progress.finish(&format!("built {tag}"));
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

async fn build_in(progress: &Progress, rootfs: &Path, tag: &str) -> anyhow::Result<()> {
    let mirror = mirror();
    run_step(
        progress,
        "debootstrap",
        tokio::process::Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={PACKAGES}"), SUITE])
            .arg(rootfs)
            .arg(&mirror),
    )
    .await
    .with_context(|| format!("debootstrap of Debian {SUITE} from {mirror} failed (set DEBIAN_MIRROR to another mirror)"))?;
    let entrypoint = rootfs.join("usr/local/bin/docker-entrypoint.sh");
    std::fs::write(&entrypoint, ENTRYPOINT)?;
    std::fs::set_permissions(
        &entrypoint,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
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
        progress,
        "docker import",
        tokio::process::Command::new("sh").args(["-c", &script]),
    )
    .await
}
