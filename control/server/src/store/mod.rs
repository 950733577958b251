//! Where the control plane keeps the mesh: documents (as JSON, with the
//! version that wrote each) and modules (by sha256), behind [`Store`] so a
//! replicated backend can take the embedded one's place.

mod redb;

pub use self::redb::RedbStore;

/// A stored document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredDoc {
    /// `Kind/namespace/name`.
    pub key: String,
    pub json: String,
    /// The version of the commit that last wrote it.
    pub version: u64,
}

/// One change of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Put { key: String, json: String },
    Delete { key: String },
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store: {0}")]
    Backend(String),
    /// Another commit went first; the caller re-reads and tries again.
    #[error("store: version is {actual}, expected {expected}")]
    Conflict { expected: u64, actual: u64 },
}

/// The control plane's storage.
///
/// A commit is atomic and durable when it returns: after a crash the store
/// holds all of it or none of it. Versions only grow.
pub trait Store: Send + Sync + 'static {
    /// The version of the last commit (0 for an empty store).
    fn version(&self) -> Result<u64, StoreError>;
    /// Every document, with the store's version they were read at.
    fn documents(&self) -> Result<(u64, Vec<StoredDoc>), StoreError>;
    /// Applies `changes` as one transaction if the store is still at
    /// `expected`; returns the new version (`expected + 1`).
    fn commit(&self, expected: u64, changes: &[Change]) -> Result<u64, StoreError>;
    /// Stores a module under its sha256 (hex) unless present; true if it was new.
    fn put_module(&self, sha256: &str, bytes: &[u8]) -> Result<bool, StoreError>;
    fn module(&self, sha256: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn has_module(&self, sha256: &str) -> Result<bool, StoreError>;
}
