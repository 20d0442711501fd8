//! The RDS side: a Postgres-protocol listener that behaves like RDS with IAM auth in front
//! of a real Postgres.

mod auth;
mod certs;
mod front;
mod pause;
mod upstream;
mod wire;

pub use front::{RdsFront, RdsFrontConfig};
pub use pause::PauseConfig;
