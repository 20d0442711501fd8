//! fake-aws: an offline stand-in for the AWS services pgharness talks to, built to the
//! services' own protocols so that AWS's tools would work against it. Our machines cannot
//! reach AWS; the whole RDS path is tested against this.
//!
//! Today: RDS with IAM authentication ([`rds::RdsFront`]), including an auto-pausing Aurora
//! Serverless cluster. The SSM service and agent come next.
#![warn(missing_docs)]

pub mod credentials;
pub mod rds;
pub mod sigv4;

pub use credentials::{CredentialStore, KeyPair};
