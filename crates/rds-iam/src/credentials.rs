//! Where AWS credentials come from: `aws-config`'s default chain (environment, profile, SSO,
//! web identity for GitHub OIDC, container and instance roles), or fixed ones in tests.

use std::fmt;
use std::future::Future;
use std::pin::Pin;

use aws_credential_types::Credentials;
use aws_credential_types::provider::{ProvideCredentials, SharedCredentialsProvider};

use crate::error::Error;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A source of AWS credentials. `Debug` never shows secrets.
pub trait CredentialSource: Send + Sync + fmt::Debug {
    /// Fresh (or still valid) credentials.
    fn credentials(&self) -> BoxFuture<'_, Result<Credentials, Error>>;
}

/// Fixed credentials.
#[derive(Clone, Debug)]
pub struct StaticCredentials(pub Credentials);

impl CredentialSource for StaticCredentials {
    fn credentials(&self) -> BoxFuture<'_, Result<Credentials, Error>> {
        Box::pin(async move { Ok(self.0.clone()) })
    }
}

/// `aws-config`'s default credential chain.
#[derive(Clone, Debug)]
pub struct DefaultChain {
    provider: SharedCredentialsProvider,
}

impl DefaultChain {
    /// Loads the chain the AWS CLI and SDKs use (honours `AWS_PROFILE`, `AWS_REGION`, …).
    pub async fn load() -> Result<DefaultChain, Error> {
        let config = aws_config::load_defaults(aws_config::BehaviorVersion::latest()).await;
        let provider = config.credentials_provider().ok_or_else(|| {
            Error::Credentials("the AWS configuration has no credential provider".into())
        })?;
        Ok(DefaultChain { provider })
    }
}

impl CredentialSource for DefaultChain {
    fn credentials(&self) -> BoxFuture<'_, Result<Credentials, Error>> {
        Box::pin(async move {
            self.provider
                .provide_credentials()
                .await
                .map_err(|e| Error::Credentials(crate::error::describe_chain(&e)))
        })
    }
}
