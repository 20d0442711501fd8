//! `cargo xtask ci --only outside-workspace`: README's "Use it in your project" recipe, run
//! as a user outside this repository would run it: a fresh workspace in a temporary
//! directory (an app with sqlx-layout migrations, a seed row, a fixture and tests on
//! `#[pgharness::test]` with an injected `PgPool`, and a `#[sqlx::test]` file converted by
//! replacing the attribute), pgharness as a path dependency without
//! its default features, plain `cargo test` twice on the native backend. Checked: every test
//! passes both times, sqlx's own migrator finds each schema up to date, the second run
//! claims schemas the first one recycled. Then `cargo pgharness` installed from this
//! checkout (`cargo install --path crates/cargo-pgharness --debug`, into a temporary root on
//! PATH): `cargo pgharness test` on the default local backend and through the emulated RDS
//! path, each with every test passed and pool hits in its summary, and `cargo pgharness
//! down` leaving no server, emulator, proxy or env file behind.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

const TESTS: &str = r#"use pgharness::sqlx::{self, PgPool};

async fn count(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM customers").fetch_one(pool).await.unwrap()
}

#[pgharness::test(fixtures("two_more"))]
async fn lists_the_seeded_customer_and_the_fixture(pool: PgPool) {
    assert_eq!(count(&pool).await, 3);
}

#[pgharness::test]
async fn adds_a_customer_and_renames_the_seeded_one(pool: PgPool) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO customers (name) VALUES ('new')").execute(&pool).await?;
    sqlx::query("UPDATE customers SET name = 'renamed' WHERE name = 'house account'").execute(&pool).await?;
    assert_eq!(count(&pool).await, 2);
    Ok(())
}

#[pgharness::test]
async fn migrating_at_start_up_is_a_no_op(pool: PgPool) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    sqlx::migrate::Migrator::new(dir).await.unwrap().run(&pool).await.unwrap();
    assert_eq!(count(&pool).await, 1);
}
"#;

/// A test file as a `#[sqlx::test]` suite has it, converted the way README's "From
/// `#[sqlx::test]`" says: the attribute replaced, nothing else.
const SQLX_TEST_SUITE: &str = r#"use sqlx::{PgConnection, PgPool, Row};

#[sqlx::test]
async fn a_pool_sees_the_migrated_seeded_schema(pool: PgPool) -> sqlx::Result<()> {
    let row = sqlx::query("SELECT count(*) AS n FROM customers").fetch_one(&pool).await?;
    assert_eq!(row.get::<i64, _>("n"), 1);
    Ok(())
}

#[sqlx::test(fixtures("two_more"))]
async fn fixtures_load_before_the_body(mut conn: PgConnection) {
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM customers").fetch_one(&mut conn).await.unwrap();
    assert_eq!(n, 3);
}

#[sqlx::test(migrations = false)]
async fn without_migrations_the_schema_is_empty(pool: PgPool) {
    let tables: i64 = sqlx::query_scalar("SELECT count(*) FROM pg_tables WHERE schemaname = current_schema()")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(tables, 0);
}
"#;

/// Tests in the workspace: 3 written for pgharness, 3 converted from `#[sqlx::test]`.
const TESTS_IN_ALL: usize = 6;

