//! The control plane's mesh CA: the root kept in the state directory
//! (`ca.pem`, and `ca.key` readable by the owner only), generated on first
//! start unless the operator supplies one. It signs the CSRs sidecars send.

use std::path::{Path, PathBuf};
use std::time::Duration;

use lacewing_tls::{MeshCa, TlsError};

/// The state directory's CA files.
pub const CA_CERT: &str = "ca.pem";
pub const CA_KEY: &str = "ca.key";
/// The trust domain of a mesh that names none.
pub const DEFAULT_TRUST_DOMAIN: &str = lacewing_tls::DEFAULT_TRUST_DOMAIN;

/// How the CA is set up.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub trust_domain: String,
    /// Lifetime of workload certificates (at least a minute).
    pub lifetime: Duration,
    /// A root the operator supplies (certificate and key files, PEM),
    /// copied into the state directory; otherwise the stored or a new one.
    pub supplied: Option<(PathBuf, PathBuf)>,
    /// The `MeshTLS` mode of a destination no document names.
    pub default_mode: lacewing_mesh::kinds::TlsMode,
    /// Names (DNS or IP) the API's server certificate carries besides
    /// `localhost`, the loopback addresses and the listen address.
    pub server_names: Vec<String>,
    /// The time a client of the API has to complete its TLS handshake.
    pub handshake_timeout: Duration,
}

impl Default for CaOptions {
    fn default() -> Self {
        Self {
            trust_domain: DEFAULT_TRUST_DOMAIN.to_string(),
            lifetime: lacewing_tls::ca::DEFAULT_LIFETIME,
            supplied: None,
            default_mode: lacewing_mesh::kinds::TlsMode::Permissive,
            server_names: Vec::new(),
            handshake_timeout: crate::api_tls::DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }
}

/// Why the CA could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Material { path: PathBuf, source: TlsError },
    #[error(transparent)]
    Options(TlsError),
}

/// Opens the CA of `state_dir` as `options` say.
pub fn open(state_dir: &Path, options: &CaOptions) -> Result<MeshCa, CaError> {
    lacewing_tls::SpiffeId::new(&options.trust_domain, "ns", "sa").map_err(CaError::Options)?;
    let cert_path = state_dir.join(CA_CERT);
    let key_path = state_dir.join(CA_KEY);
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(|source| CaError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let write = |path: &Path, text: &str, mode| {
        crate::token::write_new(path, text.as_bytes(), mode).map_err(|source| CaError::Io {
            path: path.to_path_buf(),
            source,
        })
    };
    let mut ca = if let Some((cert, key)) = &options.supplied {
        let (cert_pem, key_pem) = (read(cert)?, read(key)?);
        let ca = MeshCa::from_pem(&cert_pem, &key_pem).map_err(|source| CaError::Material {
            path: cert.clone(),
            source,
        })?;
        write(&key_path, &key_pem, 0o600)?;
        write(&cert_path, &cert_pem, 0o644)?;
        ca
    } else if key_path.exists() {
        let (cert_pem, key_pem) = (read(&cert_path)?, read(&key_path)?);
        MeshCa::from_pem(&cert_pem, &key_pem).map_err(|source| CaError::Material {
            path: cert_path.clone(),
            source,
        })?
    } else {
        let (ca, key_pem) = MeshCa::generate(&options.trust_domain).map_err(CaError::Options)?;
        // The key first: a crash between the two leaves no certificate
        // without its key, and the next start generates again.
        write(&key_path, &key_pem, 0o600)?;
        write(&cert_path, ca.root_pem(), 0o644)?;
        tracing::info!(path = %cert_path.display(), "mesh CA root generated");
        ca
    };
    ca.set_lifetime(options.lifetime)
        .map_err(CaError::Options)?;
    Ok(ca)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn generates_a_root_once_and_keeps_its_key_private() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(dir.path(), &CaOptions::default()).unwrap();
        let mode = |name| {
            std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        assert_eq!(mode(CA_KEY), 0o600);
        assert_eq!(mode(CA_CERT), 0o644);
        let again = open(dir.path(), &CaOptions::default()).unwrap();
        assert_eq!(again.root_pem(), first.root_pem());
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CA_CERT)).unwrap(),
            first.root_pem()
        );
    }

    #[test]
    fn uses_the_root_the_operator_supplies() {
        let operator = tempfile::tempdir().unwrap();
        let (root, key) = MeshCa::generate("corp.example").unwrap();
        let cert_file = operator.path().join("root.pem");
        let key_file = operator.path().join("root.key");
        std::fs::write(&cert_file, root.root_pem()).unwrap();
        std::fs::write(&key_file, &key).unwrap();

        let state = tempfile::tempdir().unwrap();
        let options = CaOptions {
            trust_domain: "corp.example".to_string(),
            lifetime: Duration::from_secs(600),
            supplied: Some((cert_file, key_file.clone())),
            ..CaOptions::default()
        };
        let ca = open(state.path(), &options).unwrap();
        assert_eq!(ca.root_pem(), root.root_pem());
        assert_eq!(ca.lifetime(), Duration::from_secs(600));
        // Kept: a later start without the option serves the same root.
        let later = open(state.path(), &CaOptions::default()).unwrap();
        assert_eq!(later.root_pem(), root.root_pem());

        // A key that is not the certificate's is refused, naming the file.
        let (_, other_key) = MeshCa::generate("corp.example").unwrap();
        std::fs::write(&key_file, other_key).unwrap();
        let error = open(tempfile::tempdir().unwrap().path(), &options).unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("the CA key does not match the CA certificate"),
            "{error}"
        );
    }

    #[test]
    fn refuses_a_bad_trust_domain_or_lifetime() {
        let dir = tempfile::tempdir().unwrap();
        let bad_domain = CaOptions {
            trust_domain: "Not A Domain".to_string(),
            ..CaOptions::default()
        };
        assert!(open(dir.path(), &bad_domain).is_err());
        let too_short = CaOptions {
            lifetime: Duration::from_secs(5),
            ..CaOptions::default()
        };
        assert!(open(dir.path(), &too_short).is_err());
    }
}
