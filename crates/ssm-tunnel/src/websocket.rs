//! Opening the data channel websocket and sending the open-data-channel frame (§2).

use std::sync::Arc;

use futures_util::SinkExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{Connector, MaybeTlsStream, WebSocketStream};
use tracing::instrument::WithSubscriber;

use crate::error::Error;
use ssm_proto::payload::OpenDataChannel;

/// The websocket type.
pub(crate) type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

fn tls() -> Result<Connector, Error> {
    let roots = rustls::RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| Error::Channel(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Connector::Rustls(Arc::new(config)))
}

/// Connects to `url` and sends the open frame with `token` (with logging off while it is
/// sent).
pub(crate) async fn open(
    url: &str,
    token: &str,
    client_id: &str,
    client_version: &str,
) -> Result<Ws, Error> {
    let (mut ws, _) =
        tokio_tungstenite::connect_async_tls_with_config(url, None, true, Some(tls()?))
            .await
            .map_err(|e| {
                Error::Channel(format!(
                    "cannot open the websocket to {}: {e}",
                    redact_query(url)
                ))
            })?;
    let open = OpenDataChannel {
        message_schema_version: "1.0".into(),
        request_id: uuid::Uuid::new_v4().to_string(),
        token_value: token.to_owned(),
        client_id: client_id.to_owned(),
        client_version: client_version.to_owned(),
    };
    let text = serde_json::to_string(&open).map_err(|e| Error::Channel(e.to_string()))?;
    ws.send(Message::Ping(b"keepalive".to_vec().into()))
        .await
        .map_err(|e| Error::Channel(e.to_string()))?;
    // tungstenite logs every frame at TRACE, and this one carries the session token.
    ws.send(Message::Text(text.into()))
        .with_subscriber(tracing::subscriber::NoSubscriber::default())
        .await
        .map_err(|e| Error::Channel(e.to_string()))?;
    Ok(ws)
}

/// A StreamUrl for messages: no query string (it may carry signatures).
pub(crate) fn redact_query(url: &str) -> &str {
    url.split('?').next().unwrap_or(url)
}
