//! The mesh roots and their rotation. In steady state one root signs and is
//! the whole trust bundle. A rotation goes through two more phases, each
//! entered only when the one before has done its work:
//!
//! 1. `trusting`: the new root joins the bundle; the old one still signs.
//!    Every sidecar gets the two-root bundle in its next snapshot.
//! 2. `issuing`, once every sidecar that may still serve ACKed a snapshot
//!    carrying that bundle: the new root signs; snapshots name it, and a
//!    sidecar whose certificate the old root signed asks for a new one at
//!    once. The API certificate is issued again from the new root.
//! 3. back to steady, once the overlap ended (or the operator finished it)
//!    and no sidecar may still present a certificate of the old root: the
//!    old root leaves the bundle.
//!
//! "May still serve" is decided per sidecar ([`holds`]): a connected one
//! does, and so does one cut off, for as long as its certificate is valid
//! (it may be serving traffic on the other side of a partition). One gone
//! for good stops counting when its certificate expires, or when the
//! operator forgets it ([`Roots::forget`]). The sidecars known with a valid
//! certificate are kept in the rotation file, so a restart of the control
//! plane does not forget the ones cut off.
//!
//! `ca.pem` is always the bundle (the signing root first) and `ca.key` the
//! signing root's key, so clients reading `ca.pem` trust both roots during
//! the overlap. While a rotation runs, `ca-rotation.json` (0600: it holds
//! keys) is the truth the other two files are written from; it is written
//! first and removed last, so a restart at any point resumes the rotation.

use std::collections::BTreeMap;
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
    #[error("no sidecar is known as {0}")]
    UnknownSidecar(String),
    #[error("sidecar {0} is connected: it will do its part, or stop it first")]
    ConnectedSidecar(String),
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

/// What a rotation step needs to know of one sidecar.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Member {
    node_id: String,
    connected: bool,
    /// Connected, or cut off so recently ([`RECONNECT_GRACE`]) it is
    /// expected back.
    present: bool,
    /// The sha256 of the root that signed its certificate (empty: none).
    cert_root: String,
    /// When that certificate expires (Unix ms; 0: unknown).
    cert_not_after_ms: u64,
    /// The sha256 of the trust bundle of the last snapshot it ACKed.
    acked_bundle: String,
}

impl Member {
    fn of(record: &crate::state::SidecarRecord) -> Self {
        Self {
            node_id: record.hello.node_id.clone(),
            connected: record.connected,
            present: record.connected
                || record
                    .disconnected_at
                    .is_some_and(|at| at.elapsed() < RECONNECT_GRACE),
            cert_root: record.cert_root.clone(),
            cert_not_after_ms: record.cert_not_after_ms,
            acked_bundle: record.acked_bundle.clone(),
        }
    }

    /// As kept in the rotation file: the parts a restart must not lose.
    fn kept(&self) -> Self {
        Self {
            connected: false,
            present: false,
            ..self.clone()
        }
    }

    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "node_id": self.node_id,
            "cert_root": self.cert_root,
            "cert_not_after_ms": self.cert_not_after_ms,
            "acked_bundle": self.acked_bundle,
        })
    }

    fn from_json(value: &serde_json::Value) -> Result<Self, String> {
        let text = |name: &str| {
            value[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("a sidecar's `{name}` is missing"))
        };
        Ok(Self {
            node_id: text("node_id")?,
            connected: false,
            present: false,
            cert_root: text("cert_root")?,
            cert_not_after_ms: value["cert_not_after_ms"]
                .as_u64()
                .ok_or("a sidecar's `cert_not_after_ms` is missing")?,
            acked_bundle: text("acked_bundle")?,
        })
    }
}

