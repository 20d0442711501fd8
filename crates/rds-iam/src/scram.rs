//! The server side of SCRAM-SHA-256 (RFC 5802/7677), as Postgres speaks it: how the local
//! auth proxy checks its per-run password without ever seeing it on the wire.
//! Hand-written because postgres-protocol implements only the client side, and no
//! well-kept crate does the server side in Postgres's framing; it is checked against
//! tokio-postgres's client (every login through the proxy) and RFC 7677's example.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use crate::error::Error;
use crate::wire;

/// PBKDF2 rounds the proxy asks clients for. Key stretching protects guessable passwords;
/// the proxy's is 128 random bits, made per run, so rounds would only cost every client
/// connection time (4096 rounds: ~50 ms in a debug build) and buy nothing.
const ITERATIONS: u32 = 16;

use pg_wire::scram::{hi as pbkdf2, hmac};

/// What the server keeps of a password: salt, iterations, StoredKey and ServerKey.
#[derive(Clone)]
pub struct ScramVerifier {
    salt: [u8; 16],
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(***)")
    }
}

impl ScramVerifier {
    /// Derives the verifier of `password` with a random salt.
    pub fn new(password: &str) -> ScramVerifier {
        let mut salt = [0; 16];
        rand::rng().fill_bytes(&mut salt);
        let salted = pbkdf2(password.as_bytes(), &salt, ITERATIONS);
        let client_key = hmac(&salted, b"Client Key");
        ScramVerifier {
            salt,
            stored_key: Sha256::digest(client_key).into(),
            server_key: hmac(&salted, b"Server Key"),
        }
    }
}

fn attribute<'a>(message: &'a str, name: &str) -> Option<&'a str> {
    message
        .split(',')
        .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
}

async fn read_sasl<S: AsyncRead + Unpin>(stream: &mut S) -> Result<Vec<u8>, Error> {
    let (tag, body) = wire::read_message(stream)
        .await
        .map_err(|e| Error::Protocol(e.to_string()))?;
    if tag != b'p' {
        return Err(Error::Protocol(format!(
            "expected a SASL response, got '{}'",
            tag as char
        )));
    }
    Ok(body)
}

/// Runs the exchange on `stream` (after the StartupMessage). `Ok(true)` when the client
/// proved it knows the password; the caller then sends (or relays) AuthenticationOk.
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    verifier: &ScramVerifier,
) -> Result<bool, Error> {
    let io = |e: std::io::Error| Error::io("SCRAM exchange", e);
    stream
        .write_all(&wire::auth_request(10, b"SCRAM-SHA-256\0\0"))
        .await
        .map_err(io)?;
    stream.flush().await.map_err(io)?;

    let body = read_sasl(stream).await?;
    let mut rest = body.as_slice();
    let mechanism = wire::take_cstring(&mut rest).map_err(|e| Error::Protocol(e.to_string()))?;
    if mechanism != "SCRAM-SHA-256" {
        return Err(Error::Protocol(format!(
            "client chose {mechanism}, only SCRAM-SHA-256 is offered"
        )));
    }
    if rest.len() < 4 {
        return Err(Error::Protocol("truncated SASLInitialResponse".into()));
    }
    let client_first = std::str::from_utf8(&rest[4..])
        .map_err(|_| Error::Protocol("client-first is not UTF-8".into()))?;
    let (gs2_header, client_first_bare) = match client_first
        .strip_prefix("n,,")
        .or_else(|| client_first.strip_prefix("y,,"))
    {
        Some(bare) => (&client_first[..3], bare.to_owned()),
        None => {
            return Err(Error::Protocol(
                "channel binding is not supported by this proxy".into(),
            ));
        }
    };
    let client_nonce = attribute(&client_first_bare, "r")
        .ok_or_else(|| Error::Protocol("client-first without a nonce".into()))?;

    let mut server_random = [0; 18];
    rand::rng().fill_bytes(&mut server_random);
    let nonce = format!("{client_nonce}{}", B64.encode(server_random));
    let server_first = format!("r={nonce},s={},i={ITERATIONS}", B64.encode(verifier.salt));
    stream
        .write_all(&wire::auth_request(11, server_first.as_bytes()))
        .await
        .map_err(io)?;
    stream.flush().await.map_err(io)?;

    let body = read_sasl(stream).await?;
    let client_final = std::str::from_utf8(&body)
        .map_err(|_| Error::Protocol("client-final is not UTF-8".into()))?;
    let (without_proof, proof) = client_final
        .rsplit_once(",p=")
        .ok_or_else(|| Error::Protocol("client-final without a proof".into()))?;
    if attribute(without_proof, "r") != Some(nonce.as_str()) {
        return Ok(false);
    }
    if attribute(without_proof, "c") != Some(B64.encode(gs2_header).as_str()) {
        return Ok(false);
    }
    let Ok(proof) = B64.decode(proof) else {
        return Ok(false);
    };
    if proof.len() != 32 {
        return Ok(false);
    }
    let auth_message = format!("{client_first_bare},{server_first},{without_proof}");
    let signature = hmac(&verifier.stored_key, auth_message.as_bytes());
    let client_key: Vec<u8> = proof.iter().zip(signature).map(|(p, s)| p ^ s).collect();
    let matches: [u8; 32] = Sha256::digest(&client_key).into();
    // Compare without an early exit.
    if matches
        .iter()
        .zip(verifier.stored_key)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        != 0
    {
        return Ok(false);
    }
    let server_signature = hmac(&verifier.server_key, auth_message.as_bytes());
    let server_final = format!("v={}", B64.encode(server_signature));
    stream
        .write_all(&wire::auth_request(12, server_final.as_bytes()))
        .await
        .map_err(io)?;
    stream.flush().await.map_err(io)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pbkdf2_matches_rfc_7677_example() {
        // RFC 7677 §3: password "pencil", salt W22ZaJ0SNY7soEsUEjb6gQ==, 4096 iterations.
        let salt = B64.decode("W22ZaJ0SNY7soEsUEjb6gQ==").unwrap();
        let salted = pbkdf2(b"pencil", &salt, 4096);
        let client_key = hmac(&salted, b"Client Key");
        let stored_key = Sha256::digest(client_key);
        let auth_message = "n=user,r=rOprNGfwEbeRWgbNEkqO,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
        let signature = hmac(&stored_key, auth_message.as_bytes());
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature)
            .map(|(k, s)| k ^ s)
            .collect();
        assert_eq!(
            B64.encode(proof),
            "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
        );
        let server_key = hmac(&salted, b"Server Key");
        assert_eq!(
            B64.encode(hmac(&server_key, auth_message.as_bytes())),
            "6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="
        );
    }
}
