//! A CA of fake-aws' own and a server certificate for the RDS-like hostname, as RDS has
//! (the client verifies the name while its socket goes to 127.0.0.1).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// The CA bundle written for clients, and the server's TLS configuration.
pub(crate) struct Tls {
    pub(crate) bundle: PathBuf,
    pub(crate) server: Arc<ServerConfig>,
}

/// Makes a CA, a certificate for `hostname` signed by it, writes the CA as a PEM bundle
/// into `dir`, and returns the server configuration.
pub(crate) fn generate(hostname: &str, dir: &Path) -> anyhow::Result<Tls> {
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fake-aws RDS root CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

    let mut params = CertificateParams::new(vec![hostname.to_owned()])?;
    params.distinguished_name.push(DnType::CommonName, hostname);
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;

    std::fs::create_dir_all(dir)?;
    let bundle = dir.join("rds-ca-bundle.pem");
    std::fs::write(&bundle, ca.as_ref().pem())?;

    let chain = vec![
        CertificateDer::from(cert.der().to_vec()),
        CertificateDer::from(ca.as_ref().der().to_vec()),
    ];
    let private = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
    let server = ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(chain, private)?;
    Ok(Tls {
        bundle,
        server: Arc::new(server),
    })
}
