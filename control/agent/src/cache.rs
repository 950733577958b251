//! The sidecar's disk state: modules by sha256 and the last good snapshot.
//!
//! Files are written to a temporary name (0600) and renamed into place, so a
//! crash never leaves half a module or half a snapshot under the real name;
//! a module is written only after its bytes matched its sha256.

use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use lacewing_control_api as api;
use prost::Message;
use sha2::{Digest, Sha256};

/// Why the cache could not be used.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("module sha256 mismatch: expected {expected}, received {actual}")]
    Mismatch { expected: String, actual: String },
}

/// `DIR/modules/<sha256>.wasm` and `DIR/snapshot.pb`.
#[derive(Debug, Clone)]
pub struct Cache {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Cache {
    /// Opens (creating, 0700) the state directory.
    pub fn open(dir: &Path) -> Result<Self, CacheError> {
        let modules = dir.join("modules");
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&modules)
            .map_err(io(&modules))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn module_path(&self, sha256: &str) -> PathBuf {
        self.dir.join("modules").join(format!("{sha256}.wasm"))
    }

    pub fn has_module(&self, sha256: &str) -> bool {
        self.module_path(sha256).is_file()
    }

    /// Stores a module if its bytes hash to `sha256`.
    pub fn put_module(&self, sha256: &str, bytes: &[u8]) -> Result<PathBuf, CacheError> {
        let actual = sha256_hex(bytes);
        if actual != sha256 {
            return Err(CacheError::Mismatch {
                expected: sha256.to_string(),
                actual,
            });
        }
        let path = self.module_path(sha256);
        write_atomically(&path, bytes)?;
        Ok(path)
    }

    fn snapshot_path(&self) -> PathBuf {
        self.dir.join("snapshot.pb")
    }

    /// Keeps `snapshot` as the last good one.
    pub fn save_snapshot(&self, snapshot: &api::Snapshot) -> Result<(), CacheError> {
        write_atomically(&self.snapshot_path(), &snapshot.encode_to_vec())
    }

    /// Keeps the workload key (PEM) and the certificate issued for it, so a
    /// restarted sidecar serves with them while the control plane is away.
    pub fn save_identity(
        &self,
        key_pem: &str,
        certificate: &api::WorkloadCertificate,
    ) -> Result<(), CacheError> {
        write_atomically(&self.dir.join("identity.key"), key_pem.as_bytes())?;
        write_atomically(&self.dir.join("identity.pb"), &certificate.encode_to_vec())
    }

    /// The kept workload key and certificate, if both are there.
    pub fn load_identity(&self) -> Option<(String, api::WorkloadCertificate)> {
        let key = std::fs::read_to_string(self.dir.join("identity.key")).ok()?;
        let bytes = std::fs::read(self.dir.join("identity.pb")).ok()?;
        Some((
            key,
            api::WorkloadCertificate::decode(bytes.as_slice()).ok()?,
        ))
    }

    /// The last good snapshot, if there is one and every module it names is here.
    pub fn load_snapshot(&self) -> Option<api::Snapshot> {
        let bytes = std::fs::read(self.snapshot_path()).ok()?;
        let snapshot = api::Snapshot::decode(bytes.as_slice()).ok()?;
        snapshot
            .plugins
            .iter()
            .all(|p| self.has_module(&p.sha256))
            .then_some(snapshot)
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    file.write_all(bytes).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modules_are_verified_before_they_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let sha = sha256_hex(b"module");
        let err = cache.put_module(&sha, b"tampered").unwrap_err();
        assert!(matches!(err, CacheError::Mismatch { .. }));
        assert!(!cache.has_module(&sha));
        cache.put_module(&sha, b"module").unwrap();
        assert_eq!(std::fs::read(cache.module_path(&sha)).unwrap(), b"module");
    }

    #[test]
    fn a_snapshot_is_loaded_only_with_its_modules() {
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let sha = sha256_hex(b"m");
        let snapshot = api::Snapshot {
            version: 4,
            plugins: vec![api::Plugin {
                name: "p".into(),
                sha256: sha.clone(),
                ..Default::default()
            }],
            ..Default::default()
        };
        cache.save_snapshot(&snapshot).unwrap();
        assert!(cache.load_snapshot().is_none());
        cache.put_module(&sha, b"m").unwrap();
        assert_eq!(cache.load_snapshot(), Some(snapshot));
    }
}
