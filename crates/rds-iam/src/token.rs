//! IAM auth tokens: a SigV4 query presign of
//! `GET https://<host>:<port>/?Action=connect&DBUser=<user>` for service `rds-db`, valid for
//! 900 s, with the `https://` stripped. Signed for the real endpoint and port, never for
//! the local end of a tunnel.

use std::fmt;
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;
use aws_sigv4::http_request::{
    SignableBody, SignableRequest, SignatureLocation, SigningSettings, sign,
};
use aws_sigv4::sign::v4;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::error::Error;

/// How long RDS accepts a token after it was signed.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(900);

/// SigV4's "unreserved" characters stay as they are; everything else is percent-encoded.
const SIGV4_ENCODE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// Percent-encodes a query value the way SigV4 canonicalises it.
pub fn encode_query_value(value: &str) -> String {
    utf8_percent_encode(value, SIGV4_ENCODE).to_string()
}

/// What a token is for.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TokenRequest {
    /// The cluster or instance endpoint, e.g. `db.cluster-abc.eu-west-2.rds.amazonaws.com`.
    pub host: String,
    /// The endpoint's port (5432), not the local port of a tunnel.
    pub port: u16,
    /// The database user that has the `rds_iam` role.
    pub user: String,
    /// The AWS region of the database.
    pub region: String,
}

impl TokenRequest {
    /// A request whose region is given, or read from an `*.rds.amazonaws.com` host name.
    pub fn new(
        host: &str,
        port: u16,
        user: &str,
        region: Option<&str>,
    ) -> Result<TokenRequest, Error> {
        let host = host
            .trim()
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_owned();
        if host.is_empty() || host.contains(['/', ' ', '?', '#']) {
            return Err(Error::config(
                "host",
                format!("`{host}` is not a host name"),
                "give the cluster endpoint, e.g. db.cluster-abc.eu-west-2.rds.amazonaws.com",
            ));
        }
        if user.is_empty() {
            return Err(Error::config(
                "user",
                "the database user is empty",
                "set the IAM database user",
            ));
        }
        let region = match region.filter(|r| !r.is_empty()) {
            Some(region) => region.to_owned(),
            None => region_from_host(&host).ok_or_else(|| {
                Error::config(
                    "region",
                    format!("no region was given and `{host}` is not an *.rds.amazonaws.com name"),
                    "set the region (PGHARNESS_RDS_REGION or AWS_REGION)",
                )
            })?,
        };
        Ok(TokenRequest {
            host,
            port,
            user: user.to_owned(),
            region,
        })
    }
}

/// The region in `<name>.<id>.<region>.rds.amazonaws.com` (and `.rds.amazonaws.com.cn`).
pub fn region_from_host(host: &str) -> Option<String> {
    let labels: Vec<&str> = host.split('.').collect();
    let rds = labels.iter().rposition(|l| *l == "rds")?;
    if rds < 1 || labels.get(rds + 1) != Some(&"amazonaws") {
        return None;
    }
    let region = labels[rds - 1];
    let looks_like_region = region.split('-').count() >= 3
        && region
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    looks_like_region.then(|| region.to_owned())
}

/// A signed token. `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthToken {
    value: String,
    signed_at: SystemTime,
}

impl AuthToken {
    /// The token, to send as the password. Never log it.
    pub fn expose(&self) -> &str {
        &self.value
    }

    /// When it was signed (`X-Amz-Date`).
    pub fn signed_at(&self) -> SystemTime {
        self.signed_at
    }

    /// When RDS stops accepting it.
    pub fn expires_at(&self) -> SystemTime {
        self.signed_at + TOKEN_LIFETIME
    }
}

impl fmt::Debug for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthToken")
            .field("value", &"***")
            .field("signed_at", &self.signed_at)
            .finish()
    }
}

