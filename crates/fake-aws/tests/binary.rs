//! The `fake-aws` binary: prints what clients need as KEY=value lines (and writes them to
//! --env-file), serves with stdout closed, and stops cleanly on SIGTERM.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use aws_credential_types::Credentials;
use rds_iam::credentials::StaticCredentials;
use rds_iam::{RdsTarget, TcpDialer, TlsPolicy, TokenCache, TokenRequest, connect};

#[tokio::test]
async fn the_binary_prints_its_endpoints_and_serves_them() {
    let (backend, password) = common::backend().await;
    // Secrets go in a directory only this user can enter, removed at the end.
    let private = common::PrivateDir::new();
    let env_file = private.path().join("env");
    let mut command = Command::new(env!("CARGO_BIN_EXE_fake-aws"));
    command.args([
        "--backend",
        &backend.to_string(),
        "--user",
        common::USER,
        "--env-file",
    ]);
    command.arg(&env_file);
    if let Some(password) = password {
        let file = private.secret_file("backend-password", &password);
        command.arg("--backend-password-file").arg(file);
    }
    let mut child = command
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("fake-aws starts");
    let mut lines = Vec::new();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    // Without --ssm, the pid is the last line.
    while !lines
        .last()
        .is_some_and(|l: &String| l.starts_with("FAKE_AWS_PID="))
    {
        let mut line = String::new();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "fake-aws exited early after {lines:?}"
        );
        lines.push(line.trim().to_owned());
    }
    drop(stdout); // it must keep serving with its stdout closed
    let values: HashMap<String, String> = lines
        .iter()
        .map(|line| {
            let (k, v) = line.split_once('=').expect("KEY=value");
            (k.to_owned(), v.to_owned())
        })
        .collect();
    assert_eq!(
        std::fs::read_to_string(&env_file).unwrap(),
        lines.join("\n") + "\n"
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&env_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the env file holds a secret key");
    for key in [
        "FAKE_AWS_PID",
        "FAKE_AWS_RDS_ADDR",
        "FAKE_AWS_RDS_HOST",
        "AWS_REGION",
        "AWS_DEFAULT_REGION",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "PGHARNESS_CA_BUNDLE",
    ] {
        assert!(!values[key].is_empty(), "{key} is empty");
    }

    let credentials = Credentials::new(
        &values["AWS_ACCESS_KEY_ID"],
        &values["AWS_SECRET_ACCESS_KEY"],
        Some(values["AWS_SESSION_TOKEN"].clone()),
        None,
        "env",
    );
    let tokens = TokenCache::new(Arc::new(StaticCredentials(credentials)));
    let target = RdsTarget {
        endpoint: TokenRequest::new(
            &values["FAKE_AWS_RDS_HOST"],
            values["FAKE_AWS_RDS_PORT"].parse().unwrap(),
            common::USER,
            Some(&values["AWS_REGION"]),
        )
        .unwrap(),
        database: "postgres".into(),
        tls: rds_iam::tls::client_config(&TlsPolicy::VerifyFull {
            ca_bundle: values["PGHARNESS_CA_BUNDLE"].clone().into(),
        })
        .unwrap(),
        wake_deadline: Duration::from_secs(10),
    };
    let dialer = TcpDialer::new(values["FAKE_AWS_RDS_ADDR"].clone());
    let client = connect(&target, None, &dialer, &tokens, &common::ignore_waits)
        .await
        .expect("login through the binary");
    client.simple_query("SELECT 1").await.unwrap();

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{status}");
    std::fs::remove_file(env_file).ok();
}
