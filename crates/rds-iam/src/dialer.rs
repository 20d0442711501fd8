//! The socket seam: how a byte stream to the database is opened. Direct TCP here; the SSM
//! tunnel provides another `Dialer`, and nothing else in this crate knows about SSM.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;

use tokio::io::{AsyncRead, AsyncWrite};

/// Any byte stream.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A boxed byte stream.
pub type BoxStream = Box<dyn Stream>;

type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens streams to the database.
pub trait Dialer: Send + Sync + fmt::Debug {
    /// A new stream.
    fn dial(&self) -> BoxFuture<'_, io::Result<BoxStream>>;
}

/// Plain TCP to `address` (`host:port`), e.g. 127.0.0.1 and a forwarded port, or the
/// endpoint itself on a VPN.
#[derive(Clone, Debug)]
pub struct TcpDialer {
    address: String,
}

impl TcpDialer {
    /// Dials `address`.
    pub fn new(address: impl Into<String>) -> TcpDialer {
        TcpDialer {
            address: address.into(),
        }
    }
}

impl Dialer for TcpDialer {
    fn dial(&self) -> BoxFuture<'_, io::Result<BoxStream>> {
        Box::pin(async move {
            let stream = tokio::net::TcpStream::connect(&self.address).await?;
            stream.set_nodelay(true)?;
            Ok(Box::new(stream) as BoxStream)
        })
    }
}
