//! Cross-check against an independent signer: botocore (AWS's Python SDK core) mints the
//! same tokens for 240 random hosts, ports, users (with `+`, `&`, `#`, spaces, unicode),
//! regions and credentials, with and without session tokens, at fixed times.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rds_iam::token::{TokenRequest, mint};

const USER_CHARS: &[&str] = &[
    "a", "Z", "0", "_", "-", ".", "~", "+", "&", "#", " ", "=", "/", "%", "é", "ß", "数", "🙂",
    "'", "\"",
];
const REGIONS: &[&str] = &[
    "us-east-1",
    "eu-west-2",
    "ap-southeast-2",
    "sa-east-1",
    "us-gov-west-1",
];

fn random_case(rng: &mut StdRng) -> serde_json::Value {
    let region = REGIONS[rng.random_range(0..REGIONS.len())];
    let host = format!(
        "db{}.cluster-{:06x}.{region}.rds.amazonaws.com",
        rng.random_range(0..1000),
        rng.random_range(0..0xffffff)
    );
    let user: String = (0..rng.random_range(1..12))
        .map(|_| USER_CHARS[rng.random_range(0..USER_CHARS.len())])
        .collect();
    let session_token = rng
        .random_bool(0.5)
        .then(|| format!("IQoJb3JpZ2luX2VjE+/{}==", rng.random_range(0..u64::MAX)));
    serde_json::json!({
        "host": host,
        "port": rng.random_range(1..=65535u16),
        "user": user,
        "region": region,
        "access_key": format!("AKIA{:016X}", rng.random_range(0..u64::MAX)),
        "secret_key": format!("{:040x}", rng.random_range(0..u128::MAX)),
        "session_token": session_token,
        "time": rng.random_range(1_500_000_000u64..2_000_000_000),
    })
}

#[test]
fn botocore_mints_the_same_tokens() {
    let mut rng = StdRng::seed_from_u64(0x7067_6861);
    let cases: Vec<serde_json::Value> = (0..240).map(|_| random_case(&mut rng)).collect();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/botocore_tokens.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 runs");
    {
        let mut stdin = child.stdin.take().unwrap();
        for case in &cases {
            writeln!(stdin, "{case}").unwrap();
        }
    }
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "botocore failed (install it: `pip install botocore`; .ci/run does):\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let theirs: Vec<String> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(theirs.len(), cases.len());
    let mut with_session = 0;
    for (case, theirs) in cases.iter().zip(theirs) {
        let request = TokenRequest::new(
            case["host"].as_str().unwrap(),
            case["port"].as_u64().unwrap() as u16,
            case["user"].as_str().unwrap(),
            Some(case["region"].as_str().unwrap()),
        )
        .unwrap();
        let session = case["session_token"].as_str().map(str::to_owned);
        with_session += usize::from(session.is_some());
        let credentials = Credentials::new(
            case["access_key"].as_str().unwrap(),
            case["secret_key"].as_str().unwrap(),
            session,
            None,
            "crosscheck",
        );
        let time = SystemTime::UNIX_EPOCH + Duration::from_secs(case["time"].as_u64().unwrap());
        let ours = mint(&request, &credentials, time).unwrap();
        assert_eq!(ours.expose(), theirs, "case {case}");
    }
    assert!(
        with_session > 50 && with_session < 190,
        "both kinds of credentials are covered: {with_session}"
    );
}
