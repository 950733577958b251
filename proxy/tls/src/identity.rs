//! Identity material: a certificate chain with its private key, and the
//! trust bundle (the mesh's root certificates) peers are verified against.

use std::sync::Arc;

use rustls::RootCertStore;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

use crate::TlsError;

/// A certificate chain (leaf first) and the private key of its leaf.
#[derive(Debug)]
pub struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Self {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

impl Identity {
    /// Reads a PEM chain (leaf first) and a PEM private key (PKCS#8, SEC1 or PKCS#1).
    pub fn from_pem(chain_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let chain = certificates_from_pem(chain_pem, "certificate chain")?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| TlsError::Pem {
            what: "private key",
            reason: e.to_string(),
        })?;
        Ok(Self { chain, key })
    }

    /// The leaf certificate.
    pub fn leaf(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }
}

/// The root certificates a peer's chain must lead to.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    roots: Arc<RootCertStore>,
}

impl TrustBundle {
    /// Reads one or more PEM root certificates (during a root rotation both
    /// roots are in the bundle).
    pub fn from_pem(pem: &str) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in certificates_from_pem(pem, "trust bundle")? {
            roots.add(cert).map_err(|e| TlsError::Pem {
                what: "trust bundle",
                reason: e.to_string(),
            })?;
        }
        Ok(Self {
            roots: Arc::new(roots),
        })
    }

    pub fn roots(&self) -> &Arc<RootCertStore> {
        &self.roots
    }
}

pub(crate) fn certificates_from_pem(
    pem: &str,
    what: &'static str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            what,
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Pem {
            what,
            reason: "no PEM certificate found".to_string(),
        });
    }
    Ok(certs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_garbled_pem_is_a_clear_error() {
        let error = TrustBundle::from_pem("").unwrap_err();
        assert_eq!(error.to_string(), "trust bundle: no PEM certificate found");
        let garbled = "-----BEGIN CERTIFICATE-----\n%%%\n-----END CERTIFICATE-----\n";
        assert!(TrustBundle::from_pem(garbled).is_err());
        let error = Identity::from_pem("", "").unwrap_err();
        assert!(
            error.to_string().starts_with("certificate chain:"),
            "{error}"
        );
    }
}
