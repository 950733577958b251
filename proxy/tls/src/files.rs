//! Identity from files, for a proxy without a control plane: a PEM
//! certificate chain (leaf first), its private key and the trust bundle,
//! checked when read so a bad set is refused with the file and the reason
//! (unreadable, not PEM, a key that is not the certificate's, a leaf that
//! is expired, not yet valid or without a SPIFFE ID) instead of failing
//! handshakes later.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::pem::PemObject;
use rustls::sign::CertifiedKey;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::{Identity, Material, TrustBundle};

/// Why a set of identity files was refused.
#[derive(Debug, thiserror::Error)]
pub enum IdentityFileError {
    #[error("tls.{field} {path}: cannot read: {source}")]
    Read {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("tls.{field} {path}: {reason}")]
    Invalid {
        field: &'static str,
        path: PathBuf,
        reason: String,
    },
}

/// The three files a proxy's own identity is read from.
#[derive(Debug, Clone, Copy)]
pub struct IdentityFiles<'a> {
    /// PEM certificate chain, leaf first (intermediates may follow).
    pub cert: &'a Path,
    /// PEM private key of the leaf (PKCS#8, SEC1 or PKCS#1).
    pub key: &'a Path,
    /// PEM root certificate(s) peers are verified against.
    pub trust: &'a Path,
}

/// Identity files as read, checked and made into a [`Material`], with their
/// bytes so a reload can tell whether anything changed.
#[derive(Debug)]
pub struct FileIdentity {
    pub material: Material,
    /// The three files' bytes, concatenated in the order cert, key, trust.
    pub content: Vec<u8>,
}

impl IdentityFiles<'_> {
    /// Reads and checks the files at `now`.
    pub fn load(&self, now: SystemTime) -> Result<FileIdentity, IdentityFileError> {
        let cert_pem = read("cert_file", self.cert)?;
        let key_pem = read("key_file", self.key)?;
        let trust_pem = read("trust_file", self.trust)?;
        let invalid =
            |field: &'static str, path: &Path, reason: String| IdentityFileError::Invalid {
                field,
                path: path.to_path_buf(),
                reason,
            };
        let chain = crate::identity::certificates_from_pem(&cert_pem, "certificate chain")
            .map_err(|e| invalid("cert_file", self.cert, reason_of(e)))?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
            .map_err(|e| invalid("key_file", self.key, format!("no PEM private key: {e}")))?;
        let trust = TrustBundle::from_pem(&trust_pem)
            .map_err(|e| invalid("trust_file", self.trust, reason_of(e)))?;

        let provider = crate::config::provider();
        match CertifiedKey::from_der(chain.clone(), key.clone_key(), &provider) {
            Ok(_) => {}
            Err(rustls::Error::InconsistentKeys(_)) => {
                return Err(invalid(
                    "key_file",
                    self.key,
                    format!(
                        "the private key does not match the certificate in {}",
                        self.cert.display()
                    ),
                ));
            }
            Err(e) => return Err(invalid("key_file", self.key, e.to_string())),
        }
        let not_after = validity(&chain[0], now).map_err(|r| invalid("cert_file", self.cert, r))?;
        let material = Material::build(Identity { chain, key }, trust, not_after)
            .map_err(|e| invalid("cert_file", self.cert, reason_of(e)))?;
        let mut content = cert_pem.into_bytes();
        content.extend_from_slice(key_pem.as_bytes());
        content.extend_from_slice(trust_pem.as_bytes());
        Ok(FileIdentity { material, content })
    }
}

fn read(field: &'static str, path: &Path) -> Result<String, IdentityFileError> {
    std::fs::read_to_string(path).map_err(|source| IdentityFileError::Read {
        field,
        path: path.to_path_buf(),
        source,
    })
}

/// The error's reason without the crate's own prefix (the file names the field).
fn reason_of(error: crate::TlsError) -> String {
    match error {
        crate::TlsError::Pem { reason, .. } => reason,
        crate::TlsError::Certificate(reason) => reason,
        other => other.to_string(),
    }
}

/// The leaf's expiry, or why it is not valid at `now`.
fn validity(
    leaf: &rustls::pki_types::CertificateDer<'_>,
    now: SystemTime,
) -> Result<SystemTime, String> {
    let (_, cert) = X509Certificate::from_der(leaf.as_ref()).map_err(|e| e.to_string())?;
    let validity = cert.validity();
    let at = |t: i64| UNIX_EPOCH + Duration::from_secs(t.max(0) as u64);
    let not_before = at(validity.not_before.timestamp());
    let not_after = at(validity.not_after.timestamp());
    if now > not_after {
        return Err(format!("the certificate expired at {}", validity.not_after));
    }
    if now < not_before {
        return Err(format!(
            "the certificate is not valid before {}",
            validity.not_before
        ));
    }
    Ok(not_after)
}
