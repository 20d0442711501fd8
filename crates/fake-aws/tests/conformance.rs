//! fake-aws checked against the spec by a client that is not ours: `conformance/ssm_client.py`
//! (botocore's signer, the `websockets` package, a codec written from ssm-protocol.md) runs
//! the seed recipe's shape against the fake SSM service and checks every field AWS's own
//! tools rely on. Needs python3 with botocore and websockets (`.ci/run` installs them).

use std::sync::Arc;

use fake_aws::ssm::{SsmConfig, SsmService};
use fake_aws::{CredentialStore, KeyPair};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_independent_client_built_from_the_spec_finds_fake_aws_conformant() {
    let keys = KeyPair::random_temporary();
    let config = SsmConfig::default();
    let target = config.online_targets[0].clone();
    let ssm = SsmService::start(config, Arc::new(CredentialStore::new([keys.clone()])))
        .await
        .expect("fake SSM starts");
    let credentials = keys.to_credentials();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/conformance/ssm_client.py");
    let mut command = tokio::process::Command::new("python3");
    command
        .arg(&script)
        .env("AWS_ENDPOINT_URL_SSM", ssm.endpoint_url())
        .env("AWS_REGION", "eu-west-2")
        .env("AWS_ACCESS_KEY_ID", credentials.access_key_id())
        .env("AWS_SECRET_ACCESS_KEY", credentials.secret_access_key())
        .env("SSM_TARGET", &target);
    if let Some(token) = credentials.session_token() {
        command.env("AWS_SESSION_TOKEN", token);
    }
    let output = command
        .output()
        .await
        .expect("python3 runs (install python3 with botocore and websockets: see .ci/run)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("checks passed"), "{stdout}");
    assert_eq!(ssm.open_sessions(), 0, "the session was terminated");
}
