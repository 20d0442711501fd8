//! The Postgres wire protocol (v3) as pgharness's relays speak it, sans IO: what pgharness
//! (its login relay, the lending of a test's session, the parting of its teardown) and
//! rds-iam (the local auth proxy and its session pool) both need and postgres-protocol does
//! not give: framing with a length cap ([`frame`]), a StartupMessage's parameters and its
//! `options` as the server reads them ([`startup`]), an ErrorResponse to send, SCRAM's
//! primitives ([`scram`]), and what a session owes its client ([`exchange`]). One copy, so that the relays cannot drift apart;
//! fake-aws keeps its own on purpose (it stands in for AWS, and is checked against ours).
//!
//! Nothing here does IO: callers feed bytes in and write what comes out.

pub mod exchange;
pub mod frame;
pub mod scram;
pub mod startup;

pub use frame::FrameError;
