//! The control plane: StartSession, ResumeSession and TerminateSession through aws-sdk-ssm
//! (endpoint, region and credentials from aws-config, so `AWS_ENDPOINT_URL_SSM` works).
//! StartSession and ResumeSession run with logging off: the SDK logs response bodies at
//! TRACE, and theirs carry the session token. Every call has a deadline ([`API_DEADLINE`]):
//! a hung endpoint is a [`Error::TimedOut`] naming the call, never a wait without end.

use std::future::Future;
use std::time::Duration;

use aws_sdk_ssm::error::{ProvideErrorMetadata, SdkError};
use tracing::instrument::WithSubscriber;
use tracing::subscriber::NoSubscriber;

use crate::error::Error;

/// What StartSession and ResumeSession return. `Debug` hides the token.
#[derive(Clone)]
pub struct SessionGrant {
    /// The session id.
    pub session_id: String,
    /// The token for the open-data-channel frame. Never log it.
    pub token: String,
    /// The websocket URL (treated as opaque).
    pub stream_url: String,
}

impl std::fmt::Debug for SessionGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionGrant")
            .field("session_id", &self.session_id)
            .field("token", &"***")
            .field("stream_url", &self.stream_url)
            .finish()
    }
}

/// How long one SSM API call (with the SDK's own retries) may take.
pub const API_DEADLINE: Duration = Duration::from_secs(20);

/// `call` within [`API_DEADLINE`].
async fn within<T>(
    operation: &'static str,
    call: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    tokio::time::timeout(API_DEADLINE, call)
        .await
        .unwrap_or_else(|_| {
            Err(Error::TimedOut {
                waiting_for: format!("the SSM endpoint ({operation})"),
                after: API_DEADLINE,
            })
        })
}

/// An SSM client for the environment's configuration, with `region` overriding it.
pub async fn client(region: Option<&str>) -> Result<aws_sdk_ssm::Client, Error> {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region.to_owned()));
    }
    let config = loader.load().await;
    if config.region().is_none() {
        return Err(Error::Config(
            "no AWS region: pass --region, or set AWS_REGION or a profile's region".into(),
        ));
    }
    if config.credentials_provider().is_none() {
        return Err(Error::NoCredentials {
            operation: "StartSession",
            source: None,
        });
    }
    Ok(aws_sdk_ssm::Client::new(&config))
}

fn api_error<E: ProvideErrorMetadata + std::error::Error + Send + Sync + 'static>(
    operation: &'static str,
    error: SdkError<E>,
) -> Error {
    if let Some(service) = error.as_service_error() {
        return Error::Api {
            operation,
            code: service.code().unwrap_or("Unknown").to_owned(),
            message: service.message().unwrap_or_default().to_owned(),
        };
    }
    // The request never got an answer: either no credentials could be resolved for
    // signing it (a CredentialsError in the chain), or the endpoint did not answer.
    let credentials = crate::error::chain(&error)
        .any(|e| e.is::<aws_credential_types::provider::error::CredentialsError>());
    if credentials {
        Error::NoCredentials {
            operation,
            source: Some(Box::new(error)),
        }
    } else {
        Error::Unreachable {
            operation,
            source: Box::new(error),
        }
    }
}

/// StartSession with AWS-StartPortForwardingSessionToRemoteHost.
pub async fn start(
    client: &aws_sdk_ssm::Client,
    target: &str,
    host: &str,
    port: u16,
    local_port: Option<u16>,
) -> Result<SessionGrant, Error> {
    let mut request = client
        .start_session()
        .target(target)
        .document_name("AWS-StartPortForwardingSessionToRemoteHost")
        .reason("pgharness ssm-tunnel")
        .parameters("host", vec![host.to_owned()])
        .parameters("portNumber", vec![port.to_string()]);
    if let Some(local) = local_port {
        request = request.parameters("localPortNumber", vec![local.to_string()]);
    }
    let output = within("StartSession", async {
        request
            .send()
            .with_subscriber(NoSubscriber::default())
            .await
            .map_err(|e| api_error("StartSession", e))
    })
    .await?;
    Ok(SessionGrant {
        session_id: output.session_id().unwrap_or_default().to_owned(),
        token: output.token_value().unwrap_or_default().to_owned(),
        stream_url: output.stream_url().unwrap_or_default().to_owned(),
    })
}

/// ResumeSession. An empty token means the session is over.
pub async fn resume(client: &aws_sdk_ssm::Client, session_id: &str) -> Result<SessionGrant, Error> {
    let output = within("ResumeSession", async {
        client
            .resume_session()
            .session_id(session_id)
            .send()
            .with_subscriber(NoSubscriber::default())
            .await
            .map_err(|e| api_error("ResumeSession", e))
    })
    .await?;
    Ok(SessionGrant {
        session_id: session_id.to_owned(),
        token: output.token_value().unwrap_or_default().to_owned(),
        stream_url: output.stream_url().unwrap_or_default().to_owned(),
    })
}

/// TerminateSession.
pub async fn terminate(client: &aws_sdk_ssm::Client, session_id: &str) -> Result<(), Error> {
    within("TerminateSession", async {
        client
            .terminate_session()
            .session_id(session_id)
            .send()
            .await
            .map_err(|e| api_error("TerminateSession", e))
    })
    .await?;
    Ok(())
}
