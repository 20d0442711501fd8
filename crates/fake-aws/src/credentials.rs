//! fake-aws' own credential store: the access keys it accepts, with their secrets and
//! (for temporary credentials) session tokens. `Debug` never shows a secret.

use std::collections::HashMap;
use std::fmt;

use rand::RngCore;

/// One access key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyPair {
    /// `AKIA…` or `ASIA…`.
    pub access_key_id: String,
    /// The secret access key.
    pub secret_access_key: String,
    /// Present for temporary credentials; then every request must carry it.
    pub session_token: Option<String>,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPair")
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &"***")
            .field("session_token", &self.session_token.as_ref().map(|_| "***"))
            .finish()
    }
}

impl KeyPair {
    /// Random temporary credentials (`ASIA…` with a session token) for tests.
    pub fn random_temporary() -> KeyPair {
        let mut bytes = [0u8; 40];
        rand::rng().fill_bytes(&mut bytes);
        KeyPair {
            access_key_id: format!("ASIAFAKE{}", hex::encode_upper(&bytes[..6])),
            secret_access_key: hex::encode(&bytes[6..26]),
            session_token: Some(format!(
                "FwoGZXIvYXdzEFAKE/{}+{}==",
                hex::encode(&bytes[26..33]),
                hex::encode(&bytes[33..])
            )),
        }
    }

    /// As `aws_credential_types::Credentials`, for clients in the same process.
    pub fn to_credentials(&self) -> aws_credential_types::Credentials {
        aws_credential_types::Credentials::new(
            &self.access_key_id,
            &self.secret_access_key,
            self.session_token.clone(),
            None,
            "fake-aws",
        )
    }
}

/// The keys fake-aws accepts.
#[derive(Clone, Debug, Default)]
pub struct CredentialStore {
    keys: HashMap<String, KeyPair>,
}

impl CredentialStore {
    /// A store with these keys.
    pub fn new(keys: impl IntoIterator<Item = KeyPair>) -> CredentialStore {
        CredentialStore {
            keys: keys
                .into_iter()
                .map(|k| (k.access_key_id.clone(), k))
                .collect(),
        }
    }

    /// The key with this id.
    pub fn get(&self, access_key_id: &str) -> Option<&KeyPair> {
        self.keys.get(access_key_id)
    }
}
