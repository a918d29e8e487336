//! TLS for both PostgreSQL connections (replication and SQL), following libpq's
//! `sslmode`: `prefer` and `require` encrypt without checking the certificate (unless
//! `sslrootcert` is given, as libpq does for `require`), `verify-ca` checks the chain
//! against `sslrootcert` (or the Mozilla roots), `verify-full` also checks the host name.

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use crate::config::{ConnParams, SslMode};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The rustls configuration for `params`, or `None` for `sslmode=disable`.
pub fn client_config(params: &ConnParams) -> Result<Option<Arc<ClientConfig>>, String> {
    let mode = match (params.sslmode, &params.sslrootcert) {
        (SslMode::Disable, _) => return Ok(None),
        (SslMode::Require, Some(_)) => SslMode::VerifyCa,
        (m, _) => m,
    };
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier: Arc<dyn ServerCertVerifier> = match mode {
        SslMode::Prefer | SslMode::Require => Arc::new(NoCertCheck(provider)),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let mut roots = RootCertStore::empty();
            match &params.sslrootcert {
                Some(path) => {
                    let pem =
                        std::fs::read(path).map_err(|e| format!("cannot read sslrootcert {}: {e}", path.display()))?;
                    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                        let cert = cert.map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                        roots
                            .add(cert)
                            .map_err(|e| format!("sslrootcert {}: {e}", path.display()))?;
                    }
                    if roots.is_empty() {
                        return Err(format!("sslrootcert {} holds no PEM certificate", path.display()));
                    }
                }
                None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            }
            let inner = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| e.to_string())?;
            if mode == SslMode::VerifyFull {
                inner
            } else {
                Arc::new(ChainOnly(inner))
            }
        }
        SslMode::Disable => unreachable!("handled above"),
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    Ok(Some(Arc::new(config)))
}

/// Whether the server proves who it is: `verify-full` (chain and host name), or a
/// chain checked against the user's own `sslrootcert` (`verify-ca`, `require`). A
/// chain checked against the public roots without the host name is not enough: anyone
/// with a publicly trusted certificate for any name passes it. Only such a server may
/// ask for the password in clear.
pub fn verifies(params: &ConnParams) -> bool {
    matches!(
        (params.sslmode, &params.sslrootcert),
        (SslMode::VerifyFull, _) | (SslMode::VerifyCa | SslMode::Require, Some(_))
    )
}

/// Refuses a request for the password in clear text unless the server was verified or
/// the user allowed it (`source.allow_cleartext_password`).
pub fn cleartext_allowed(params: &ConnParams) -> Result<(), String> {
    if verifies(params) || params.allow_cleartext {
        return Ok(());
    }
    Err(format!(
        "the server at {}:{} asked for the password in clear text over a connection whose TLS certificate was not verified, and walshore did not send it (whoever is in the middle of a connection could ask the same); use SCRAM-SHA-256 in pg_hba.conf (password_encryption = scram-sha-256), verify the server (sslmode=verify-full with sslrootcert in source.url), or set source.allow_cleartext_password = true",
        params.host, params.port
    ))
}

pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    ServerName::try_from(host.to_owned()).map_err(|e| format!("host {host:?} is not a valid TLS server name: {e}"))
}

/// `sslmode=prefer|require`: encryption without authentication of the server, as libpq.
#[derive(Debug)]
struct NoCertCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCertCheck {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must verify; the host name need not match.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForName | rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}
