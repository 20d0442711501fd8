//! Opening the data channel websocket and sending the open-data-channel frame (§2), and
//! [`Link`]: the open websocket, read by the driver and written by a task of its own.

use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
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
/// sent), within `deadline`.
pub(crate) async fn open(
    url: &str,
    token: &str,
    client_id: &str,
    client_version: &str,
    deadline: Duration,
) -> Result<Link, Error> {
    match tokio::time::timeout(deadline, open_ws(url, token, client_id, client_version)).await {
        Ok(ws) => Ok(Link::new(ws?)),
        Err(_) => Err(Error::TimedOut {
            waiting_for: format!("the data channel websocket {}", redact_query(url)),
            after: deadline,
        }),
    }
}

async fn open_ws(
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

/// An open data-channel websocket. Reads are the driver's; writes go through a task of their
/// own, so that a write the network does not take (a blackhole, a peer that stopped reading)
/// never stops the driver from reading: two ends that each wait for their write to finish
/// before they read again deadlock once both send buffers are full. Dropping the link ends
/// the writer and closes the socket.
pub(crate) struct Link {
    reader: SplitStream<Ws>,
    writer: mpsc::UnboundedSender<Message>,
    task: JoinHandle<()>,
}

impl Link {
    fn new(ws: Ws) -> Link {
        let (sink, reader) = ws.split();
        let (writer, frames) = mpsc::unbounded_channel();
        let task = tokio::spawn(write_frames(sink, frames));
        Link {
            reader,
            writer,
            task,
        }
    }

    /// The next frame from the peer (`None`: the websocket ended).
    pub(crate) async fn next(
        &mut self,
    ) -> Option<Result<Message, tokio_tungstenite::tungstenite::Error>> {
        self.reader.next().await
    }

    /// Queues a frame for the writer. `false`: the websocket can no longer be written.
    pub(crate) fn send(&self, message: Message) -> bool {
        self.writer.send(message).is_ok()
    }

    /// Whether a write failed (the writer has stopped).
    pub(crate) fn broken(&self) -> bool {
        self.writer.is_closed()
    }

    /// Sends a close frame after what is queued, and waits up to `patience` for it to go.
    pub(crate) async fn close(&mut self, patience: Duration) {
        let _ = self.writer.send(Message::Close(None));
        let _ = tokio::time::timeout(patience, &mut self.task).await;
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The writer: feeds every queued frame, flushing when the queue is empty; ends at the first
/// error or after a close frame.
async fn write_frames(
    mut sink: SplitSink<Ws, Message>,
    mut frames: mpsc::UnboundedReceiver<Message>,
) {
    while let Some(frame) = frames.recv().await {
        let mut closing = matches!(frame, Message::Close(_));
        if sink.feed(frame).await.is_err() {
            return;
        }
        while !closing {
            let Ok(frame) = frames.try_recv() else { break };
            closing = matches!(frame, Message::Close(_));
            if sink.feed(frame).await.is_err() {
                return;
            }
        }
        if sink.flush().await.is_err() || closing {
            return;
        }
    }
}
