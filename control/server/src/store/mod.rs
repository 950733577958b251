//! Where the control plane keeps the mesh: documents (as JSON, with the
//! version that wrote each), modules (by sha256) and join tokens (by the
//! sha256 of the token, never the token), behind [`Store`] so a replicated
//! backend can take the embedded one's place.

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

/// A join token as kept: the sha256 of the token is its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JoinRecord {
    pub namespace: String,
    pub service: String,
    /// Unix milliseconds.
    pub created_ms: u64,
    pub expires_ms: u64,
    /// When it was used (0: not yet), and by which node.
    pub used_ms: u64,
    pub used_by: String,
}

/// What redeeming a join token found. Only [`Redeemed::Joined`] changed
/// the store (the token is used from then on).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Redeemed {
    Joined(JoinRecord),
    /// No token has this hash (never created, or long expired and dropped).
    Unknown,
    Expired(JoinRecord),
    /// Used already (the record says when and by whom).
    Replayed(JoinRecord),
    /// For another service or namespace; left unused.
    WrongService(JoinRecord),
}

/// How long an expired join token is kept (to say "expired" rather than
/// "unknown") before a later [`Store::put_join_token`] drops it.
pub const EXPIRED_JOIN_TOKENS_KEPT_MS: u64 = 24 * 3600 * 1000;

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
    /// Keeps a new join token under `sha256` (hex, of the token), dropping
    /// the tokens that expired more than [`EXPIRED_JOIN_TOKENS_KEPT_MS`]
    /// before `record.created_ms`.
    fn put_join_token(&self, sha256: &str, record: &JoinRecord) -> Result<(), StoreError>;
    /// In one transaction: marks the token `sha256` used by `node` at
    /// `now_ms` if it exists, is unused, has not expired and is for
    /// `namespace/service`; otherwise changes nothing and says why.
    fn redeem_join_token(
        &self,
        sha256: &str,
        namespace: &str,
        service: &str,
        node: &str,
        now_ms: u64,
    ) -> Result<Redeemed, StoreError>;
}
