//! SCRAM-SHA-256 (RFC 5802, RFC 7677), the client side and the verifier, sans IO.
//!
//! Hand-written rather than postgres-protocol's `ScramSha256` because that one derives the
//! salted password (4096 rounds of PBKDF2 on most servers) on every login, and in a
//! dependent crate's debug build, where sha2 is not optimised, that is ~100 ms per
//! connection. Here the salted password is an input: [`crate::auth_relay`] derives it once
//! per password, salt and iteration count and keeps it (see there).

use base64::Engine;
use sha2::{Digest, Sha256};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

use pg_wire::scram::hmac;

/// `Hi(password, salt, iterations)`: PBKDF2-HMAC-SHA-256 with one block. `password` is
/// SASLprep'd when it can be, as Postgres and libpq do; else used as it is (as they do).
pub(crate) fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let prepared = stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password));
    pg_wire::scram::hi(prepared.as_bytes(), salt, iterations)
}

/// The verifier Postgres stores for a password (`SCRAM-SHA-256$<i>:<salt>$<stored>:<server>`).
pub(crate) fn verifier(password: &str, iterations: u32, salt: &[u8]) -> String {
    let salted = salted_password(password, salt, iterations);
    let stored_key = Sha256::digest(hmac(&salted, b"Client Key"));
    let server_key = hmac(&salted, b"Server Key");
    format!(
        "SCRAM-SHA-256${iterations}:{}${}:{}",
        B64.encode(salt),
        B64.encode(stored_key),
        B64.encode(server_key)
    )
}

/// The client's first message, and what it must remember for the rest of the exchange.
pub(crate) struct ClientFirst {
    /// `n,,n=<user>,r=<nonce>`: the SASLInitialResponse's data.
    pub(crate) message: String,
    bare: String,
    nonce: String,
}

impl ClientFirst {
    /// Starts an exchange without channel binding (`n,,`). Postgres ignores the user name
    /// here (the startup message names the user), so it is usually empty.
    pub(crate) fn new(user: &str, nonce: &str) -> ClientFirst {
        let bare = format!(
            "n={},r={nonce}",
            user.replace('=', "=3D").replace(',', "=2C")
        );
        ClientFirst {
            message: format!("n,,{bare}"),
            bare,
            nonce: nonce.to_owned(),
        }
    }
}

/// What the server's first message asks for.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ServerFirst {
    /// The whole message, for the AuthMessage.
    message: String,
    /// The client's nonce followed by the server's.
    nonce: String,
    /// The salt.
    pub(crate) salt: Vec<u8>,
    /// The iteration count.
    pub(crate) iterations: u32,
}

/// Why an exchange cannot go on.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct ScramError(pub(crate) String);

impl ServerFirst {
    /// Reads `r=<nonce>,s=<salt>,i=<iterations>`, which must extend the client's nonce.
    pub(crate) fn parse(first: &ClientFirst, message: &str) -> Result<ServerFirst, ScramError> {
        let mut nonce = None;
        let mut salt = None;
        let mut iterations = None;
        for part in message.split(',') {
            match part.split_once('=') {
                Some(("r", value)) => nonce = Some(value.to_owned()),
                Some(("s", value)) => salt = B64.decode(value).ok(),
                Some(("i", value)) => iterations = value.parse::<u32>().ok(),
                _ => {}
            }
        }
        let (Some(nonce), Some(salt), Some(iterations)) = (nonce, salt, iterations) else {
            return Err(ScramError(format!(
                "the server's SCRAM message `{message}` lacks a nonce, salt or iteration count"
            )));
        };
        if !nonce.starts_with(&first.nonce) || nonce.len() == first.nonce.len() {
            return Err(ScramError(
                "the server's SCRAM nonce does not extend ours".into(),
            ));
        }
        if iterations == 0 {
            return Err(ScramError("the server asks for 0 SCRAM iterations".into()));
        }
        Ok(ServerFirst {
            message: message.to_owned(),
            nonce,
            salt,
            iterations,
        })
    }
}

/// The client's final message and the server signature that must come back.
pub(crate) struct ClientFinal {
    /// `c=biws,r=<nonce>,p=<proof>`: the SASLResponse's data.
    pub(crate) message: String,
    server_signature: [u8; 32],
}

impl ClientFinal {
    /// Proves the password, from its salted form.
    pub(crate) fn new(first: &ClientFirst, server: &ServerFirst, salted: &[u8; 32]) -> ClientFinal {
        let without_proof = format!("c=biws,r={}", server.nonce);
        let auth_message = format!("{},{},{without_proof}", first.bare, server.message);
        let client_key = hmac(salted, b"Client Key");
        let stored_key = Sha256::digest(client_key);
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature.iter())
            .map(|(k, s)| k ^ s)
            .collect();
        let server_key = hmac(salted, b"Server Key");
        ClientFinal {
            message: format!("{without_proof},p={}", B64.encode(proof)),
            server_signature: hmac(&server_key, auth_message.as_bytes()),
        }
    }

    /// Checks the server's final message (`v=<signature>`): a server that does not know
    /// the password cannot make it.
    pub(crate) fn verify(&self, message: &str) -> Result<(), ScramError> {
        if let Some(error) = message.strip_prefix("e=") {
            return Err(ScramError(format!(
                "the server refused the SCRAM proof: {error}"
            )));
        }
        let signature = message
            .strip_prefix("v=")
            .and_then(|v| B64.decode(v).ok())
            .ok_or_else(|| {
                ScramError(format!(
                    "the server's final SCRAM message `{message}` has no signature"
                ))
            })?;
        if signature != self.server_signature {
            return Err(ScramError(
                "the server's SCRAM signature is wrong: it does not know the password".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exchange_matches_rfc_7677s_example() {
        let first = ClientFirst::new("user", "rOprNGfwEbeRWgbNEkqO");
        assert_eq!(first.message, "n,,n=user,r=rOprNGfwEbeRWgbNEkqO");
        let server = ServerFirst::parse(
            &first,
            "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        )
        .unwrap();
        assert_eq!(server.iterations, 4096);
        let salted = salted_password("pencil", &server.salt, server.iterations);
        let last = ClientFinal::new(&first, &server, &salted);
        assert_eq!(
            last.message,
            "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        assert_eq!(
            last.verify("v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="),
            Ok(())
        );
        assert!(
            last.verify("v=AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=")
                .is_err()
        );
        assert!(last.verify("e=invalid-proof").is_err());
    }

    #[test]
    fn a_server_nonce_that_does_not_extend_ours_is_refused() {
        let first = ClientFirst::new("", "abc");
        assert!(ServerFirst::parse(&first, "r=xyz,s=AAAA,i=4096").is_err());
        assert!(ServerFirst::parse(&first, "r=abc,s=AAAA,i=4096").is_err());
        assert!(ServerFirst::parse(&first, "r=abcdef,s=AAAA").is_err());
        assert!(ServerFirst::parse(&first, "r=abcdef,s=AAAA,i=0").is_err());
    }
}
