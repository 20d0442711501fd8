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
