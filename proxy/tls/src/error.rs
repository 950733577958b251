//! The errors of this crate.

/// Why identity material or a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid SPIFFE ID {id:?}: {reason}")]
    Spiffe { id: String, reason: &'static str },
    #[error("{what}: {reason}")]
    Pem { what: &'static str, reason: String },
    #[error("certificate: {0}")]
    Certificate(String),
    #[error("key: {0}")]
    Key(String),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
}

/// A peer whose chain is valid but whose SPIFFE ID is not the one expected:
/// carried in `rustls::CertificateError::Other` so the reason is reported.
#[derive(Debug, thiserror::Error)]
#[error("peer identity is {found}, expected {expected}")]
pub struct IdentityMismatch {
    pub expected: String,
    /// The URI SANs found, comma-separated ("none" when there is none).
    pub found: String,
}

/// The metric label of a failed handshake (either side): `wrong_peer_identity`,
/// `no_client_certificate`, `untrusted_certificate`, `expired_certificate`,
/// `bad_certificate`, `alert_received`, `no_application_protocol`,
/// `protocol`, or `io` when the error is not a TLS one.
pub fn failure_reason(error: &std::io::Error) -> &'static str {
    use rustls::CertificateError;
    let Some(tls) = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    else {
        return "io";
    };
    match tls {
        rustls::Error::NoCertificatesPresented => "no_client_certificate",
        rustls::Error::InvalidCertificate(CertificateError::Other(other))
            if other.0.downcast_ref::<IdentityMismatch>().is_some() =>
        {
            "wrong_peer_identity"
        }
        rustls::Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        ) => "untrusted_certificate",
        rustls::Error::InvalidCertificate(CertificateError::Expired) => "expired_certificate",
        rustls::Error::InvalidCertificate(_) => "bad_certificate",
        rustls::Error::AlertReceived(_) => "alert_received",
        rustls::Error::NoApplicationProtocol => "no_application_protocol",
        _ => "protocol",
    }
}
