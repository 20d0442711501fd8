//! Running cargo-nextest: the generated tool config (the DB test group sized from the
//! server's connection budget) and the child process.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;

use pgharness::Settings;
use tokio_postgres::Client;

use crate::error::{Action, Error, Result};
use crate::events::{Reporter, RunEvent};

/// Nextest's name for the group of tests that use a database.
pub const DB_GROUP: &str = "@tool:pgharness:db";

/// How many DB tests may run at once on this server, and the server's max_connections;
/// through the RDS proxy also within its session budget (`sessions`), which it shares with
/// every machine on the cluster.
pub async fn budget(
    client: &Client,
    pool_size: usize,
    sessions: Option<u32>,
) -> Result<(u32, u32)> {
    let row = client
        .query_one(
            "SELECT current_setting('max_connections')::int,
                    current_setting('superuser_reserved_connections')::int,
                    (SELECT count(*)::int FROM pg_stat_activity WHERE backend_type = 'client backend')",
            &[],
        )
        .await
        .action(|| "failed to read max_connections".to_owned())?;
    let (max, reserved, in_use): (i32, i32, i32) = (row.get(0), row.get(1), row.get(2));
    let threads = pgharness::budget::max_parallel_tests(
        max as u32,
        reserved as u32,
        in_use as u32,
        pool_size,
    );
    let threads = match sessions {
        Some(sessions) => threads.min(pgharness::budget::max_parallel_tests(
            sessions, 0, 0, pool_size,
        )),
        None => threads,
    };
    Ok((threads, max as u32))
}

/// The nextest filter of the tests that use a database: the integration tests of every
/// workspace member that depends on pgharness (directly, or through another member). Not
/// `rdeps(pgharness)`: nextest's package operators know workspace members only, and in a
/// user's workspace pgharness is a dependency, not a member.
pub fn db_filter(root: &Path) -> Result<String> {
    Ok(filter_for(&members(root)?))
}

