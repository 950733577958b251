//! The mesh roots and their rotation. In steady state one root signs and is
//! the whole trust bundle. A rotation goes through two more phases, each
//! entered only when the one before has done its work:
//!
//! 1. `trusting`: the new root joins the bundle; the old one still signs.
//!    Every sidecar gets the two-root bundle in its next snapshot.
//! 2. `issuing`, once every sidecar ACKed a snapshot carrying that bundle:
//!    the new root signs; snapshots name it, and a sidecar whose certificate
//!    the old root signed asks for a new one. The API certificate is issued
//!    again from the new root.
//! 3. back to steady, once the overlap ended (or the operator finished it)
//!    and every sidecar holds a certificate of the new root: the old root
//!    leaves the bundle.
//!
//! `ca.pem` is always the bundle (the signing root first) and `ca.key` the
//! signing root's key, so clients reading `ca.pem` trust both roots during
//! the overlap. While a rotation runs, `ca-rotation.json` (0600: it holds
//! keys) is the truth the other two files are written from; it is written
//! first and removed last, so a restart at any point resumes the rotation.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use lacewing_control_api as api;
use lacewing_tls::MeshCa;
use sha2::{Digest, Sha256};

use crate::ca::{CA_CERT, CA_KEY, CaError, CaOptions};
use crate::state::{RECONNECT_GRACE, Shared, now_ms};

/// The state directory's record of a rotation in progress.
pub const ROTATION_FILE: &str = "ca-rotation.json";
/// How long both roots stay trusted after the new one signs, unless the
/// operator says otherwise.
pub const DEFAULT_OVERLAP: Duration = Duration::from_secs(3600);

/// Why a rotation step was refused.
#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error("a rotation is already in progress (phase {0})")]
    InProgress(&'static str),
    #[error("no rotation is in progress")]
    NotRotating,
    #[error(
        "the new root does not sign yet: every sidecar must first hold the two-root bundle \
         (see `lacewing status`)"
    )]
    NotIssuing,
    #[error("the new root: {0}")]
    Material(lacewing_tls::TlsError),
    #[error("the new root is the current one")]
    SameRoot,
    #[error(transparent)]
    Store(#[from] CaError),
}

#[derive(Debug, Clone)]
struct Root {
    cert_pem: String,
    key_pem: String,
}

#[derive(Debug, Clone)]
enum Phase {
    Steady,
    /// The new root is trusted; `current` still signs.
    Trusting {
        next: Root,
    },
    /// `current` (the new root) signs; `old_cert_pem` is still trusted.
    Issuing {
        old_cert_pem: String,
        overlap_ends_ms: u64,
    },
}

impl Phase {
    fn name(&self) -> &'static str {
        match self {
            Phase::Steady => "steady",
            Phase::Trusting { .. } => "trusting",
            Phase::Issuing { .. } => "issuing",
        }
    }
}

#[derive(Debug)]
struct State {
    /// The signing root.
    current: Root,
    phase: Phase,
    /// Issuing: how long the overlap lasts (kept for `status`).
    overlap: Duration,
}

impl State {
    fn bundle_pem(&self) -> String {
        let mut pem = self.current.cert_pem.trim_end().to_string();
        pem.push('\n');
        match &self.phase {
            Phase::Steady => {}
            Phase::Trusting { next } => {
                pem.push_str(next.cert_pem.trim_end());
                pem.push('\n');
            }
            Phase::Issuing { old_cert_pem, .. } => {
                pem.push_str(old_cert_pem.trim_end());
                pem.push('\n');
            }
        }
        pem
    }

