//! The control plane's live state: the mesh as last committed (parsed once),
//! the sidecars it knows, and the change signals stream tasks wait on.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use lacewing_control_api as api;
use lacewing_mesh::Document;
use tokio::sync::watch;

use crate::first_party::FirstParty;
use crate::metrics::ControlMetrics;
use crate::store::{Store, StoreError};

/// The committed mesh: version and documents (with the version that wrote each).
#[derive(Debug, Default)]
pub struct MeshView {
    pub version: u64,
    pub docs: BTreeMap<String, (Document, u64)>,
}

impl MeshView {
    /// Reads the store. A stored document that no longer parses is skipped
    /// with a warning (it could only come from a newer or older release).
    pub fn load(store: &dyn Store) -> Result<Self, StoreError> {
        let (version, stored) = store.documents()?;
        let mut docs = BTreeMap::new();
        for doc in stored {
            match Document::from_json(&doc.json) {
                Ok(parsed) => {
                    docs.insert(doc.key, (parsed, doc.version));
                }
                Err(reason) => tracing::warn!(key = %doc.key, %reason, "stored document skipped"),
            }
        }
        Ok(Self { version, docs })
    }

    pub fn documents(&self) -> impl Iterator<Item = &Document> {
        self.docs.values().map(|(d, _)| d)
    }

    /// The documents of `text` (a mesh file) as version `version`, each
    /// written by version 1.
    #[cfg(test)]
    pub(crate) fn parse(text: &str, version: u64) -> Self {
        let mut docs = BTreeMap::new();
        for d in lacewing_mesh::parse_str(text, "t.yaml").unwrap() {
            docs.insert(d.document.key(), (d.document, 1));
        }
        MeshView { version, docs }
    }
}

/// A sidecar cut off (a control plane restart, a network fault) is counted
/// as present for this long: its agent reconnects well within it.
pub const RECONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// What the control plane knows of one sidecar.
#[derive(Debug, Clone)]
pub struct SidecarRecord {
    pub hello: api::Hello,
    pub connected: bool,
    /// Which stream owns the record (a reconnect replaces the older stream).
    pub session: u64,
    pub connected_since_ms: u64,
    pub sent_version: u64,
    pub sent_revision: u64,
    pub sent_at: Option<Instant>,
    pub acked_version: u64,
    pub nacked_version: u64,
    pub nack_reason: String,
    pub last_answer_ms: u64,
    /// When its certificate expires (Unix ms; 0: unknown): from its hello,
    /// then from each certificate issued to it.
    pub cert_not_after_ms: u64,
    pub spiffe_id: String,
    /// The sha256 of the root that signed its certificate (from its hello,
    /// then from each certificate issued to it).
    pub cert_root: String,
    /// The sha256 of the trust bundle in the snapshot sent last, and in the
    /// last one it ACKed.
    pub sent_bundle: String,
    pub acked_bundle: String,
    /// When its stream ended (`None` while connected).
    pub disconnected_at: Option<Instant>,
}

impl SidecarRecord {
    pub fn status(&self) -> api::SidecarStatus {
        api::SidecarStatus {
            node_id: self.hello.node_id.clone(),
            service: self.hello.service.clone(),
            namespace: self.hello.namespace.clone(),
            inbound: self.hello.inbound.clone(),
            outbound: self.hello.outbound.clone(),
            connected: self.connected,
            connected_since_ms: self.connected_since_ms,
            sent_version: self.sent_version,
            acked_version: self.acked_version,
            nacked_version: self.nacked_version,
            nack_reason: self.nack_reason.clone(),
            last_answer_ms: self.last_answer_ms,
            cert_not_after_ms: self.cert_not_after_ms,
            spiffe_id: self.spiffe_id.clone(),
            cert_root_sha256: self.cert_root.clone(),
            has_trust_bundle: false,
        }
    }
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Shared by every RPC.
pub struct Shared {
    pub store: Arc<dyn Store>,
    pub mesh: RwLock<Arc<MeshView>>,
    pub sidecars: Mutex<BTreeMap<String, SidecarRecord>>,
    /// Bumped when the mesh or the set of connected sidecars changes.
    pub changes: watch::Sender<u64>,
    /// Bumped when a sidecar answers.
    pub answers: watch::Sender<u64>,
    /// Set when the control plane shuts down: every stream ends.
    pub closing: watch::Sender<bool>,
    pub metrics: ControlMetrics,
    /// The first-party filters shipped with this binary.
    pub first_party: FirstParty,
    /// Applies run one at a time.
    pub apply_lock: tokio::sync::Mutex<()>,
    sessions: std::sync::atomic::AtomicU64,
    /// When this control plane started.
    pub started: Instant,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared").finish_non_exhaustive()
    }
}

