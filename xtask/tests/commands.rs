//! xtask's commands driven as a person runs them, on a workspace of their own.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A checkout copied elsewhere: the workspace marker, xtask's manifest and migrations.
fn copied_checkout(label: &str) -> PathBuf {
    let original = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let copy = std::env::temp_dir().join(format!("pgharness-copy-{label}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&copy);
    std::fs::create_dir_all(copy.join("xtask")).unwrap();
    std::fs::create_dir_all(copy.join("sql")).unwrap();
    std::fs::write(copy.join("Cargo.toml"), "[workspace]\nmembers = []\n").unwrap();
    std::fs::copy(
        original.join("xtask/Cargo.toml"),
        copy.join("xtask/Cargo.toml"),
    )
    .unwrap();
    std::fs::write(copy.join("sql/0001_t.sql"), "CREATE TABLE t (id int);").unwrap();
    copy
}

/// The xtask binary, run as `cargo xtask` runs it from `root`.
fn xtask(root: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(root)
        .env("CARGO_MANIFEST_DIR", root.join("xtask"))
        .env_remove("PGHARNESS_URL")
        .env_remove("PGHARNESS_BACKEND")
        .env_remove("CARGO_TARGET_DIR")
        .args(args)
        .output()
        .expect("xtask runs")
}

fn native_states(root: &Path) -> Vec<String> {
    let dir = root.join("target/pgharness");
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with("native-") && n.ends_with(".json"))
        .map(|n| std::fs::read_to_string(dir.join(n)).unwrap_or_default())
        .collect()
}

#[test]
fn a_copied_checkout_starts_and_stops_its_own_servers_only() {
    let copy = copied_checkout("native");
    let original = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let before = native_states(original);

    let up = xtask(&copy, &["up", "--backend", "native"]);
    let stdout = String::from_utf8_lossy(&up.stdout);
    assert!(
        up.status.success(),
        "{}{}",
        stdout,
        String::from_utf8_lossy(&up.stderr)
    );
    let env =
        std::fs::read_to_string(copy.join("target/pgharness/env")).expect("up writes the env file");
    let url = env
        .lines()
        .find_map(|l| l.strip_prefix("DATABASE_URL="))
        .expect("the env file has the URL")
        .to_owned();
    // The native server's own password (a new one at each start), beside its record.
    let password = std::fs::read_dir(copy.join("target/pgharness"))
        .unwrap()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().ends_with(".password"))
        .map(|e| std::fs::read_to_string(e.path()).unwrap())
        .and_then(|text| text.trim().split_once(':').map(|(_, p)| p.to_owned()))
        .expect("the native server's password file");
    assert!(
        !stdout.contains(password.trim())
            && !String::from_utf8_lossy(&up.stderr).contains(password.trim()),
        "up printed the server's password"
    );
    let port = url
        .rsplit(':')
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let states = native_states(&copy);
    assert_eq!(
        states.len(),
        1,
        "the copy records its server in its own target/"
    );
    assert!(states[0].contains(&port), "{states:?} {port}");
    assert_eq!(
        native_states(original),
        before,
        "the original's state was touched"
    );

    let down = xtask(&copy, &["down"]);
    let stderr = String::from_utf8_lossy(&down.stderr);
    assert!(down.status.success(), "{stderr}");
    assert!(
        stderr.contains("native server on ") && stderr.contains(&format!(".s.PGSQL.{port}")),
        "{stderr}"
    );
    assert!(native_states(&copy).is_empty());
    assert_eq!(native_states(original), before);
    std::fs::remove_dir_all(&copy).unwrap();
}

#[test]
fn up_on_a_url_server_that_refuses_fails_at_once_and_never_says_ready() {
    let copy = copied_checkout("url");
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = closed.local_addr().unwrap().port();
    drop(closed);
    let up = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .current_dir(&copy)
        .env("CARGO_MANIFEST_DIR", copy.join("xtask"))
        .env(
            "PGHARNESS_URL",
            format!("postgres://app:s3cret@127.0.0.1:{port}/app"),
        )
        .env_remove("PGHARNESS_BACKEND")
        .args(["up", "--backend", "url"])
        .output()
        .expect("xtask runs");
    let stderr = String::from_utf8_lossy(&up.stderr);
    assert!(!up.status.success(), "{stderr}");
    assert!(!stderr.contains("postgres ready"), "{stderr}");
    assert!(
        stderr.contains("PGHARNESS_URL") && stderr.contains(&port.to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("s3cret"), "{stderr}");
    std::fs::remove_dir_all(&copy).unwrap();
}
