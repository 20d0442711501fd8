//! The SCRAM-SHA-256 primitives (RFC 5802, RFC 7677) both sides of a Postgres login need:
//! HMAC-SHA-256 and `Hi` (PBKDF2-HMAC-SHA-256, one block). pgharness's client (which keeps
//! salted passwords) and rds-iam's server side (the auth proxy's verifier) build their
//! exchanges on these; the messages stay with each, as each side speaks its own half.

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// HMAC-SHA-256 of `data` under `key`.
pub fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
    mac.update(data);
    mac.finalize().into_bytes().into()
}

/// `Hi(password, salt, iterations)`: PBKDF2-HMAC-SHA-256 with one block (the salted
/// password). `password` as the caller prepared it (SASLprep, where it applies).
pub fn hi(password: &[u8], salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac(password, &block);
    let mut salted = u;
    for _ in 1..iterations {
        u = hmac(password, &u);
        for (s, x) in salted.iter_mut().zip(u) {
            *s ^= x;
        }
    }
    salted
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Published vectors: HMAC-SHA-256 (the "quick brown fox" one), PBKDF2-HMAC-SHA-256
    /// (RFC 7914 §11 with one iteration; 4096 iterations as Postgres stores by default).
    #[test]
    fn hmac_and_hi_match_published_vectors() {
        assert_eq!(
            hex(&hmac(
                b"key",
                b"The quick brown fox jumps over the lazy dog"
            )),
            "f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
        assert_eq!(
            hex(&hi(b"passwd", b"salt", 1)),
            "55ac046e56e3089fec1691c22544b605f94185216dde0465e68b9d57c20dacbc"
        );
        assert_eq!(
            hex(&hi(b"password", b"salt", 4096)),
            "c5e478d59288c841aa530db6845c4c8d962893a001ce4e11a4963873aa98134a"
        );
    }
}