#[derive(Debug)]
struct State {
    /// The signing root.
    current: Root,
    phase: Phase,
    /// Issuing: how long the overlap lasts (kept for `status`).
    overlap: Duration,
    /// While rotating: the sidecars known with a certificate not expired
    /// yet, as kept on disk, by node.
    known: BTreeMap<String, Member>,
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
        let mut value = match &self.phase {
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
        value["sidecars"] = self.known.values().map(Member::to_json).collect();
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
        // Absent from a file written before sidecars were kept: none known.
        let known = match value["sidecars"].as_array() {
            Some(list) => list
                .iter()
                .map(|v| Member::from_json(v).map(|m| (m.node_id.clone(), m)))
                .collect::<Result<_, _>>()?,
            None => BTreeMap::new(),
        };
        Ok(Self {
            current,
            phase,
            overlap,
            known,
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
                    known: BTreeMap::new(),
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
        self.write_rotation(state)?;
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

    /// Writes `ca-rotation.json` alone (nothing when steady): enough when
    /// only the sidecars kept in it changed.
    fn write_rotation(&self, state: &State) -> Result<(), CaError> {
        let Some(json) = state.to_json() else {
            return Ok(());
        };
        let path = self.dir.join(ROTATION_FILE);
        crate::token::write_new(&path, json.as_bytes(), 0o600)
            .map_err(|source| CaError::Io { path, source })
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
            known: BTreeMap::new(),
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
            known: state.known.clone(),
        };
        self.enter(&mut state, next)
    }

    /// Forgets the disconnected sidecars `nodes` names: they no longer hold
    /// a step, and `status` no longer lists them. One that comes back
    /// registers anew (and gets the bundle in its first snapshot). A
    /// connected sidecar is refused: it will do its part. Either all are
    /// forgotten or none.
    pub fn forget(&self, shared: &Shared, nodes: &[String]) -> Result<(), RotateError> {
        let mut state = self.lock();
        let mut sidecars = shared.sidecars();
        for node in nodes {
            match sidecars.get(node) {
                Some(r) if r.connected => {
                    return Err(RotateError::ConnectedSidecar(node.clone()));
                }
                None if !state.known.contains_key(node) => {
                    return Err(RotateError::UnknownSidecar(node.clone()));
                }
                _ => {}
            }
        }
        for node in nodes {
            sidecars.remove(node);
            tracing::info!(node = %node, "sidecar forgotten");
        }
        drop(sidecars);
        let before = state.known.len();
        state.known.retain(|node, _| !nodes.contains(node));
        if state.known.len() != before {
            self.write_rotation(&state)?;
        }
        Ok(())
    }

    /// Takes the next step if what it waits for holds; returns whether the
    /// bundle or the signing root changed. Otherwise says what it waits for
    /// (empty when steady).
    fn step(&self, shared: &Shared) -> Result<bool, String> {
        let mut state = self.lock();
        let members = members(&state, shared);
        let now = now_ms();
        if !matches!(state.phase, Phase::Steady) {
            // Kept on disk as they change, for a restart not to lose them.
            let known: BTreeMap<String, Member> = members
                .iter()
                .filter(|m| m.cert_not_after_ms > now)
                .map(|m| (m.node_id.clone(), m.kept()))
                .collect();
            if known != state.known {
                let previous = std::mem::replace(&mut state.known, known);
                if let Err(error) = self.write_rotation(&state) {
                    state.known = previous;
                    return Err(error.to_string());
                }
            }
        }
        let (waiting, _) = waiting_for(&state, shared, &members, now);
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
                known: state.known.clone(),
            },
            Phase::Issuing { .. } => State {
                current: state.current.clone(),
                phase: Phase::Steady,
                overlap: state.overlap,
                known: BTreeMap::new(),
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
        let members = members(&state, shared);
        let (waiting_for, waiting_sidecars) = waiting_for(&state, shared, &members, now_ms());
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
            waiting_for,
            waiting_sidecars,
        }
    }
}

/// The sidecars a rotation counts: those this control plane knows, and
/// those kept in the rotation file that have not come back since a restart.
fn members(state: &State, shared: &Shared) -> Vec<Member> {
    let sidecars = shared.sidecars();
    let mut members: Vec<Member> = sidecars.values().map(Member::of).collect();
    members.extend(
        state
            .known
            .values()
            .filter(|m| !sidecars.contains_key(&m.node_id))
            .cloned(),
    );
    members
}

/// Whether `m` holds the next step of `state` at `now` (Unix ms).
///
/// - `trusting`: until it ACKed the two-root bundle, if it may still serve:
///   it is connected (or cut off less than [`RECONNECT_GRACE`] ago), or its
///   certificate has not expired (cut off, it may still serve traffic with
///   it, and would refuse peers presenting the new root).
/// - `issuing`: while it holds a certificate of another root than the
///   signing one that has not expired (or whose expiry is unknown, while it
///   is present): the old root must stay trusted for peers to accept it.
fn holds(state: &State, m: &Member, now: u64) -> bool {
    match &state.phase {
        Phase::Steady => false,
        Phase::Trusting { .. } => {
            m.acked_bundle != root_sha256(&state.bundle_pem())
                && (m.present || m.cert_not_after_ms > now)
        }
        Phase::Issuing { .. } => {
            !m.cert_root.is_empty()
                && m.cert_root != root_sha256(&state.current.cert_pem)
                && (m.cert_not_after_ms > now || (m.cert_not_after_ms == 0 && m.present))
        }
    }
}

/// What the next step of `state` waits for, in words, and the sidecars it
/// waits for; empty when it may be taken now (or when steady). Sidecars
/// cut off by a restart of this control plane must also have had the time
/// to reconnect, and the overlap must have ended.
fn waiting_for(
    state: &State,
    shared: &Shared,
    members: &[Member],
    now: u64,
) -> (String, Vec<api::RotationWait>) {
    let waiting = blockers(state, members, now);
    let what = match &state.phase {
        Phase::Steady => return (String::new(), Vec::new()),
        Phase::Trusting { .. } => "sidecars to ACK the two-root bundle",
        Phase::Issuing { .. } => "sidecars to hold a certificate of the new root",
    };
    if !waiting.is_empty() {
        let nodes: Vec<&str> = waiting.iter().map(|w| w.node_id.as_str()).collect();
        return (format!("{what}: {}", nodes.join(", ")), waiting);
    }
    if let Phase::Issuing {
        overlap_ends_ms, ..
    } = &state.phase
        && now < *overlap_ends_ms
    {
        return (
            "the overlap to end (or `lacewing root finish`)".to_string(),
            Vec::new(),
        );
    }
    if shared.reconnect_grace_until().is_some() {
        return (
            "sidecars cut off by the restart to reconnect".to_string(),
            Vec::new(),
        );
    }
    (String::new(), Vec::new())
}

/// The sidecars among `members` that hold the next step of `state` at `now`.
fn blockers(state: &State, members: &[Member], now: u64) -> Vec<api::RotationWait> {
    members
        .iter()
        .filter(|m| holds(state, m, now))
        .map(|m| api::RotationWait {
            node_id: m.node_id.clone(),
            connected: m.connected,
            cert_not_after_ms: m.cert_not_after_ms,
            cert_root_sha256: m.cert_root.clone(),
        })
        .collect()
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

    /// A sidecar in the given state; its certificate `cert_root` signed,
    /// expiring at `cert_not_after_ms`.
    fn member(
        node: &str,
        connected: bool,
        cert_root: &str,
        cert_not_after_ms: u64,
        acked_bundle: &str,
    ) -> Member {
        Member {
            node_id: node.to_string(),
            connected,
            present: connected,
            cert_root: cert_root.to_string(),
            cert_not_after_ms,
            acked_bundle: acked_bundle.to_string(),
        }
    }

    fn root() -> Root {
        let (ca, key_pem) = MeshCa::generate("lacewing.local").unwrap();
        Root {
            cert_pem: ca.root_pem().to_string(),
            key_pem,
        }
    }

    fn nodes(waits: &[api::RotationWait]) -> Vec<&str> {
        waits.iter().map(|w| w.node_id.as_str()).collect()
    }

    #[test]
    fn trusting_waits_for_every_sidecar_that_may_still_serve() {
        let (old, new) = (root(), root());
        let state = State {
            current: old.clone(),
            phase: Phase::Trusting { next: new },
            overlap: Duration::ZERO,
            known: BTreeMap::new(),
        };
        let old_sha = root_sha256(&old.cert_pem);
        let two_roots = root_sha256(&state.bundle_pem());
        let now = now_ms();
        let valid = now + 60_000;
        let expired = now - 1;
        let mut cut_off_recently = member("recent", false, &old_sha, 0, "");
        cut_off_recently.present = true;
        let members = [
            // Connected: until it ACKs, whatever its certificate.
            member("acked", true, &old_sha, valid, &two_roots),
            member("connected", true, &old_sha, valid, &old_sha),
            member("no-certificate", true, "", 0, ""),
            // Cut off more than the reconnect grace ago, its certificate
            // still valid: it may be serving on the other side.
            member("cut-off", false, &old_sha, valid, &old_sha),
            // Cut off after it ACKed: done.
            member("cut-off-acked", false, &old_sha, valid, &two_roots),
            // Gone with an expired certificate: it cannot serve mTLS.
            member("expired", false, &old_sha, expired, &old_sha),
            // Cut off with no known certificate: only while expected back.
            member("never-certified", false, "", 0, ""),
            cut_off_recently,
        ];
        assert_eq!(
            nodes(&blockers(&state, &members, now)),
            ["connected", "no-certificate", "cut-off", "recent"]
        );
        // Once the cut-off sidecar's certificate expired, it no longer counts.
        assert_eq!(
            nodes(&blockers(&state, &members[..4], valid)),
            ["connected", "no-certificate"]
        );
        let waits = blockers(&state, &members[3..4], now);
        assert_eq!(
            waits,
            [api::RotationWait {
                node_id: "cut-off".into(),
                connected: false,
                cert_not_after_ms: valid,
                cert_root_sha256: old_sha.clone(),
            }]
        );
    }

    #[test]
    fn issuing_waits_for_every_old_root_certificate_until_it_expires() {
        let (old, new) = (root(), root());
        let state = State {
            current: new.clone(),
            phase: Phase::Issuing {
                old_cert_pem: old.cert_pem.clone(),
                overlap_ends_ms: 0,
            },
            overlap: Duration::ZERO,
            known: BTreeMap::new(),
        };
        let (old_sha, new_sha) = (root_sha256(&old.cert_pem), root_sha256(&new.cert_pem));
        let now = now_ms();
        let valid = now + 60_000;
        let mut old_agent_cut_off = member("old-agent-recent", false, &old_sha, 0, "");
        old_agent_cut_off.present = true;
        let members = [
            member("re-keyed", true, &new_sha, valid, ""),
            // Connected and told to re-key, but has not (yet).
            member("not-re-keyed", true, &old_sha, valid, ""),
            // Cut off: it still presents its old-root certificate.
            member("cut-off", false, &old_sha, valid, ""),
            // Never re-keyed, and its certificate expired: it cannot
            // present it any more.
            member("expired", true, &old_sha, now - 1, ""),
            member("gone-expired", false, &old_sha, now - 1, ""),
            // No certificate: nothing of the old root to present.
            member("no-certificate", true, "", 0, ""),
            // Expiry unknown (a hello without it): while present.
            member("old-agent", true, &old_sha, 0, ""),
            member("old-agent-gone", false, &old_sha, 0, ""),
            old_agent_cut_off,
        ];
        assert_eq!(
            nodes(&blockers(&state, &members, now)),
            ["not-re-keyed", "cut-off", "old-agent", "old-agent-recent"]
        );
        assert_eq!(
            nodes(&blockers(&state, &members, valid)),
            ["old-agent", "old-agent-recent"]
        );
    }

    #[test]
    fn the_sidecars_a_rotation_waits_for_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let options = CaOptions::default();
        let roots = Roots::open(dir.path(), &options).unwrap();
        roots.start(None, Duration::from_secs(60)).unwrap();
        let old_sha = roots.signing_root_sha256();
        let valid = now_ms() + 60_000;
        {
            let mut state = roots.lock();
            let cut_off = member("cut-off", false, &old_sha, valid, &old_sha).kept();
            state.known.insert("cut-off".into(), cut_off);
            roots.write_rotation(&state).unwrap();
        }
        let again = Roots::open(dir.path(), &options).unwrap();
        let state = again.lock();
        let members: Vec<Member> = state.known.values().cloned().collect();
        assert_eq!(nodes(&blockers(&state, &members, now_ms())), ["cut-off"]);
        assert_eq!(members[0].cert_not_after_ms, valid);
    }

