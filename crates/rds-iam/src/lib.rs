//! RDS IAM authentication.
mod error;
pub mod token;

pub use error::Error;
