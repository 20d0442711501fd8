//! Checking an IAM auth token the way RDS does: signature (recomputed with fake-aws' own
//! credential store), date window, host and port, user, action and the `rds_iam` grant.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::credentials::CredentialStore;
use crate::sigv4::{Presigned, constant_time_eq};

/// What a token must match.
#[derive(Clone, Debug)]
pub(crate) struct Expect<'a> {
    pub(crate) hostname: &'a str,
    pub(crate) port: u16,
    pub(crate) region: &'a str,
    pub(crate) user: &'a str,
    pub(crate) allowed_users: &'a [String],
    pub(crate) now: SystemTime,
    pub(crate) token_ttl: Duration,
    pub(crate) max_skew: Duration,
}

fn parse_amz_date(text: &str) -> Result<SystemTime, String> {
    let bad = || format!("X-Amz-Date `{text}` is not yyyymmddThhmmssZ");
    if text.len() != 16 || &text[8..9] != "T" || !text.ends_with('Z') {
        return Err(bad());
    }
    let number = |range: std::ops::Range<usize>| {
        text.get(range)
            .and_then(|s| s.parse::<i64>().ok())
            .ok_or_else(bad)
    };
    let (year, month, day) = (number(0..4)?, number(4..6)?, number(6..8)?);
    let (hour, minute, second) = (number(9..11)?, number(11..13)?, number(13..15)?);
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return Err(bad());
    }
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + hour * 3600 + minute * 60 + second;
    u64::try_from(seconds)
        .map(|s| UNIX_EPOCH + Duration::from_secs(s))
        .map_err(|_| bad())
}

