//! What a verified certificate says, in the encodings Envoy's connection
//! properties use: URI SANs, the subject (RFC 2253), the SHA-256 digest of
//! the DER (lowercase hex), and the connection's TLS version.

use rustls::pki_types::CertificateDer;
use sha2::{Digest, Sha256};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{SpiffeId, TlsError};

/// The facts about one certificate that plugins can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    pub uri_sans: Vec<String>,
    /// The subject in RFC 2253 form.
    pub subject: String,
    /// SHA-256 of the DER encoding, lowercase hex.
    pub sha256_digest: String,
    /// The mesh identity, when the first URI SAN is one.
    pub spiffe: Option<SpiffeId>,
}

impl PeerCertificate {
    pub fn parse(der: &CertificateDer<'_>) -> Result<Self, TlsError> {
        let cert = parse(der)?;
        let uri_sans = uris_of(&cert);
        let spiffe = uri_sans.first().and_then(|u| u.parse().ok());
        let digest = Sha256::digest(der.as_ref());
        Ok(Self {
            subject: cert.subject().to_string(),
            sha256_digest: digest.iter().map(|b| format!("{b:02x}")).collect(),
            spiffe,
            uri_sans,
        })
    }
}

/// The TLS facts of one established connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionTls {
    /// "TLSv1.3" (Envoy's spelling).
    pub version: String,
    pub alpn: Option<String>,
    pub requested_server_name: Option<String>,
    /// The verified peer's leaf certificate, when it sent one.
    pub peer: Option<PeerCertificate>,
    /// URI SANs of this side's own leaf certificate.
    pub local_uri_sans: Vec<String>,
}

impl ConnectionTls {
    /// Reads a finished handshake's state. `local_leaf` is this side's own
    /// certificate.
    pub fn from_state(
        state: &rustls::CommonState,
        requested_server_name: Option<&str>,
        local_leaf: Option<&CertificateDer<'_>>,
    ) -> Self {
        let version = match state.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
            Some(other) => format!("{other:?}"),
            None => String::new(),
        };
        let peer = state
            .peer_certificates()
            .and_then(|chain| chain.first())
            .and_then(|leaf| PeerCertificate::parse(leaf).ok());
        let local_uri_sans = local_leaf
            .and_then(|leaf| uri_sans(leaf).ok())
            .unwrap_or_default();
        Self {
            version,
            alpn: state
                .alpn_protocol()
                .map(|p| String::from_utf8_lossy(p).into_owned()),
            requested_server_name: requested_server_name.map(str::to_string),
            peer,
            local_uri_sans,
        }
    }
}

/// The DNS SANs of a certificate.
pub fn dns_sans(der: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    let cert = parse(der)?;
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Ok(Vec::new());
    };
    Ok(san
        .value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::DNSName(dns) => Some((*dns).to_string()),
            _ => None,
        })
        .collect())
}

/// The URI SANs of a certificate.
pub fn uri_sans(der: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    Ok(uris_of(&parse(der)?))
}

pub(crate) fn public_key_der(der: &CertificateDer<'_>) -> Result<Vec<u8>, TlsError> {
    Ok(parse(der)?.public_key().raw.to_vec())
}

fn parse<'a>(der: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, TlsError> {
    X509Certificate::from_der(der.as_ref())
        .map(|(_, cert)| cert)
        .map_err(|e| TlsError::Certificate(e.to_string()))
}

fn uris_of(cert: &X509Certificate<'_>) -> Vec<String> {
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|name| match name {
            GeneralName::URI(uri) => Some((*uri).to_string()),
            _ => None,
        })
        .collect()
}