impl fmt::Display for AuthToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Signs a token for `request` with `credentials` at `time`.
pub fn mint(
    request: &TokenRequest,
    credentials: &Credentials,
    time: SystemTime,
) -> Result<AuthToken, Error> {
    let url = format!(
        "https://{}:{}/?Action=connect&DBUser={}",
        request.host,
        request.port,
        encode_query_value(&request.user)
    );
    let mut settings = SigningSettings::default();
    settings.signature_location = SignatureLocation::QueryParams;
    settings.expires_in = Some(TOKEN_LIFETIME);
    let identity = credentials.clone().into();
    let params: aws_sigv4::http_request::SigningParams<'_> = v4::SigningParams::builder()
        .identity(&identity)
        .region(&request.region)
        .name("rds-db")
        .time(time)
        .settings(settings)
        .build()
        .map_err(|e| Error::Token(format!("invalid signing parameters: {e}")))?
        .into();
    let signable = SignableRequest::new("GET", &url, std::iter::empty(), SignableBody::Bytes(&[]))
        .map_err(|e| {
            Error::Token(format!(
                "cannot sign {}:{}: {e}",
                request.host, request.port
            ))
        })?;
    // aws-sigv4 logs the canonical request at trace level, session token included: sign
    // with logging off so that no subscriber, at any level, ever sees it.
    let signed =
        tracing::dispatcher::with_default(&tracing::Dispatch::none(), || sign(signable, &params));
    let (instructions, _signature) = signed
        .map_err(|e| Error::Token(format!("signing failed: {e}")))?
        .into_parts();
    // The signature last, as botocore writes it
    // (aws-sigv4 lists X-Amz-Security-Token after the signature; RDS accepts both).
    let mut params: Vec<(&str, String)> = instructions
        .params()
        .iter()
        .map(|(name, value)| (*name, encode_query_value(value)))
        .collect();
    params.sort_by_key(|(name, _)| *name == "X-Amz-Signature");
    let mut value = url.trim_start_matches("https://").to_owned();
    for (name, param) in params {
        value.push('&');
        value.push_str(name);
        value.push('=');
        value.push_str(&param);
    }
    Ok(AuthToken {
        value,
        signed_at: time,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(unix: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(unix)
    }

    #[test]
    fn golden_vector_matches_byte_for_byte() {
        let request = TokenRequest::new(
            "prod-instance.us-east-1.rds.amazonaws.com",
            3306,
            "peccy",
            Some("us-east-1"),
        )
        .unwrap();
        let credentials = Credentials::new("akid", "secret", None, None, "test");
        let token = mint(&request, &credentials, at(1724709600)).unwrap();
        assert_eq!(
            token.expose(),
            "prod-instance.us-east-1.rds.amazonaws.com:3306/?Action=connect&DBUser=peccy&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=akid%2F20240826%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Date=20240826T220000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=dd0cba843009474347af724090233265628ace491ea17ce3eb3da098b983ad89"
        );
    }

    #[test]
    fn session_tokens_are_signed_into_the_query() {
        let request = TokenRequest::new(
            "db.cluster-x.eu-west-2.rds.amazonaws.com",
            5432,
            "app",
            None,
        )
        .unwrap();
        let credentials = Credentials::new(
            "ASIAX",
            "secret",
            Some("session/token+=".into()),
            None,
            "test",
        );
        let token = mint(&request, &credentials, at(1724709600)).unwrap();
        assert!(
            token
                .expose()
                .contains("&X-Amz-Security-Token=session%2Ftoken%2B%3D"),
            "{}",
            token.expose()
        );
        assert!(
            token.expose().contains("%2Feu-west-2%2Frds-db%2F"),
            "region from the host"
        );
    }

    #[test]
    fn users_are_percent_encoded() {
        let request = TokenRequest::new("h.example", 5432, "a+b&c#d é", Some("us-east-1")).unwrap();
        let token = mint(
            &request,
            &Credentials::new("a", "s", None, None, "t"),
            at(0),
        )
        .unwrap();
        assert!(
            token.expose().contains("DBUser=a%2Bb%26c%23d%20%C3%A9&"),
            "{}",
            token.expose()
        );
    }

    #[test]
    fn region_comes_from_the_host_or_an_error_says_how_to_set_it() {
        assert_eq!(
            region_from_host("a.cluster-c0ffee.eu-west-2.rds.amazonaws.com").as_deref(),
            Some("eu-west-2")
        );
        assert_eq!(
            region_from_host("a.b.cn-north-1.rds.amazonaws.com.cn").as_deref(),
            Some("cn-north-1")
        );
        assert_eq!(region_from_host("localhost"), None);
        let error = TokenRequest::new("db.internal", 5432, "u", None)
            .unwrap_err()
            .to_string();
        assert!(error.contains("PGHARNESS_RDS_REGION"), "{error}");
    }

    #[test]
    fn tokens_never_show_in_debug_or_display() {
        let request = TokenRequest::new("h.example", 5432, "u", Some("us-east-1")).unwrap();
        let token = mint(
            &request,
            &Credentials::new("a", "s", None, None, "t"),
            at(0),
        )
        .unwrap();
        let shown = format!("{token} {token:?}");
        assert!(!shown.contains("X-Amz-Signature"), "{shown}");
    }
}