/// `Ok(())` when the token lets `expect.user` in; otherwise why not (for the log; the
/// client only ever hears "PAM authentication failed").
pub(crate) fn check(
    token: &str,
    store: &CredentialStore,
    expect: &Expect<'_>,
) -> Result<(), String> {
    let token = Presigned::parse(token).map_err(|e| format!("not a presigned URL: {e}"))?;
    let expected_authority = format!("{}:{}", expect.hostname, expect.port);
    if !token.authority.eq_ignore_ascii_case(&expected_authority) {
        return Err(format!(
            "signed for {}, not {expected_authority}",
            token.authority
        ));
    }
    if token.path != "/" {
        return Err(format!("path {} is not /", token.path));
    }
    if token.param("Action")? != "connect" {
        return Err("Action is not connect".into());
    }
    let db_user = token.param("DBUser")?;
    if db_user != expect.user {
        return Err(format!(
            "signed for DBUser {db_user}, but the login is for {}",
            expect.user
        ));
    }
    if token.param("X-Amz-Algorithm")? != "AWS4-HMAC-SHA256" {
        return Err("X-Amz-Algorithm is not AWS4-HMAC-SHA256".into());
    }
    if token.param("X-Amz-SignedHeaders")? != "host" {
        return Err("X-Amz-SignedHeaders is not host".into());
    }
    let credential = token.param("X-Amz-Credential")?;
    let (access_key, scope) = credential
        .split_once('/')
        .ok_or("X-Amz-Credential has no scope")?;
    let scope_parts: Vec<&str> = scope.split('/').collect();
    let [date, region, "rds-db", "aws4_request"] = scope_parts.as_slice() else {
        return Err(format!("credential scope {scope} is not for rds-db"));
    };
    if *region != expect.region {
        return Err(format!(
            "signed for region {region}, the database is in {}",
            expect.region
        ));
    }
    let keys = store
        .get(access_key)
        .ok_or_else(|| format!("unknown access key {access_key}"))?;
    match (&keys.session_token, token.optional("X-Amz-Security-Token")) {
        (Some(expected), Some(given)) if constant_time_eq(expected, given) => {}
        (Some(_), Some(_)) => return Err("the session token does not match".into()),
        (Some(_), None) => return Err("temporary credentials without X-Amz-Security-Token".into()),
        (None, Some(_)) => return Err("a session token for long-term credentials".into()),
        (None, None) => {}
    }
    let amz_date = token.param("X-Amz-Date")?;
    if !amz_date.starts_with(date) {
        return Err(format!(
            "X-Amz-Date {amz_date} is not on the scope's date {date}"
        ));
    }
    let signed_at = parse_amz_date(amz_date)?;
    let expires: u64 = token
        .param("X-Amz-Expires")?
        .parse()
        .map_err(|_| "X-Amz-Expires is not a number")?;
    if expires > 900 {
        return Err(format!("X-Amz-Expires {expires} is over 900"));
    }
    let lifetime = Duration::from_secs(expires).min(expect.token_ttl);
    if signed_at > expect.now + expect.max_skew {
        return Err("signed in the future (clock skew)".into());
    }
    if expect.now > signed_at + lifetime {
        return Err(format!(
            "expired: signed {:?} ago, valid for {lifetime:?}",
            expect.now.duration_since(signed_at).unwrap_or_default()
        ));
    }
    let signature = token.signature(&keys.secret_access_key, amz_date, scope)?;
    if !constant_time_eq(&signature, token.param("X-Amz-Signature")?) {
        return Err("signature mismatch".into());
    }
    if !expect.allowed_users.iter().any(|u| u == expect.user) {
        return Err(format!("user {} has no rds_iam grant", expect.user));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::KeyPair;

    #[test]
    fn dates() {
        assert_eq!(
            parse_amz_date("20240826T220000Z").unwrap(),
            UNIX_EPOCH + Duration::from_secs(1_724_709_600)
        );
        assert_eq!(parse_amz_date("19700101T000000Z").unwrap(), UNIX_EPOCH);
        for bad in [
            "2024-08-26T22:00:00Z",
            "20241326T220000Z",
            "20240826T220000",
            "",
        ] {
            assert!(parse_amz_date(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_golden_token_is_accepted_only_as_signed() {
        let golden = "prod-instance.us-east-1.rds.amazonaws.com:3306/?Action=connect&DBUser=peccy&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=akid%2F20240826%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Date=20240826T220000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=dd0cba843009474347af724090233265628ace491ea17ce3eb3da098b983ad89";
        let store = CredentialStore::new([KeyPair {
            access_key_id: "akid".into(),
            secret_access_key: "secret".into(),
            session_token: None,
        }]);
        let users = vec!["peccy".to_owned()];
        let expect = Expect {
            hostname: "prod-instance.us-east-1.rds.amazonaws.com",
            port: 3306,
            region: "us-east-1",
            user: "peccy",
            allowed_users: &users,
            now: UNIX_EPOCH + Duration::from_secs(1_724_709_600 + 60),
            token_ttl: Duration::from_secs(900),
            max_skew: Duration::from_secs(300),
        };
        assert_eq!(check(golden, &store, &expect), Ok(()));
        let expired = Expect {
            now: expect.now + Duration::from_secs(900),
            ..expect.clone()
        };
        assert!(
            check(golden, &store, &expired)
                .unwrap_err()
                .contains("expired")
        );
        let short_ttl = Expect {
            token_ttl: Duration::from_secs(30),
            ..expect.clone()
        };
        assert!(
            check(golden, &store, &short_ttl)
                .unwrap_err()
                .contains("expired")
        );
        let other_port = Expect {
            port: 5432,
            ..expect.clone()
        };
        assert!(
            check(golden, &store, &other_port)
                .unwrap_err()
                .contains("signed for")
        );
        let other_user = Expect {
            user: "admin",
            ..expect.clone()
        };
        assert!(
            check(golden, &store, &other_user)
                .unwrap_err()
                .contains("DBUser")
        );
        let no_grant = Expect {
            allowed_users: &[],
            ..expect.clone()
        };
        assert!(
            check(golden, &store, &no_grant)
                .unwrap_err()
                .contains("rds_iam")
        );
        let tampered = golden.replace("DBUser=peccy", "DBUser=peccy&Action=connect");
        assert!(check(&tampered, &store, &expect).is_err());
        let wrong_secret = CredentialStore::new([KeyPair {
            access_key_id: "akid".into(),
            secret_access_key: "nope".into(),
            session_token: None,
        }]);
        assert_eq!(
            check(golden, &wrong_secret, &expect).unwrap_err(),
            "signature mismatch"
        );
    }
}
