//! `TunnelStream`: one forwarded connection, an `AsyncRead + AsyncWrite` like a TCP stream.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf};

/// A stream through the tunnel to the remote host. When the agent could not reach the remote
/// port, reading fails with `ConnectionRefused` instead of ending quietly.
#[derive(Debug)]
pub struct TunnelStream {
    inner: DuplexStream,
    refused: Arc<AtomicBool>,
    target: Arc<str>,
}

impl TunnelStream {
    pub(crate) fn new(
        inner: DuplexStream,
        refused: Arc<AtomicBool>,
        target: Arc<str>,
    ) -> TunnelStream {
        TunnelStream {
            inner,
            refused,
            target,
        }
    }
}

impl AsyncRead for TunnelStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(()))
                if buf.filled().len() == before && self.refused.load(Ordering::Acquire) =>
            {
                Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::ConnectionRefused,
                    format!("the SSM agent could not connect to {}", self.target),
                )))
            }
            other => other,
        }
    }
}

impl AsyncWrite for TunnelStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
