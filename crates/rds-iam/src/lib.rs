//! RDS IAM authentication, done properly: IAM auth tokens (SigV4 presigned, cached,
//! refreshed), TLS verify-full against the endpoint name over any socket, connection with
//! patience for a resuming Aurora Serverless cluster, and a local auth proxy that lets any
//! Postgres client use all of that with a per-run password.
//!
//! This crate knows nothing of SSM: it opens streams through a [`Dialer`].
#![warn(missing_docs)]

pub mod budget;
pub mod cache;
pub mod clock;
pub mod connect;
pub mod credentials;
pub mod dialer;
mod error;
pub mod leases;
pub mod proxy;
pub mod scram;
mod sessions;
pub mod tls;
pub mod token;
pub mod wire;

pub use budget::Budget;
pub use cache::TokenCache;
pub use connect::{RdsTarget, Waiting, connect};
pub use dialer::{Dialer, TcpDialer};
pub use error::Error;
pub use proxy::{Proxy, ProxyPassword, serve};
pub use tls::TlsPolicy;
pub use token::{AuthToken, TokenRequest};
