//! rustls configurations for the mesh: the server side requires a client
//! certificate chaining to the trust bundle; the client side presents its
//! own and accepts only a server whose SPIFFE ID is the destination's.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, ServerConfig,
    SignatureScheme,
};

use crate::{Identity, IdentityMismatch, SpiffeId, TlsError, TrustBundle};

pub const ALPN_H2: &[u8] = b"h2";
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// ring's provider with AES-128-GCM preferred: ten AES rounds a block
/// instead of AES-256's fourteen (about 0.4k instructions a request on the
/// calling side in the two-hop rows of `bench/profile.sh`). AES-256-GCM and
/// ChaCha20-Poly1305 stay on offer for peers that prefer them.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::{
        TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384, TLS13_CHACHA20_POLY1305_SHA256,
    };
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(provider)
}

fn alpn() -> Vec<Vec<u8>> {
    vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]
}

/// A server configuration presenting `identity` and requiring every client
/// to present a chain leading to `trust` (TLS 1.3, ALPN `h2`, `http/1.1`).
pub fn server_config(
    identity: &Identity,
    trust: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(trust.roots().clone(), provider.clone())
            .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = alpn();
    Ok(Arc::new(config))
}

/// A client configuration presenting `identity` and accepting only a server
/// whose chain leads to `trust` and whose URI SAN is `expect`.
pub fn client_config(
    identity: &Identity,
    trust: &TrustBundle,
    expect: &SpiffeId,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier {
        roots: trust.roots().clone(),
        provider: provider.clone(),
        expect: expect.uri(),
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = alpn();
    Ok(Arc::new(config))
}

/// The SNI a client sends to reach `id`: `<service>.<namespace>.<trust-domain>`
/// (informational: the server is authenticated by its SPIFFE ID).
pub fn server_name_for(id: &SpiffeId) -> ServerName<'static> {
    let name = format!("{}.{}.{}", id.service(), id.namespace(), id.trust_domain());
    ServerName::try_from(name).unwrap_or_else(|_| ServerName::try_from("mesh.invalid").unwrap())
}

/// Verifies the server's chain against the trust bundle (as WebPKI does) and
/// then its identity by URI SAN instead of DNS name.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<rustls::RootCertStore>,
    provider: Arc<CryptoProvider>,
    expect: String,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        let uris = crate::uri_sans(end_entity).map_err(|_| CertificateError::BadEncoding)?;
        if uris.len() == 1 && uris[0] == self.expect {
            return Ok(ServerCertVerified::assertion());
        }
        let found = if uris.is_empty() {
            "none".to_string()
        } else {
            uris.join(",")
        };
        Err(
            CertificateError::Other(OtherError(Arc::new(IdentityMismatch {
                expected: self.expect.clone(),
                found,
            })))
            .into(),
        )
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