    /// A control plane's shared state over a store in `dir`.
    fn shared(dir: &Path) -> Arc<Shared> {
        let store = crate::store::RedbStore::open(&dir.join("mesh.redb")).unwrap();
        Shared::new(
            Arc::new(store),
            crate::metrics::ControlMetrics::new(),
            crate::first_party::FirstParty::from_modules(BTreeMap::new(), "lacewing.local"),
        )
        .unwrap()
    }

    /// Registers `node` with a certificate of `root` valid until `not_after`.
    fn register(shared: &Shared, node: &str, root: &str, not_after: u64) -> u64 {
        shared.register(api::Hello {
            node_id: node.into(),
            service: "orders".into(),
            namespace: "default".into(),
            inbound: "127.0.0.1:1".into(),
            certificate_root_sha256: root.into(),
            certificate_not_after_ms: not_after,
            ..Default::default()
        })
    }

    #[test]
    fn a_sidecar_cut_off_is_waited_for_across_a_restart_until_forgotten() {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = dir.path().join("state");
        std::fs::create_dir(&state_dir).unwrap();
        let options = CaOptions::default();
        let roots = Roots::open(&state_dir, &options).unwrap();
        let before = shared(dir.path());
        let old_sha = roots.signing_root_sha256();
        let valid = now_ms() + 600_000;
        register(&before, "up", &old_sha, valid);
        let session = register(&before, "cut-off", &old_sha, valid);
        before.unregister("cut-off", session);
        roots.start(None, Duration::from_secs(60)).unwrap();
        let two_roots = root_sha256(&roots.bundle_pem());
        {
            let mut sidecars = before.sidecars();
            sidecars.get_mut("up").unwrap().acked_bundle = two_roots;
            // Cut off longer than the reconnect grace.
            sidecars.get_mut("cut-off").unwrap().disconnected_at =
                std::time::Instant::now().checked_sub(RECONNECT_GRACE * 2);
        }
        let waiting = roots.step(&before).unwrap_err();
        assert_eq!(waiting, "sidecars to ACK the two-root bundle: cut-off");
        let status = roots.status(&before);
        assert_eq!(status.phase, "trusting");
        assert_eq!(nodes(&status.waiting_sidecars), ["cut-off"]);
        assert!(!status.waiting_sidecars[0].connected);
        assert!(matches!(
            roots.forget(&before, &["up".to_string()]),
            Err(RotateError::ConnectedSidecar(_))
        ));

        // A restarted control plane knows no sidecar until they reconnect,
        // but the rotation file kept the one cut off.
        drop(roots);
        let roots = Roots::open(&state_dir, &options).unwrap();
        // One process holds the store at a time.
        drop(before);
        let restarted = shared(dir.path());
        let status = roots.status(&restarted);
        assert_eq!(nodes(&status.waiting_sidecars), ["cut-off"]);
        assert!(matches!(
            roots.forget(&restarted, &["nobody".to_string()]),
            Err(RotateError::UnknownSidecar(_))
        ));
        roots.forget(&restarted, &["cut-off".to_string()]).unwrap();
        let status = roots.status(&restarted);
        assert!(status.waiting_sidecars.is_empty(), "{status:?}");
        // Forgotten on disk too; the one that ACKed is kept (it has done
        // its part, and holds a certificate of the old root).
        let again = Roots::open(&state_dir, &options).unwrap();
        let known: Vec<String> = again.lock().known.keys().cloned().collect();
        assert_eq!(known, ["up"]);
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
