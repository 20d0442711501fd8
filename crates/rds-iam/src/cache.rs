//! The token cache: one token per (user, host, port, region, credential identity), reused
//! until a margin before it expires, minted once under concurrency (single flight).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use aws_credential_types::Credentials;

use crate::clock::{Clock, SystemClock};
use crate::credentials::CredentialSource;
use crate::error::Error;
use crate::token::{AuthToken, TOKEN_LIFETIME, TokenRequest, mint};

/// Tokens are reused for this long after signing by default (RDS accepts them for 15 min).
pub const DEFAULT_REUSE: Duration = Duration::from_secs(14 * 60 + 30);
/// Temporary credentials are refreshed this long before they expire.
const CREDENTIAL_MARGIN: Duration = Duration::from_secs(5 * 60);

type Slot = Arc<tokio::sync::Mutex<Option<AuthToken>>>;

/// Mints and caches IAM auth tokens.
#[derive(Debug)]
pub struct TokenCache {
    source: Arc<dyn CredentialSource>,
    clock: Arc<dyn Clock>,
    reuse_for: Duration,
    credentials: tokio::sync::Mutex<Option<Credentials>>,
    slots: Mutex<HashMap<(TokenRequest, String), Slot>>,
    minted: AtomicU64,
}

impl TokenCache {
    /// A cache over `source` with the system clock and the default reuse period.
    pub fn new(source: Arc<dyn CredentialSource>) -> TokenCache {
        TokenCache::with_clock(source, Arc::new(SystemClock), DEFAULT_REUSE)
    }

    /// A cache with its own clock and reuse period (capped at the token lifetime).
    pub fn with_clock(
        source: Arc<dyn CredentialSource>,
        clock: Arc<dyn Clock>,
        reuse_for: Duration,
    ) -> TokenCache {
        TokenCache {
            source,
            clock,
            reuse_for: reuse_for.min(TOKEN_LIFETIME),
            credentials: tokio::sync::Mutex::new(None),
            slots: Mutex::new(HashMap::new()),
            minted: AtomicU64::new(0),
        }
    }

    /// How many tokens this cache has signed.
    pub fn minted(&self) -> u64 {
        self.minted.load(Ordering::Relaxed)
    }

    async fn credentials(&self, now: SystemTime) -> Result<Credentials, Error> {
        let mut cached = self.credentials.lock().await;
        let fresh = cached.as_ref().is_some_and(|c| match c.expiry() {
            Some(expiry) => now + CREDENTIAL_MARGIN < expiry,
            None => true,
        });
        if !fresh {
            let credentials = self.source.credentials().await?;
            tracing::debug!(
                access_key_id = credentials.access_key_id(),
                "loaded AWS credentials"
            );
            *cached = Some(credentials);
        }
        cached
            .clone()
            .ok_or_else(|| Error::Credentials("no credentials were loaded".into()))
    }

    /// Forgets `token` if it is still the one cached for `request`: the server refused it
    /// (it expired early, or was revoked), so the next `token` call mints a fresh one.
    /// A token another caller has already replaced is left alone.
    pub async fn refused(&self, request: &TokenRequest, token: &AuthToken) {
        let slots: Vec<Slot> = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|((cached_for, _), _)| cached_for == request)
            .map(|(_, slot)| slot.clone())
            .collect();
        for slot in slots {
            let mut cached = slot.lock().await;
            if cached.as_ref() == Some(token) {
                *cached = None;
                tracing::info!(host = %request.host, user = %request.user, "the server refused a cached IAM token; a fresh one will be minted");
            }
        }
    }

    /// A token for `request`: the cached one while it is fresh, else a new one.
    pub async fn token(&self, request: &TokenRequest) -> Result<AuthToken, Error> {
        let now = self.clock.now();
        let credentials = self.credentials(now).await?;
        let key = (request.clone(), credentials.access_key_id().to_owned());
        let slot = self
            .slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .clone();
        let mut token = slot.lock().await;
        let valid_until = |t: &AuthToken| {
            let reuse = t.signed_at() + self.reuse_for;
            match credentials.expiry() {
                Some(expiry) => reuse.min(expiry),
                None => reuse,
            }
        };
        let now = self.clock.now();
        if let Some(existing) = token.as_ref().filter(|t| now < valid_until(t)) {
            return Ok(existing.clone());
        }
        let fresh = mint(request, &credentials, now)?;
        self.minted.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(host = %request.host, user = %request.user, "minted an IAM auth token");
        *token = Some(fresh.clone());
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::credentials::StaticCredentials;

    fn cache(clock: &ManualClock) -> TokenCache {
        let source = Arc::new(StaticCredentials(Credentials::new(
            "AKID", "secret", None, None, "test",
        )));
        TokenCache::with_clock(source, Arc::new(clock.clone()), DEFAULT_REUSE)
    }

    fn request(user: &str) -> TokenRequest {
        TokenRequest::new("db.cluster-x.eu-west-2.rds.amazonaws.com", 5432, user, None).unwrap()
    }

    #[tokio::test]
    async fn reuses_until_the_margin_then_mints_again() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let cache = cache(&clock);
        let first = cache.token(&request("app")).await.unwrap();
        clock.advance(Duration::from_secs(14 * 60));
        assert_eq!(cache.token(&request("app")).await.unwrap(), first);
        clock.advance(Duration::from_secs(31));
        let second = cache.token(&request("app")).await.unwrap();
        assert_ne!(second, first);
        assert_eq!(cache.minted(), 2);
    }

    #[tokio::test]
    async fn different_users_get_different_tokens() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let cache = cache(&clock);
        let a = cache.token(&request("a")).await.unwrap();
        let b = cache.token(&request("b")).await.unwrap();
        assert_ne!(a, b);
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_mint() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let cache = Arc::new(cache(&clock));
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let cache = cache.clone();
                tokio::spawn(async move { cache.token(&request("app")).await.unwrap() })
            })
            .collect();
        let mut tokens = Vec::new();
        for task in tasks {
            tokens.push(task.await.unwrap());
        }
        assert!(tokens.windows(2).all(|w| w[0] == w[1]));
        assert_eq!(cache.minted(), 1);
    }

    #[derive(Debug)]
    struct Expiring(std::sync::atomic::AtomicU32, ManualClock);

    impl CredentialSource for Expiring {
        fn credentials(
            &self,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Credentials, Error>> + Send + '_>,
        > {
            Box::pin(async move {
                let n = self.0.fetch_add(1, Ordering::Relaxed);
                let expiry = self.1.now() + Duration::from_secs(600);
                Ok(Credentials::new(
                    format!("ASIA{n}"),
                    "s",
                    Some("t".into()),
                    Some(expiry),
                    "test",
                ))
            })
        }
    }

    #[tokio::test]
    async fn expiring_credentials_are_refreshed_and_bound_the_token() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let source = Arc::new(Expiring(Default::default(), clock.clone()));
        let cache = TokenCache::with_clock(source.clone(), Arc::new(clock.clone()), DEFAULT_REUSE);
        let first = cache.token(&request("app")).await.unwrap();
        assert!(first.expose().contains("ASIA0"));
        clock.advance(Duration::from_secs(6 * 60)); // credentials now within 5 min of expiry
        let second = cache.token(&request("app")).await.unwrap();
        assert!(
            second.expose().contains("ASIA1"),
            "credentials were not refreshed"
        );
        assert_eq!(source.0.load(Ordering::Relaxed), 2);
    }
}