    fn to_json(&self) -> Option<String> {
        let value = match &self.phase {
            Phase::Steady => return None,
            Phase::Trusting { next } => serde_json::json!({
                "phase": "trusting",
                "current_cert": self.current.cert_pem,
                "current_key": self.current.key_pem,
                "next_cert": next.cert_pem,
                "next_key": next.key_pem,
                "overlap_ms": self.overlap.as_millis() as u64,
            }),
            Phase::Issuing {
                old_cert_pem,
                overlap_ends_ms,
            } => serde_json::json!({
                "phase": "issuing",
                "current_cert": self.current.cert_pem,
                "current_key": self.current.key_pem,
                "old_cert": old_cert_pem,
                "overlap_ends_ms": overlap_ends_ms,
                "overlap_ms": self.overlap.as_millis() as u64,
            }),
        };
        Some(value.to_string())
    }

    fn from_json(text: &str) -> Result<Self, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let field = |name: &str| {
            value[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("`{name}` is missing"))
        };
        let current = Root {
            cert_pem: field("current_cert")?,
            key_pem: field("current_key")?,
        };
        let overlap = Duration::from_millis(value["overlap_ms"].as_u64().unwrap_or(0));
        let phase = match value["phase"].as_str() {
            Some("trusting") => Phase::Trusting {
                next: Root {
                    cert_pem: field("next_cert")?,
                    key_pem: field("next_key")?,
                },
            },
            Some("issuing") => Phase::Issuing {
                old_cert_pem: field("old_cert")?,
                overlap_ends_ms: value["overlap_ends_ms"]
                    .as_u64()
                    .ok_or("`overlap_ends_ms` is missing")?,
            },
            other => return Err(format!("unknown phase {other:?}")),
        };
        Ok(Self {
            current,
            phase,
            overlap,
        })
    }
}

/// The sha256 (hex) of a root certificate's PEM text: how snapshots,
/// certificates and `status` name a root.
pub fn root_sha256(cert_pem: &str) -> String {
    crate::operator::hex(&Sha256::digest(cert_pem.trim().as_bytes()))
}

/// The sha256 of the root `ca` signs with (the first of its bundle).
pub fn signer_of(ca: &MeshCa) -> String {
    first_root_sha256(ca.root_pem())
}

/// The sha256 of the first root of `bundle_pem` (empty for none).
pub fn first_root_sha256(bundle_pem: &str) -> String {
    split_bundle(bundle_pem)
        .first()
        .map(|pem| root_sha256(pem))
        .unwrap_or_default()
}

/// The certificates of a PEM bundle, each as its own PEM text.
fn split_bundle(pem: &str) -> Vec<String> {
    const END: &str = "-----END CERTIFICATE-----";
    pem.split_inclusive(END)
        .filter(|part| part.contains(END))
        .map(|part| part.trim().to_string())
        .collect()
}

/// The mesh roots: the CA signing now, and the rotation in progress.
pub struct Roots {
    dir: PathBuf,
    lifetime: Duration,
    trust_domain: String,
    state: Mutex<State>,
    ca: RwLock<Arc<MeshCa>>,
}

impl std::fmt::Debug for Roots {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Roots").finish_non_exhaustive()
    }
}