/// The workspace's members, each with the names of its dependencies (`cargo metadata`).
pub fn members(root: &Path) -> Result<Vec<(String, Vec<String>)>> {
    let output =
        std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(root)
            .args([
                "metadata",
                "--format-version",
                "1",
                "--no-deps",
                "--offline",
            ])
            .output()
            .action(|| "failed to run `cargo metadata`".to_owned())?;
    if !output.status.success() {
        return Err(Error::program(
            "cargo metadata",
            String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        ));
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)
        .map_err(|error| Error::program("cargo metadata", error.to_string()))?;
    let members: Vec<(String, Vec<String>)> = metadata["packages"]
        .as_array()
        .map(|packages| {
            packages
                .iter()
                .map(|package| {
                    let name = package["name"].as_str().unwrap_or_default().to_owned();
                    let deps = package["dependencies"]
                        .as_array()
                        .map(|deps| {
                            deps.iter()
                                .filter_map(|dep| dep["name"].as_str().map(str::to_owned))
                                .collect()
                        })
                        .unwrap_or_default();
                    (name, deps)
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(members)
}

/// The filter for members `(name, dependency names)`: those that are pgharness or depend on
/// it, transitively through other members.
fn filter_for(members: &[(String, Vec<String>)]) -> String {
    let mut using: Vec<&str> = vec!["pgharness"];
    loop {
        let before = using.len();
        for (name, deps) in members {
            if !using.contains(&name.as_str())
                && deps.iter().any(|dep| using.contains(&dep.as_str()))
            {
                using.push(name);
            }
        }
        if using.len() == before {
            break;
        }
    }
    let chosen: Vec<String> = members
        .iter()
        .filter(|(name, _)| using.contains(&name.as_str()))
        .map(|(name, _)| format!("package(={name})"))
        .collect();
    if chosen.is_empty() {
        return "none()".to_owned();
    }
    format!("({}) & kind(test)", chosen.join(" | "))
}

/// Writes the tool config that puts every integration test of a crate that depends on
/// pgharness into the DB group, for the default and ci profiles.
pub fn write_tool_config(settings: &Settings, threads: u32) -> Result<PathBuf> {
    let filter = db_filter(&settings.root)?;
    std::fs::create_dir_all(&settings.state_dir)
        .action(|| format!("failed to create {}", settings.state_dir.display()))?;
    let path = settings.state_dir.join("nextest-tool.toml");
    let mut text = format!(
        "# Written by `cargo pgharness test`: the DB test group, sized from the server's max_connections.\n\
         [test-groups.\"{DB_GROUP}\"]\nmax-threads = {threads}\n"
    );
    for profile in ["default", "ci"] {
        text.push_str(&format!(
            "\n[[profile.{profile}.overrides]]\nfilter = \"{filter}\"\ntest-group = \"{DB_GROUP}\"\n"
        ));
    }
    std::fs::write(&path, text).action(|| format!("failed to write {}", path.display()))?;
    Ok(path)
}

/// The arguments for `cargo nextest run`: libtest options written after `--` (as
/// `cargo test` takes them, e.g. `-- --test-threads 32`), which nextest refuses there, become
/// nextest's own; test name filters after `--` stay where nextest reads them.
pub fn nextest_args(args: &[String]) -> Vec<String> {
    let Some(split) = args.iter().position(|a| a == "--") else {
        return args.to_vec();
    };
    let mut out: Vec<String> = args[..split].to_vec();
    let mut filters = Vec::new();
    let mut rest = args[split + 1..].iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--test-threads" => {
                out.push("--test-threads".into());
                out.extend(rest.next().cloned());
            }
            "--nocapture" => out.push("--no-capture".into()),
            "--ignored" => out.extend(["--run-ignored".into(), "only".into()]),
            "--include-ignored" => out.extend(["--run-ignored".into(), "all".into()]),
            "--exact" => out.push("--exact".into()),
            other => match other.strip_prefix("--test-threads=") {
                Some(n) => out.extend(["--test-threads".into(), n.to_owned()]),
                None => filters.push(arg.clone()),
            },
        }
    }
    if !filters.is_empty() {
        out.push("--".into());
        out.extend(filters);
    }
    out
}

/// Builds the tests `args` select without running them (`cargo nextest run --no-run`), so
/// that a run can overlap the build with what it waits for (the RDS path's tunnel and the
/// pool's first schemas). Quiet: the run proper shows the same build as done.
pub async fn build(root: PathBuf, args: Vec<String>) -> Result<ExitStatus> {
    let mut command =
        tokio::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .current_dir(&root)
        .args(["nextest", "run", "--no-run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true);
    let args = nextest_args(&args);
    if args.is_empty() {
        command.arg("--workspace");
    } else {
        command.args(args.iter().take_while(|arg| *arg != "--"));
    }
    command
        .status()
        .await
        .action(|| "failed to run `cargo nextest run --no-run`".to_owned())
}

/// Runs `cargo nextest run` with the tool config and environment; returns its status.
/// Ctrl-C reaches nextest directly (same process group); we wait for it to finish.
pub async fn run(
    root: &Path,
    tool_config: &Path,
    args: &[String],
    env: &[(String, String)],
    report: Reporter<'_>,
) -> Result<ExitStatus> {
    let mut command =
        tokio::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    command
        .current_dir(root)
        .args(["nextest", "run", "--tool-config-file"])
        .arg(format!("pgharness:{}", tool_config.display()));
    let args = nextest_args(args);
    if args.is_empty() {
        command.arg("--workspace");
    } else {
        command.args(&args);
    }
    command.envs(env.iter().map(|(k, v)| (k, v)));
    let mut child = command.spawn().map_err(|error| {
        Error::program(
            "cargo nextest",
            format!("failed to start `cargo nextest run`: {error} (install it: `cargo install cargo-nextest --locked`)"),
        )
    })?;
    report(RunEvent::NextestStarted);
    loop {
        tokio::select! {
            status = child.wait() => return status.action(|| "failed to wait for cargo nextest".to_owned()),
            _ = tokio::signal::ctrl_c() => report(RunEvent::Interrupted),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{filter_for, nextest_args};

    fn member(name: &str, deps: &[&str]) -> (String, Vec<String>) {
        (
            name.to_owned(),
            deps.iter().map(|d| d.to_string()).collect(),
        )
    }

    #[test]
    fn the_db_group_is_every_member_that_uses_pgharness() {
        // A user's workspace: pgharness is a dependency; a test-utils member passes it on.
        let members = [
            member("app", &["sqlx", "test-utils"]),
            member("test-utils", &["pgharness"]),
            member("cli", &["clap"]),
        ];
        assert_eq!(
            filter_for(&members),
            "(package(=app) | package(=test-utils)) & kind(test)"
        );
        // This repository: pgharness is a member itself.
        assert_eq!(
            filter_for(&[
                member("pgharness", &["tokio"]),
                member("todo-app", &["pgharness"])
            ]),
            "(package(=pgharness) | package(=todo-app)) & kind(test)"
        );
        assert_eq!(filter_for(&[member("cli", &["clap"])]), "none()");
    }

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(str::to_owned).collect()
    }

    #[test]
    fn libtest_options_after_the_separator_become_nextest_options() {
        assert_eq!(
            nextest_args(&args("-p todo-app -- --test-threads 32")),
            args("-p todo-app --test-threads 32")
        );
        assert_eq!(
            nextest_args(&args(
                "-p todo-app -- --test-threads=4 --nocapture --ignored"
            )),
            args("-p todo-app --test-threads 4 --no-capture --run-ignored only")
        );
        // Test name filters stay after the separator, where nextest reads them.
        assert_eq!(
            nextest_args(&args("-p todo-app -- --test-threads 2 completes_a_todo")),
            args("-p todo-app --test-threads 2 -- completes_a_todo")
        );
        assert_eq!(nextest_args(&args("-p todo-app")), args("-p todo-app"));
    }
}
