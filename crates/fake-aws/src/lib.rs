//! fake-aws: an offline stand-in for the AWS services pgharness talks to, built to the
//! services' own protocols so that AWS's tools would work against it. Our machines cannot
//! reach AWS; the whole RDS path is tested against this.
//!
//! - RDS with IAM authentication ([`rds::RdsFront`]), including an auto-pausing Aurora
//!   Serverless cluster.
//! - SSM Session Manager port forwarding ([`ssm::SsmService`]): the JSON 1.1 control plane
//!   and an emulated agent on the data channel websocket, with injectable faults.
#![warn(missing_docs)]

pub mod cli;
pub mod credentials;
pub mod rds;
pub mod sigv4;
pub mod ssm;

pub use credentials::{CredentialStore, KeyPair};