impl Roots {
    /// Opens the CA of `state_dir` ([`crate::ca::open`]) and resumes a
    /// rotation its `ca-rotation.json` records.
    pub fn open(state_dir: &Path, options: &CaOptions) -> Result<Self, CaError> {
        let path = state_dir.join(ROTATION_FILE);
        let resumed = match std::fs::read_to_string(&path) {
            Ok(text) => Some(State::from_json(&text).map_err(|reason| CaError::Io {
                path: path.clone(),
                source: std::io::Error::other(reason),
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(CaError::Io { path, source }),
        };
        let state = match resumed {
            Some(state) => {
                tracing::info!(phase = state.phase.name(), "mesh root rotation resumed");
                state
            }
            None => {
                crate::ca::open(state_dir, options)?;
                let read = |name: &str| {
                    let path = state_dir.join(name);
                    std::fs::read_to_string(&path).map_err(|source| CaError::Io { path, source })
                };
                // A bundle left by a rotation that ended: its signing root only.
                let cert_pem = split_bundle(&read(CA_CERT)?)
                    .into_iter()
                    .next()
                    .unwrap_or_default();
                State {
                    current: Root {
                        cert_pem,
                        key_pem: read(CA_KEY)?,
                    },
                    phase: Phase::Steady,
                    overlap: DEFAULT_OVERLAP,
                }
            }
        };
        let ca = build(&state, options.lifetime).map_err(|source| CaError::Material {
            path: state_dir.join(CA_CERT),
            source,
        })?;
        let roots = Self {
            dir: state_dir.to_path_buf(),
            lifetime: options.lifetime,
            trust_domain: options.trust_domain.clone(),
            state: Mutex::new(state),
            ca: RwLock::new(Arc::new(ca)),
        };
        roots.write_files(&roots.lock())?;
        Ok(roots)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The CA signing now; its `root_pem` is the whole trust bundle.
    pub fn ca(&self) -> Arc<MeshCa> {
        self.ca
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The trust bundle, PEM, the signing root first.
    pub fn bundle_pem(&self) -> String {
        self.ca().root_pem().to_string()
    }

    /// The sha256 of the signing root.
    pub fn signing_root_sha256(&self) -> String {
        signer_of(&self.ca())
    }

    /// The number of roots in the bundle.
    pub fn count(&self) -> usize {
        split_bundle(&self.bundle_pem()).len()
    }

    /// Writes `ca-rotation.json` (or removes it when steady), then `ca.key`
    /// and `ca.pem` from it.
    fn write_files(&self, state: &State) -> Result<(), CaError> {
        let io = |path: PathBuf| move |source| CaError::Io { path, source };
        let rotation = self.dir.join(ROTATION_FILE);
        if let Some(json) = state.to_json() {
            crate::token::write_new(&rotation, json.as_bytes(), 0o600)
                .map_err(io(rotation.clone()))?;
        }
        let key = self.dir.join(CA_KEY);
        crate::token::write_new(&key, state.current.key_pem.as_bytes(), 0o600)
            .map_err(io(key.clone()))?;
        let cert = self.dir.join(CA_CERT);
        crate::token::write_new(&cert, state.bundle_pem().as_bytes(), 0o644)
            .map_err(io(cert.clone()))?;
        if state.to_json().is_none() {
            match std::fs::remove_file(&rotation) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(io(rotation)(e));
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Moves to `next` (kept on disk first) and serves its CA.
    fn enter(&self, state: &mut State, next: State) -> Result<(), RotateError> {
        let ca = build(&next, self.lifetime).map_err(RotateError::Material)?;
        self.write_files(&next)?;
        *state = next;
        *self.ca.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(ca);
        tracing::info!(
            phase = state.phase.name(),
            roots = split_bundle(&state.bundle_pem()).len(),
            "mesh root rotation"
        );
        Ok(())
    }

    /// Starts a rotation to `root` (certificate and key PEM), or to a new
    /// generated one, with both trusted for `overlap` after the new one signs.
    pub fn start(
        &self,
        root: Option<(String, String)>,
        overlap: Duration,
    ) -> Result<(), RotateError> {
        let mut state = self.lock();
        if !matches!(state.phase, Phase::Steady) {
            return Err(RotateError::InProgress(state.phase.name()));
        }
        let next = match root {
            Some((cert_pem, key_pem)) => {
                MeshCa::from_pem(&cert_pem, &key_pem).map_err(RotateError::Material)?;
                if split_bundle(&cert_pem).len() != 1 {
                    return Err(RotateError::Material(lacewing_tls::TlsError::Certificate(
                        "give one root certificate".to_string(),
                    )));
                }
                Root { cert_pem, key_pem }
            }
            None => {
                let (ca, key_pem) =
                    MeshCa::generate(&self.trust_domain).map_err(RotateError::Material)?;
                Root {
                    cert_pem: ca.root_pem().to_string(),
                    key_pem,
                }
            }
        };
        if root_sha256(&next.cert_pem) == root_sha256(&state.current.cert_pem) {
            return Err(RotateError::SameRoot);
        }
        let entered = State {
            current: state.current.clone(),
            phase: Phase::Trusting { next },
            overlap,
        };
        self.enter(&mut state, entered)
    }

    /// Ends the overlap now: the old root leaves once every sidecar holds a
    /// certificate of the new one.
    pub fn finish(&self) -> Result<(), RotateError> {
        let mut state = self.lock();
        let Phase::Issuing { old_cert_pem, .. } = &state.phase else {
            return Err(match state.phase {
                Phase::Steady => RotateError::NotRotating,
                _ => RotateError::NotIssuing,
            });
        };
        let next = State {
            current: state.current.clone(),
            phase: Phase::Issuing {
                old_cert_pem: old_cert_pem.clone(),
                overlap_ends_ms: now_ms(),
            },
            overlap: state.overlap,
        };
        self.enter(&mut state, next)
    }

    /// Takes the next step if what it waits for holds; returns whether the
    /// bundle or the signing root changed. Otherwise says what it waits for
    /// (empty when steady).
    fn step(&self, shared: &Shared) -> Result<bool, String> {
        let mut state = self.lock();
        let waiting = waiting_for(&state, shared);
        if !waiting.is_empty() {
            return Err(waiting);
        }
        let entered = match &state.phase {
            Phase::Steady => return Err(String::new()),
            Phase::Trusting { next } => State {
                current: next.clone(),
                phase: Phase::Issuing {
                    old_cert_pem: state.current.cert_pem.clone(),
                    overlap_ends_ms: now_ms() + state.overlap.as_millis() as u64,
                },
                overlap: state.overlap,
            },
            Phase::Issuing { .. } => State {
                current: state.current.clone(),
                phase: Phase::Steady,
                overlap: state.overlap,
            },
        };
        let finished = matches!(entered.phase, Phase::Steady);
        self.enter(&mut state, entered).map_err(|e| e.to_string())?;
        if finished {
            shared.metrics.root_rotations.inc();
        }
        Ok(true)
    }

    /// Where the rotation stands, and what it waits for.
    pub fn status(&self, shared: &Shared) -> api::RootRotation {
        let state = self.lock();
        api::RootRotation {
            phase: state.phase.name().to_string(),
            roots: split_bundle(&state.bundle_pem())
                .iter()
                .map(|pem| root_sha256(pem))
                .collect(),
            overlap_ends_ms: match &state.phase {
                Phase::Issuing {
                    overlap_ends_ms, ..
                } => *overlap_ends_ms,
                _ => 0,
            },
            waiting_for: waiting_for(&state, shared),
        }
    }
}

/// What the next step of `state` waits for, in words; empty when it may be
/// taken now (or when steady). Sidecars connected, or cut off so recently
/// they will be back, must have done their part; and sidecars cut off by a
/// restart of this control plane must have had the time to reconnect.
fn waiting_for(state: &State, shared: &Shared) -> String {
    let present = |r: &crate::state::SidecarRecord| {
        r.connected
            || r.disconnected_at
                .is_some_and(|at| at.elapsed() < RECONNECT_GRACE)
    };
    let (trusting, what) = match &state.phase {
        Phase::Steady => return String::new(),
        Phase::Trusting { .. } => (true, "sidecars to ACK the two-root bundle"),
        Phase::Issuing { .. } => (false, "sidecars to hold a certificate of the new root"),
    };
    let bundle = root_sha256(&state.bundle_pem());
    let signer = root_sha256(&state.current.cert_pem);
    let lacking = |r: &crate::state::SidecarRecord| {
        if trusting {
            r.acked_bundle != bundle
        } else {
            r.cert_root != signer
        }
    };
    let nodes: Vec<String> = shared
        .sidecars()
        .values()
        .filter(|r| present(r) && lacking(r))
        .map(|r| r.hello.node_id.clone())
        .collect();
    if !nodes.is_empty() {
        return format!("{what}: {}", nodes.join(", "));
    }
    if let Phase::Issuing {
        overlap_ends_ms, ..
    } = &state.phase
        && now_ms() < *overlap_ends_ms
    {
        return "the overlap to end (or `lacewing root finish`)".to_string();
    }
    if shared.reconnect_grace_until().is_some() {
        return "sidecars cut off by the restart to reconnect".to_string();
    }
    String::new()
}

/// The CA a state serves: the bundle with the signing root first.
fn build(state: &State, lifetime: Duration) -> Result<MeshCa, lacewing_tls::TlsError> {
    let mut ca = MeshCa::from_pem(&state.bundle_pem(), &state.current.key_pem)?;
    ca.set_lifetime(lifetime)?;
    Ok(ca)
}

/// Takes rotation steps as sidecars answer and time passes, until the
/// control plane closes.
pub async fn drive(roots: Arc<Roots>, shared: Arc<Shared>) {
    let mut answers = shared.answers.subscribe();
    let mut changes = shared.changes.subscribe();
    let mut closing = shared.closing.subscribe();
    loop {
        shared.metrics.roots.set(roots.count() as i64);
        match roots.step(&shared) {
            Ok(true) => {
                shared.metrics.roots.set(roots.count() as i64);
                // Every stream sends the new bundle or signing root.
                shared.changed();
                continue;
            }
            Ok(false) => {}
            Err(reason) if !reason.is_empty() => {
                tracing::debug!(waiting_for = %reason, "mesh root rotation");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = answers.changed() => {}
            _ = changes.changed() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
            _ = closing.wait_for(|closed| *closed) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rotation_is_kept_on_disk_and_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let options = CaOptions::default();
        let roots = Roots::open(dir.path(), &options).unwrap();
        let old = roots.bundle_pem();
        assert_eq!(roots.count(), 1);
        roots.start(None, Duration::from_secs(60)).unwrap();
        assert_eq!(roots.count(), 2);
        // The old root still signs; ca.pem holds both, the signer first.
        assert_eq!(roots.signing_root_sha256(), root_sha256(&old));
        let on_disk = std::fs::read_to_string(dir.path().join(CA_CERT)).unwrap();
        assert_eq!(on_disk, roots.bundle_pem());
        assert!(on_disk.starts_with(old.trim()));
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join(ROTATION_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(matches!(
            roots.start(None, Duration::ZERO),
            Err(RotateError::InProgress("trusting"))
        ));
        assert!(matches!(roots.finish(), Err(RotateError::NotIssuing)));

        let again = Roots::open(dir.path(), &options).unwrap();
        assert_eq!(again.bundle_pem(), roots.bundle_pem());
        assert_eq!(again.lock().phase.name(), "trusting");
    }

    #[test]
    fn an_operator_root_must_be_a_ca_with_its_key() {
        let dir = tempfile::tempdir().unwrap();
        let roots = Roots::open(dir.path(), &CaOptions::default()).unwrap();
        let (ca, key) = MeshCa::generate("lacewing.local").unwrap();
        let (_, other_key) = MeshCa::generate("lacewing.local").unwrap();
        let error = roots
            .start(Some((ca.root_pem().to_string(), other_key)), Duration::ZERO)
            .unwrap_err();
        assert!(error.to_string().contains("does not match"), "{error}");
        let current = roots.bundle_pem();
        let current_key = std::fs::read_to_string(dir.path().join(CA_KEY)).unwrap();
        assert!(matches!(
            roots.start(Some((current, current_key)), Duration::ZERO),
            Err(RotateError::SameRoot)
        ));
        roots
            .start(Some((ca.root_pem().to_string(), key)), Duration::ZERO)
            .unwrap();
        assert!(roots.bundle_pem().contains(ca.root_pem().trim()));
    }
}
