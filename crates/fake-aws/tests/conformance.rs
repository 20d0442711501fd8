//! fake-aws checked against the spec by a client that is not ours: `conformance/ssm_client.py`
//! (botocore's signer, the `websockets` package, a codec written from ssm-protocol.md) runs
//! the seed recipe's shape against the fake SSM service and checks every field AWS's own
//! tools rely on; then AWS's own CLI runs the recipe's `aws ssm start-session`, with that
//! client in session-manager-plugin's place (the plugin itself is a Go program from GitHub,
//! which these machines cannot reach). Needs python3 with botocore and websockets, and the
//! AWS CLI (`pip install awscli`; `.ci/run` and `cargo xtask ci` install them).

use std::sync::Arc;

use fake_aws::ssm::{SsmConfig, SsmService};
use fake_aws::{CredentialStore, KeyPair};

fn script() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/ssm_client.py")
}

async fn fake_ssm() -> (SsmService, KeyPair, String) {
    let keys = KeyPair::random_temporary();
    let config = SsmConfig::default();
    let target = config.online_targets[0].clone();
    let ssm = SsmService::start(config, Arc::new(CredentialStore::new([keys.clone()])))
        .await
        .expect("fake SSM starts");
    (ssm, keys, target)
}

/// A command with fake-aws's endpoint and test credentials and none of the user's AWS
/// configuration.
fn aws_env(
    program: &str,
    ssm: &SsmService,
    keys: &KeyPair,
    target: &str,
) -> tokio::process::Command {
    let credentials = keys.to_credentials();
    let mut command = tokio::process::Command::new(program);
    command
        .env("AWS_ENDPOINT_URL_SSM", ssm.endpoint_url())
        .env("AWS_REGION", "eu-west-2")
        .env("AWS_DEFAULT_REGION", "eu-west-2")
        .env("AWS_ACCESS_KEY_ID", credentials.access_key_id())
        .env("AWS_SECRET_ACCESS_KEY", credentials.secret_access_key())
        .env("AWS_CONFIG_FILE", "/dev/null")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
        .env_remove("AWS_PROFILE")
        .env("SSM_TARGET", target);
    if let Some(token) = credentials.session_token() {
        command.env("AWS_SESSION_TOKEN", token);
    }
    command
}

fn passed(output: &std::process::Output) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("checks passed"), "{stdout}{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_client_built_from_the_spec_finds_fake_aws_conformant() {
    let (ssm, keys, target) = fake_ssm().await;
    let output = aws_env("python3", &ssm, &keys, &target)
        .arg(script())
        .output()
        .await
        .expect("python3 runs (install python3 with botocore and websockets: see .ci/run)");
    passed(&output);
    assert_eq!(ssm.open_sessions(), 0, "the session was terminated");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn awss_own_cli_starts_the_recipes_session_against_fake_aws() {
    let (ssm, keys, target) = fake_ssm().await;
    // The CLI finds `session-manager-plugin` on PATH; here it is the spec's client.
    // A directory made for it (0700, a new name): a predictable one another user made
    // first could hand the CLI a plugin of theirs.
    let plugin_dir = std::env::temp_dir().join(format!("fake-aws-plugin-{}", uuid::Uuid::new_v4()));
    std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), 0o700)
        .create(&plugin_dir)
        .unwrap();
    let plugin = plugin_dir.join("session-manager-plugin");
    std::fs::write(
        &plugin,
        format!("#!/bin/sh\nexec python3 '{}' \"$@\"\n", script().display()),
    )
    .unwrap();
    std::fs::set_permissions(&plugin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let path = format!(
        "{}:{}",
        plugin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = aws_env("aws", &ssm, &keys, &target)
        .env("PATH", path)
        .args([
            "ssm",
            "start-session",
            "--target",
            &target,
            "--document-name",
            "AWS-StartPortForwardingSessionToRemoteHost",
            "--parameters",
            r#"{"host":["db.example"],"portNumber":["5432"],"localPortNumber":["1053"]}"#,
        ])
        .output()
        .await
        .expect("the AWS CLI runs (`pip install awscli`; .ci/run installs it)");
    let _ = std::fs::remove_dir_all(&plugin_dir);
    passed(&output);
    assert_eq!(ssm.start_session_calls(), 1, "the CLI started one session");
    assert_eq!(ssm.open_sessions(), 0, "the session was terminated");
}