impl Shared {
    pub fn new(
        store: Arc<dyn Store>,
        metrics: ControlMetrics,
        first_party: FirstParty,
    ) -> Result<Arc<Self>, StoreError> {
        let view = MeshView::load(&*store)?;
        metrics.version.set(view.version as i64);
        Ok(Arc::new(Self {
            store,
            mesh: RwLock::new(Arc::new(view)),
            sidecars: Mutex::new(BTreeMap::new()),
            changes: watch::channel(0).0,
            answers: watch::channel(0).0,
            closing: watch::channel(false).0,
            metrics,
            first_party,
            apply_lock: tokio::sync::Mutex::new(()),
            sessions: std::sync::atomic::AtomicU64::new(1),
            started: Instant::now(),
        }))
    }

    pub fn mesh(&self) -> Arc<MeshView> {
        self.mesh
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set_mesh(&self, view: MeshView) {
        self.metrics.version.set(view.version as i64);
        *self.mesh.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(view);
        self.changed();
    }

    /// Until when sidecars cut off by a restart are still expected back
    /// (`None` once [`RECONNECT_GRACE`] passed since the start).
    pub fn reconnect_grace_until(&self) -> Option<Instant> {
        let until = self.started + RECONNECT_GRACE;
        (Instant::now() < until).then_some(until)
    }

    pub fn changed(&self) {
        self.changes.send_modify(|n| *n += 1);
    }

    pub fn answered(&self) {
        self.answers.send_modify(|n| *n += 1);
    }

    pub fn sidecars(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, SidecarRecord>> {
        self.sidecars.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connected sidecar; returns its session number.
    pub fn register(&self, hello: api::Hello) -> u64 {
        let session = self
            .sessions
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut sidecars = self.sidecars();
        let record = SidecarRecord {
            hello: hello.clone(),
            connected: true,
            session,
            connected_since_ms: now_ms(),
            sent_version: 0,
            sent_revision: 0,
            sent_at: None,
            acked_version: hello.serving_version,
            nacked_version: 0,
            nack_reason: String::new(),
            last_answer_ms: 0,
            cert_not_after_ms: hello.certificate_not_after_ms,
            spiffe_id: String::new(),
            cert_root: hello.certificate_root_sha256.clone(),
            sent_bundle: String::new(),
            acked_bundle: String::new(),
            disconnected_at: None,
        };
        sidecars.insert(hello.node_id.clone(), record);
        self.metrics
            .connected
            .set(sidecars.values().filter(|r| r.connected).count() as i64);
        drop(sidecars);
        self.changed();
        session
    }

    /// Marks a sidecar gone if `session` still owns its record.
    pub fn unregister(&self, node_id: &str, session: u64) {
        let mut sidecars = self.sidecars();
        if let Some(record) = sidecars.get_mut(node_id)
            && record.session == session
        {
            record.connected = false;
            record.disconnected_at = Some(Instant::now());
        }
        self.metrics
            .connected
            .set(sidecars.values().filter(|r| r.connected).count() as i64);
        drop(sidecars);
        self.changed();
        self.answered();
    }

    /// Endpoints of every (namespace, service) from the connected sidecars.
    pub fn sidecar_endpoints(&self) -> BTreeMap<(String, String), Vec<String>> {
        let mut out: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
        for r in self.sidecars().values().filter(|r| r.connected) {
            out.entry((r.hello.namespace.clone(), r.hello.service.clone()))
                .or_default()
                .push(r.hello.inbound.clone());
        }
        out
    }
}
