//! The `rds` backend's runtime, as a library: [`RdsProxy::start`] opens the one SSM session
//! (when a jumphost is set), keeps the IAM token cache, checks a login, serves rds-iam's
//! local auth proxy for every test process, psql and the app, and writes the
//! `target/pgharness/env` contract that test processes read. Progress is reported as
//! [`pgharness::events::Event`]s; [`report`] carries them, typed, from a background process
//! to the one that started it. `cargo pgharness up --backend rds` is a thin layer over this; a
//! user's own binary can start it the same way.

mod dialer;
mod error;
mod proxy;
pub mod report;

pub use dialer::TunnelDialer;
pub use error::Error;
pub use proxy::{RdsProxy, RdsStats, end_stale_session, end_stale_session_with};

#[cfg(test)]
mod tests {
    #[test]
    fn pgharness_and_the_proxy_name_the_lease_option_alike() {
        assert_eq!(
            pgharness::backend::rds::LEASE_OPTION,
            rds_iam::leases::LEASE_OPTION
        );
    }
}
