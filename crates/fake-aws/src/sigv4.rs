//! SigV4 verification of presigned query strings, written from the specification and
//! independent of the `aws-sigv4` crate the clients sign with, so that the two check each
//! other (botocore checks both).

use hmac::{Hmac, Mac};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// The SHA-256 of an empty payload, which presigned GETs sign.
const EMPTY_PAYLOAD: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = HmacSha256::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// A presigned URL taken apart.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Presigned {
    /// `host:port` as signed.
    pub authority: String,
    /// Path (`/`).
    pub path: String,
    /// Decoded query parameters in their order.
    pub params: Vec<(String, String)>,
}

impl Presigned {
    /// Parses `host:port/?a=b&…` (no scheme, as RDS tokens are written).
    pub fn parse(token: &str) -> Result<Presigned, String> {
        let (authority, rest) = token.split_once('/').ok_or("no path")?;
        let (path, query) = match rest.split_once('?') {
            Some((path, query)) => (format!("/{path}"), query),
            None => return Err("no query".into()),
        };
        let mut params = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let decode = |s: &str| {
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| format!("`{s}` is not UTF-8"))
            };
            params.push((decode(name)?, decode(value)?));
        }
        Ok(Presigned {
            authority: authority.to_owned(),
            path,
            params,
        })
    }

    /// The value of a parameter that must appear exactly once.
    pub fn param(&self, name: &str) -> Result<&str, String> {
        let mut values = self
            .params
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str());
        match (values.next(), values.next()) {
            (Some(value), None) => Ok(value),
            (None, _) => Err(format!("{name} is missing")),
            (Some(_), Some(_)) => Err(format!("{name} appears twice")),
        }
    }

    /// An optional parameter.
    pub fn optional(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The signature SigV4 gives this request with `secret` for `scope`
    /// (`date/region/service/aws4_request`) at `amz_date`.
    pub fn signature(&self, secret: &str, amz_date: &str, scope: &str) -> Result<String, String> {
        let mut pairs: Vec<(String, String)> = self
            .params
            .iter()
            .filter(|(k, _)| k != "X-Amz-Signature")
            .map(|(k, v)| {
                (
                    utf8_percent_encode(k, UNRESERVED).to_string(),
                    utf8_percent_encode(v, UNRESERVED).to_string(),
                )
            })
            .collect();
        pairs.sort();
        let query: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let canonical = format!(
            "GET\n{}\n{}\nhost:{}\n\nhost\n{EMPTY_PAYLOAD}",
            self.path,
            query.join("&"),
            self.authority.to_ascii_lowercase()
        );
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let parts: Vec<&str> = scope.split('/').collect();
        let [date, region, service, "aws4_request"] = parts.as_slice() else {
            return Err(format!(
                "credential scope `{scope}` is not date/region/service/aws4_request"
            ));
        };
        let key = [*region, *service, "aws4_request"].iter().fold(
            hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes()),
            |key, part| hmac(&key, part.as_bytes()),
        );
        Ok(hex::encode(hmac(&key, string_to_sign.as_bytes())))
    }
}

/// Compares without an early exit.
pub fn constant_time_eq(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN: &str = "prod-instance.us-east-1.rds.amazonaws.com:3306/?Action=connect&DBUser=peccy&X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=akid%2F20240826%2Fus-east-1%2Frds-db%2Faws4_request&X-Amz-Date=20240826T220000Z&X-Amz-Expires=900&X-Amz-SignedHeaders=host&X-Amz-Signature=dd0cba843009474347af724090233265628ace491ea17ce3eb3da098b983ad89";

    #[test]
    fn verifies_the_golden_vector_independently() {
        let token = Presigned::parse(GOLDEN).unwrap();
        assert_eq!(
            token.authority,
            "prod-instance.us-east-1.rds.amazonaws.com:3306"
        );
        let signature = token
            .signature(
                "secret",
                "20240826T220000Z",
                "20240826/us-east-1/rds-db/aws4_request",
            )
            .unwrap();
        assert_eq!(signature, token.param("X-Amz-Signature").unwrap());
        let wrong = token
            .signature(
                "other",
                "20240826T220000Z",
                "20240826/us-east-1/rds-db/aws4_request",
            )
            .unwrap();
        assert_ne!(wrong, signature);
    }

    #[test]
    fn malformed_tokens_are_errors() {
        assert!(Presigned::parse("no-slash").is_err());
        assert!(Presigned::parse("host:1/no-query").is_err());
        assert!(Presigned::parse("h:1/?a=%FF").is_err());
        let doubled = Presigned::parse("h:1/?DBUser=a&DBUser=b").unwrap();
        assert!(doubled.param("DBUser").unwrap_err().contains("twice"));
        assert!(
            constant_time_eq("abc", "abc")
                && !constant_time_eq("abc", "abd")
                && !constant_time_eq("abc", "ab")
        );
    }
}

/// A SigV4-signed HTTP request (header authorization), as the AWS SDKs and CLI send them.
#[derive(Clone, Debug)]
pub struct SignedRequest<'a> {
    /// `POST`.
    pub method: &'a str,
    /// The path, `/`.
    pub path: &'a str,
    /// The raw query string (empty for JSON 1.1).
    pub query: &'a str,
    /// Headers as received (names in any case).
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: &'a [u8],
}

/// What a verified request was signed with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    /// The access key.
    pub access_key_id: String,
    /// The region of the credential scope.
    pub region: String,
    /// The service of the credential scope.
    pub service: String,
}

