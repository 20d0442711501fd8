//! Streams through the SSM tunnel for rds-iam, which knows nothing of SSM: its `Dialer`
//! seam implemented over `ssm_tunnel::Tunnel::connect`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use rds_iam::dialer::{BoxStream, Dialer};
use ssm_tunnel::Tunnel;

/// Each `dial` is a new stream of the one SSM session.
#[derive(Debug, Clone)]
pub struct TunnelDialer(pub Arc<Tunnel>);

impl Dialer for TunnelDialer {
    fn dial(&self) -> Pin<Box<dyn Future<Output = std::io::Result<BoxStream>> + Send + '_>> {
        Box::pin(async move {
            let stream = self
                .0
                .connect()
                .await
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::ConnectionAborted, e))?;
            Ok(Box::new(stream) as BoxStream)
        })
    }
}