fn write(root: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    let path = root.join(name);
    std::fs::create_dir_all(path.parent().unwrap_or(root))?;
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes the workspace of a user: nothing of this repository but the path dependency.
fn create(root: &Path) -> anyhow::Result<()> {
    let pgharness = crate::project_root().join("crates/pgharness");
    write(
        root,
        "Cargo.toml",
        &format!(
            r#"[package]
name = "shop"
version = "0.1.0"
edition = "2021"

[workspace]

[dev-dependencies]
pgharness = {{ path = "{}", default-features = false, features = ["sqlx"] }}
sqlx = {{ version = "0.8", default-features = false, features = ["postgres", "runtime-tokio", "migrate"] }}
tokio = {{ version = "1", features = ["macros", "rt"] }}
"#,
            pgharness.display()
        ),
    )?;
    write(root, "src/lib.rs", "//! The shop.\n")?;
    write(
        root,
        "pgharness.toml",
        "backend = \"native\"\nmigrations = \"migrations\"\nmigrations_layout = \"sqlx\"\n",
    )?;
    write(
        root,
        "migrations/20240101000000_customers.sql",
        "BEGIN;\nCREATE TABLE customers (id bigserial PRIMARY KEY, name text NOT NULL);\nCOMMIT;\n",
    )?;
    write(
        root,
        "migrations/20240102000000_house_account.up.sql",
        "INSERT INTO customers (name) VALUES ('house account');\n",
    )?;
    write(
        root,
        "migrations/20240102000000_house_account.down.sql",
        "DELETE FROM customers WHERE name = 'house account';\n",
    )?;
    write(
        root,
        "tests/fixtures/two_more.sql",
        "INSERT INTO customers (name) VALUES ('a'), ('b');\n",
    )?;
    write(root, "tests/shop.rs", TESTS)?;
    write(
        root,
        "tests/converted.rs",
        &SQLX_TEST_SUITE.replace("#[sqlx::test", "#[pgharness::test"),
    )
}

pub(crate) async fn check() -> anyhow::Result<()> {
    eprintln!("xtask ci: README's recipe in a fresh workspace outside this one");
    let root = std::env::temp_dir().join(format!("pgharness-outside-{}", uuid::Uuid::new_v4()));
    create(&root)?;
    // Its build is kept between runs (its own target directory, here), its state with it.
    let target = crate::project_root().join("target/outside-workspace");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // A project locked at an older tokio, as many are: adding pgharness must not upgrade it
    // (the issue's project was on 1.40; pgharness declares 1.38). tokio-util is held back
    // with it, as such a project's lock file has it.
    for (package, version) in [("", ""), ("tokio-util", "0.7.12"), ("tokio", "1.38.0")] {
        let mut command = Command::new(&cargo);
        match package {
            "" => command.args(["generate-lockfile", "--quiet"]),
            _ => command.args(["update", "--quiet", "-p", package, "--precise", version]),
        };
        let status = command
            .current_dir(&root)
            .env("CARGO_TARGET_DIR", &target)
            .status()
            .with_context(|| format!("cargo update -p {package} --precise {version}"))?;
        if !status.success() {
            bail!("pgharness does not allow {package} {version} in a user's lock file ({status})");
        }
    }
    let run = || -> anyhow::Result<String> {
        let mut command = Command::new(&cargo);
        command
            .current_dir(&root)
            .args(["test", "--tests", "--quiet"])
            .env("CARGO_TARGET_DIR", &target);
        // Nothing of this repository's runs: no PGHARNESS_* setting, no run id.
        for (key, _) in std::env::vars() {
            if key.starts_with("PGHARNESS_") || key.starts_with("NEXTEST") {
                command.env_remove(key);
            }
        }
        let output = command
            .output()
            .context("cargo test in the outside workspace")?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() || text.matches("test result: ok. 3 passed").count() != 2 {
            bail!("`cargo test` in {} failed:\n{text}", root.display());
        }
        Ok(text)
    };
    run()?;
    run()?;
    let mut settings = pgharness::Settings::load_from(&root, Vec::new())?;
    settings.state_dir = target.join("pgharness");
    let server = pgharness::backend::ensure(&settings, &pgharness::events::log_only).await?;
    let client = pgharness_runner::servers::admin_client(&server).await?;
    let ns = pgharness::ledger::Namespace::of(&server.config());
    // The tests' teardowns are detached: the server finishes the last ones just after
    // `cargo test` exits. Wait for them (a schema left `active` would fail below).
    let mut statuses: Vec<(String, i32)> = Vec::new();
    for _ in 0..100 {
        let rows = client
            .query(
                &format!(
                    "SELECT status, uses FROM {ns}.ledger WHERE run_id IS DISTINCT FROM 'warmer'"
                ),
                &[],
            )
            .await?;
        statuses = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        if statuses.iter().all(|(status, _)| status != "active") {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // `passed`: recycled later (its app's connections were still closing at teardown).
    if statuses
        .iter()
        .any(|(status, _)| status != "ready" && status != "passed")
    {
        bail!(
            "schemas were dropped or kept after passing runs (a seed change must not drop them): {statuses:?}"
        );
    }
    if !statuses.iter().any(|(_, uses)| *uses >= 2) {
        bail!("the second run claimed no schema the first one recycled: {statuses:?}");
    }
    drop(client);
    eprintln!(
        "xtask ci: the outside workspace's tests passed twice under cargo test; {} schema(s) in its ledger, none dropped or kept, the second run reused the first's",
        statuses.len()
    );
    with_cargo_pgharness(&root, &target, &settings).await?;
    std::fs::remove_dir_all(&root)?;
    Ok(())
}

/// `cargo pgharness` as a user installs and runs it in their workspace.
async fn with_cargo_pgharness(
    root: &Path,
    target: &Path,
    settings: &pgharness::Settings,
) -> anyhow::Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let install_root = target.join("cargo-pgharness-install");
    // `--debug` with this checkout's target directory: the binary the workspace build made
    // is installed as it is, not rebuilt in release.
    let status = Command::new(&cargo)
        .current_dir(crate::project_root())
        .args([
            "install", "--quiet", "--locked", "--debug", "--force", "--path",
        ])
        .arg(crate::project_root().join("crates/cargo-pgharness"))
        .arg("--root")
        .arg(&install_root)
        .env("CARGO_TARGET_DIR", crate::project_root().join("target"))
        .status()
        .context("cargo install --path crates/cargo-pgharness")?;
    if !status.success() {
        bail!("`cargo install --path crates/cargo-pgharness` failed ({status})");
    }
    let path = std::env::join_paths(std::iter::once(install_root.join("bin")).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    let pgharness = |args: &[&str]| -> anyhow::Result<String> {
        let mut command = Command::new(&cargo);
        command
            .current_dir(root)
            .arg("pgharness")
            .args(args)
            .env("PATH", &path)
            .env("CARGO_TARGET_DIR", target);
        for (key, _) in std::env::vars() {
            if key.starts_with("PGHARNESS_") || key.starts_with("NEXTEST") {
                command.env_remove(key);
            }
        }
        let output = command
            .output()
            .with_context(|| format!("cargo pgharness {}", args.join(" ")))?;
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        if !output.status.success() {
            bail!(
                "`cargo pgharness {}` in {} failed:\n{text}",
                args.join(" "),
                root.display()
            );
        }
        Ok(text)
    };
    for args in [
        &["test"][..],
        &["test", "--backend", "rds", "--emulated"][..],
    ] {
        let text = pgharness(args)?;
        let hits = text.lines().find_map(|line| {
            line.split_once("pool: ")?
                .1
                .split_once(" hits")?
                .0
                .parse::<u64>()
                .ok()
        });
        let passed = format!("{TESTS_IN_ALL} tests run: {TESTS_IN_ALL} passed");
        if !text.contains(&passed) || hits.unwrap_or_default() == 0 {
            bail!(
                "`cargo pgharness {}` did not pass its {TESTS_IN_ALL} tests with pool hits:\n{text}",
                args.join(" ")
            );
        }
        eprintln!(
            "xtask ci: outside workspace, `cargo pgharness {}`: {TESTS_IN_ALL}/{TESTS_IN_ALL} passed, {} pool hit(s)",
            args.join(" "),
            hits.unwrap_or_default()
        );
    }
    pgharness(&["up"])?;
    pgharness(&["down"])?;
    let left: Vec<String> = [
        (!pgharness_runner::servers::running_local(settings)
            .await
            .is_empty())
        .then(|| "a local server".to_owned()),
        pgharness_runner::emulator::running(settings).map(|_| "the emulator".to_owned()),
        pgharness::backend::rds::env_file_path(settings)
            .exists()
            .then(|| "the env file".to_owned()),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !left.is_empty() {
        bail!("`cargo pgharness down` left {} behind", left.join(", "));
    }
    eprintln!("xtask ci: outside workspace, `cargo pgharness down` left nothing running");
    Ok(())
}
