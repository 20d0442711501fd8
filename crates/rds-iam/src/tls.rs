//! TLS that verifies the RDS certificate against the cluster endpoint's name, whatever the
//! socket: TCP to 127.0.0.1, a tunnel stream, or the endpoint itself. No /etc/hosts.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::error::Error;

/// How the server's certificate is checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TlsPolicy {
    /// Verify the chain against this CA bundle (PEM, many certificates: the regional or
    /// global RDS bundle) and the name against the endpoint. The default, and the only
    /// safe choice.
    VerifyFull {
        /// The bundle file.
        ca_bundle: PathBuf,
    },
    /// Encrypt but accept any certificate. Logged loudly each time it is used.
    InsecureAcceptAnyCertificate,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// Reads every certificate of a PEM bundle.
pub fn load_bundle(path: &Path) -> Result<Vec<CertificateDer<'static>>, Error> {
    let iter = CertificateDer::pem_file_iter(path).map_err(|e| {
        Error::tls_caused(
            format!(
                "cannot read the CA bundle {}: {e} (set PGHARNESS_CA_BUNDLE to the RDS bundle, e.g. global-bundle.pem)",
                path.display()
            ),
            e,
        )
    })?;
    let certs: Vec<_> = iter.collect::<Result<_, _>>().map_err(|e| {
        Error::tls_caused(
            format!("the CA bundle {} is not valid PEM: {e}", path.display()),
            e,
        )
    })?;
    if certs.is_empty() {
        return Err(Error::tls(format!(
            "the CA bundle {} holds no certificates (download the RDS bundle for your region, or the global one)",
            path.display()
        )));
    }
    Ok(certs)
}

/// A rustls client configuration for `policy`.
pub fn client_config(policy: &TlsPolicy) -> Result<Arc<ClientConfig>, Error> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::tls_caused(format!("no usable TLS protocol version: {e}"), e))?;
    let config = match policy {
        TlsPolicy::VerifyFull { ca_bundle } => {
            let mut roots = RootCertStore::empty();
            let (added, ignored) = roots.add_parsable_certificates(load_bundle(ca_bundle)?);
            if added == 0 {
                return Err(Error::tls(format!(
                    "none of the {ignored} certificates in {} is a usable CA",
                    ca_bundle.display()
                )));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        TlsPolicy::InsecureAcceptAnyCertificate => {
            tracing::warn!(
                "TLS CERTIFICATE CHECKING IS OFF: any server can pose as the database and read the IAM token; \
                 set a CA bundle to turn it back on"
            );
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AcceptAnything(provider())))
                .with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// The name the certificate must carry.
pub fn server_name(endpoint: &str) -> Result<ServerName<'static>, Error> {
    ServerName::try_from(endpoint.to_owned())
        .map_err(|e| Error::tls_caused(format!("`{endpoint}` is not a valid TLS name: {e}"), e))
}

#[derive(Debug)]
struct AcceptAnything(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AcceptAnything {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        tracing::warn!(
            ?server_name,
            "accepting a server certificate WITHOUT checking it"
        );
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_empty_bundle_says_what_to_do() {
        let error = client_config(&TlsPolicy::VerifyFull {
            ca_bundle: "/nonexistent/bundle.pem".into(),
        })
        .unwrap_err()
        .to_string();
        assert!(error.contains("PGHARNESS_CA_BUNDLE"), "{error}");
        let empty = std::env::temp_dir().join(format!("rds-iam-empty-{}.pem", std::process::id()));
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let error = client_config(&TlsPolicy::VerifyFull {
            ca_bundle: empty.clone(),
        })
        .unwrap_err()
        .to_string();
        std::fs::remove_file(empty).unwrap();
        assert!(error.contains("holds no certificates"), "{error}");
    }
}