impl SignedRequest<'_> {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// Checks the `Authorization` header against `store`; `expected_service` is `ssm`.
    pub fn verify(
        &self,
        store: &crate::CredentialStore,
        expected_service: &str,
    ) -> Result<Verified, String> {
        let authorization = self
            .header("authorization")
            .ok_or("no Authorization header")?;
        let rest = authorization
            .strip_prefix("AWS4-HMAC-SHA256 ")
            .ok_or("not AWS4-HMAC-SHA256")?;
        let mut credential = None;
        let mut signed_headers = None;
        let mut signature = None;
        for part in rest.split(',').map(str::trim) {
            if let Some(v) = part.strip_prefix("Credential=") {
                credential = Some(v);
            } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
                signed_headers = Some(v);
            } else if let Some(v) = part.strip_prefix("Signature=") {
                signature = Some(v);
            }
        }
        let (credential, signed_headers, signature) = (
            credential.ok_or("no Credential")?,
            signed_headers.ok_or("no SignedHeaders")?,
            signature.ok_or("no Signature")?,
        );
        let (access_key, scope) = credential
            .split_once('/')
            .ok_or("Credential has no scope")?;
        let parts: Vec<&str> = scope.split('/').collect();
        let [date, region, service, "aws4_request"] = parts.as_slice() else {
            return Err(format!("bad credential scope {scope}"));
        };
        if *service != expected_service {
            return Err(format!(
                "signed for service {service}, not {expected_service}"
            ));
        }
        let keys = store
            .get(access_key)
            .ok_or_else(|| format!("unknown access key {access_key}"))?;
        match (&keys.session_token, self.header("x-amz-security-token")) {
            (Some(expected), Some(given)) if constant_time_eq(expected, given) => {}
            (Some(_), _) => return Err("missing or wrong X-Amz-Security-Token".into()),
            (None, Some(_)) => return Err("a session token for long-term credentials".into()),
            (None, None) => {}
        }
        let amz_date = self.header("x-amz-date").ok_or("no X-Amz-Date")?;
        if !amz_date.starts_with(date) {
            return Err("X-Amz-Date is not on the scope's date".into());
        }
        let names: Vec<&str> = signed_headers.split(';').collect();
        if !names.contains(&"host") {
            return Err("host is not signed".into());
        }
        let mut canonical_headers = String::new();
        for name in &names {
            let values: Vec<String> = self
                .headers
                .iter()
                .filter(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
                .collect();
            if values.is_empty() {
                return Err(format!("signed header {name} is missing"));
            }
            canonical_headers.push_str(&format!("{name}:{}\n", values.join(",")));
        }
        let payload_hash = match self.header("x-amz-content-sha256") {
            Some(hash) => hash.to_owned(),
            None => hex::encode(Sha256::digest(self.body)),
        };
        let mut query: Vec<(String, String)> = self
            .query
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().into_owned();
                (
                    utf8_percent_encode(&decode(k), UNRESERVED).to_string(),
                    utf8_percent_encode(&decode(v), UNRESERVED).to_string(),
                )
            })
            .collect();
        query.sort();
        let query: Vec<String> = query.into_iter().map(|(k, v)| format!("{k}={v}")).collect();
        let path = if self.path.is_empty() { "/" } else { self.path };
        let canonical = format!(
            "{}\n{path}\n{}\n{canonical_headers}\n{signed_headers}\n{payload_hash}",
            self.method,
            query.join("&")
        );
        let string_to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let key = [*region, *service, "aws4_request"].iter().fold(
            hmac(
                format!("AWS4{}", keys.secret_access_key).as_bytes(),
                date.as_bytes(),
            ),
            |key, part| hmac(&key, part.as_bytes()),
        );
        let expected = hex::encode(hmac(&key, string_to_sign.as_bytes()));
        if !constant_time_eq(&expected, signature) {
            return Err("signature mismatch".into());
        }
        Ok(Verified {
            access_key_id: access_key.to_owned(),
            region: (*region).to_owned(),
            service: (*service).to_owned(),
        })
    }
}

#[cfg(test)]
mod header_tests {
    use super::*;
    use crate::{CredentialStore, KeyPair};

    /// AWS's published SigV4 example (IAM ListUsers, "get-vanilla"-style request).
    #[test]
    fn verifies_the_aws_documentation_example() {
        let store = CredentialStore::new([KeyPair {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
            session_token: None,
        }]);
        let request = SignedRequest {
            method: "GET",
            path: "/",
            query: "Action=ListUsers&Version=2010-05-08",
            headers: vec![
                ("Host".into(), "iam.amazonaws.com".into()),
                ("Content-Type".into(), "application/x-www-form-urlencoded; charset=utf-8".into()),
                ("X-Amz-Date".into(), "20150830T123600Z".into()),
                ("Authorization".into(), "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=content-type;host;x-amz-date, Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7".into()),
            ],
            body: b"",
        };
        let verified = request.verify(&store, "iam").unwrap();
        assert_eq!(verified.region, "us-east-1");
        let mut tampered = request.clone();
        tampered.query = "Action=DeleteUsers&Version=2010-05-08";
        assert_eq!(
            tampered.verify(&store, "iam").unwrap_err(),
            "signature mismatch"
        );
        assert!(
            request
                .verify(&store, "ssm")
                .unwrap_err()
                .contains("not ssm")
        );
    }
}
