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
