//! The `Operator` service: module upload, apply (validated, then committed
//! atomically), get, status, waiting for sidecars to take a version, root
//! rotation, and join tokens for sidecars.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use lacewing_control_api as api;
use lacewing_mesh::{Catalog, Document, Kind, MeshIssue, check_references, rules};
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status, Streaming};

use crate::roots::{DEFAULT_OVERLAP, Roots, RotateError};
use crate::state::{MeshView, Shared};
use crate::store::{Change, StoreError};

/// Largest module accepted.
pub const MAX_MODULE_BYTES: usize = 64 * 1024 * 1024;

pub struct Operator {
    shared: Arc<Shared>,
    roots: Arc<Roots>,
    /// The SPIFFE IDs join tokens name are in it.
    trust_domain: String,
}

impl std::fmt::Debug for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Operator")
    }
}

impl Operator {
    pub fn new(shared: Arc<Shared>, roots: Arc<Roots>, trust_domain: &str) -> Self {
        Self {
            shared,
            roots,
            trust_domain: trust_domain.to_string(),
        }
    }
}

fn internal(e: StoreError) -> Status {
    Status::internal(e.to_string())
}

fn issue(i: MeshIssue) -> api::Issue {
    api::Issue {
        key: i.key,
        field: i.field,
        reason: i.reason,
    }
}

/// What an apply will do.
struct Plan {
    changes: Vec<Change>,
    changed: Vec<String>,
    unchanged: Vec<String>,
}

/// Checks an apply against the committed mesh; the changes to commit, or the problems.
fn plan(
    view: &MeshView,
    request: &api::ApplyRequest,
    has_module: &dyn Fn(&str) -> bool,
    builtins: &[&str],
) -> Result<Plan, Vec<api::Issue>> {
    let mut issues = Vec::new();
    let mut incoming: BTreeMap<String, Document> = BTreeMap::new();
    for (i, json) in request.documents.iter().enumerate() {
        match Document::from_json(json) {
            Ok(doc) => {
                for (field, reason) in rules::check_document(&doc) {
                    issues.push(issue(MeshIssue::new(doc.key(), field, reason)));
                }
                if incoming.insert(doc.key(), doc).is_some() {
                    issues.push(api::Issue {
                        key: String::new(),
                        field: format!("documents[{i}]"),
                        reason: "the same document twice".into(),
                    });
                }
            }
            Err(reason) => issues.push(api::Issue {
                key: String::new(),
                field: format!("documents[{i}]"),
                reason,
            }),
        }
    }
    let mut deletes = BTreeSet::new();
    for key in &request.deletes {
        if !view.docs.contains_key(key) {
            issues.push(api::Issue {
                key: key.clone(),
                field: String::new(),
                reason: "not stored".into(),
            });
        } else if incoming.contains_key(key) {
            issues.push(api::Issue {
                key: key.clone(),
                field: String::new(),
                reason: "both applied and deleted".into(),
            });
        }
        deletes.insert(key.clone());
    }
    if !issues.is_empty() {
        return Err(issues);
    }
    let mut merged: BTreeMap<&String, &Document> =
        view.docs.iter().map(|(k, (d, _))| (k, d)).collect();
    for key in &deletes {
        merged.remove(key);
    }
    for (key, doc) in &incoming {
        merged.insert(key, doc);
    }
    let catalog = Catalog::new(merged.values().copied(), has_module).with_builtins(builtins);
    let problems = check_references(merged.values().copied(), &catalog);
    if !problems.is_empty() {
        return Err(problems.into_iter().map(issue).collect());
    }
    let mut changes = Vec::new();
    let mut changed = Vec::new();
    let mut unchanged = Vec::new();
    for (key, doc) in incoming {
        if view.docs.get(&key).is_some_and(|(old, _)| *old == doc) {
            unchanged.push(key);
        } else {
            changes.push(Change::Put {
                key: key.clone(),
                json: doc.to_json(),
            });
            changed.push(key);
        }
    }
    for key in deletes {
        changes.push(Change::Delete { key: key.clone() });
        changed.push(key);
    }
    Ok(Plan {
        changes,
        changed,
        unchanged,
    })
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl api::operator_server::Operator for Operator {
    type WaitVersionStream = BoxStream<api::WaitProgress>;

    async fn upload_module(
        &self,
        request: Request<Streaming<api::ModuleChunk>>,
    ) -> Result<Response<api::UploadModuleReply>, Status> {
        let mut chunks = request.into_inner();
        let mut claimed = None;
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk?;
            if claimed.is_none() {
                claimed = Some(chunk.sha256.clone());
            }
            if bytes.len() + chunk.data.len() > MAX_MODULE_BYTES {
                return Err(Status::resource_exhausted(format!(
                    "module larger than {MAX_MODULE_BYTES} bytes"
                )));
            }
            bytes.extend_from_slice(&chunk.data);
        }
        let actual = hex(&Sha256::digest(&bytes));
        let claimed = claimed.unwrap_or_default();
        if claimed != actual {
            return Err(Status::invalid_argument(format!(
                "sha256 mismatch: the upload says {claimed}, its bytes are {actual}"
            )));
        }
        let shared = self.shared.clone();
        let size = bytes.len() as u64;
        let sha = actual.clone();
        let stored = tokio::task::spawn_blocking(move || shared.store.put_module(&sha, &bytes))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(internal)?;
        Ok(Response::new(api::UploadModuleReply {
            sha256: actual,
            size,
            stored,
        }))
    }

    async fn missing_modules(
        &self,
        request: Request<api::MissingModulesRequest>,
    ) -> Result<Response<api::MissingModulesReply>, Status> {
        let mut missing = Vec::new();
        for sha in request.into_inner().sha256 {
            if !self.shared.store.has_module(&sha).map_err(internal)? {
                missing.push(sha);
            }
        }
        Ok(Response::new(api::MissingModulesReply { sha256: missing }))
    }

    async fn apply(
        &self,
        request: Request<api::ApplyRequest>,
    ) -> Result<Response<api::ApplyReply>, Status> {
        let request = request.into_inner();
        let _one_at_a_time = self.shared.apply_lock.lock().await;
        let view = self.shared.mesh();
        let store = self.shared.store.clone();
        let has_module = |sha: &str| store.has_module(sha).unwrap_or(false);
        let Plan {
            changes,
            changed,
            unchanged,
        } = match plan(
            &view,
            &request,
            &has_module,
            self.shared.first_party.names(),
        ) {
            Ok(plan) => plan,
            Err(issues) => {
                self.shared
                    .metrics
                    .applies
                    .with_label_values(&["refused"])
                    .inc();
                return Ok(Response::new(api::ApplyReply {
                    version: view.version,
                    issues,
                    ..Default::default()
                }));
            }
        };
        if changes.is_empty() {
            self.shared
                .metrics
                .applies
                .with_label_values(&["unchanged"])
                .inc();
            return Ok(Response::new(api::ApplyReply {
                version: view.version,
                changed,
                unchanged,
                issues: Vec::new(),
            }));
        }
        let shared = self.shared.clone();
        let expected = view.version;
        let version = tokio::task::spawn_blocking(move || {
            let version = shared.store.commit(expected, &changes)?;
            let view = MeshView::load(&*shared.store)?;
            shared.set_mesh(view);
            Ok::<_, StoreError>(version)
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(internal)?;
        self.shared
            .metrics
            .applies
            .with_label_values(&["stored"])
            .inc();
        tracing::info!(version, changed = changed.len(), "applied");
        Ok(Response::new(api::ApplyReply {
            version,
            changed,
            unchanged,
            issues: Vec::new(),
        }))
    }

    async fn get(
        &self,
        request: Request<api::GetRequest>,
    ) -> Result<Response<api::GetReply>, Status> {
        let request = request.into_inner();
        let kind = if request.kind.is_empty() {
            None
        } else {
            Some(Kind::parse(&request.kind).ok_or_else(|| {
                Status::invalid_argument(format!("unknown kind `{}`", request.kind))
            })?)
        };
        let view = self.shared.mesh();
        let documents = view
            .docs
            .iter()
            .filter(|(_, (d, _))| {
                kind.is_none_or(|k| d.kind() == k)
                    && (request.name.is_empty() || d.name() == request.name)
                    && (request.namespace.is_empty() || d.namespace() == request.namespace)
            })
            .map(|(key, (d, version))| api::StoredDocument {
                key: key.clone(),
                json: d.to_json(),
                version: *version,
            })
            .collect();
        Ok(Response::new(api::GetReply {
            version: view.version,
            documents,
        }))
    }

    async fn status(
        &self,
        _request: Request<api::StatusRequest>,
    ) -> Result<Response<api::StatusReply>, Status> {
        let version = self.shared.mesh().version;
        let bundle = crate::roots::root_sha256(&self.roots.bundle_pem());
        let sidecars = self
            .shared
            .sidecars()
            .values()
            .map(|r| api::SidecarStatus {
                has_trust_bundle: r.acked_bundle == bundle,
                ..r.status()
            })
            .collect();
        Ok(Response::new(api::StatusReply {
            version,
            sidecars,
            roots: Some(self.roots.status(&self.shared)),
        }))
    }

    async fn rotate_root(
        &self,
        request: Request<api::RotateRootRequest>,
    ) -> Result<Response<api::RootRotation>, Status> {
        use api::rotate_root_request::Action;
        let request = request.into_inner();
        let refused = |e: RotateError| match e {
            RotateError::Store(_) => Status::internal(e.to_string()),
            RotateError::UnknownSidecar(_) => Status::not_found(e.to_string()),
            _ => Status::failed_precondition(e.to_string()),
        };
        let roots = self.roots.clone();
        let result = match Action::try_from(request.action) {
            Ok(Action::Show) => Ok(()),
            Ok(Action::Start) => {
                let root = match (
                    request.root_cert_pem.is_empty(),
                    request.root_key_pem.is_empty(),
                ) {
                    (true, true) => None,
                    (false, false) => Some((request.root_cert_pem, request.root_key_pem)),
                    _ => {
                        return Err(Status::invalid_argument(
                            "give both the new root's certificate and its key, or neither",
                        ));
                    }
                };
                let overlap = match request.overlap_ms {
                    0 => DEFAULT_OVERLAP,
                    ms => Duration::from_millis(ms),
                };
                tokio::task::spawn_blocking(move || roots.start(root, overlap))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
            }
            Ok(Action::Finish) => tokio::task::spawn_blocking(move || roots.finish())
                .await
                .map_err(|e| Status::internal(e.to_string()))?,
            Ok(Action::Forget) => {
                if request.node_ids.is_empty() {
                    return Err(Status::invalid_argument("name the sidecars to forget"));
                }
                let shared = self.shared.clone();
                tokio::task::spawn_blocking(move || roots.forget(&shared, &request.node_ids))
                    .await
                    .map_err(|e| Status::internal(e.to_string()))?
            }
            Err(_) => return Err(Status::invalid_argument("unknown rotation action")),
        };
        result.map_err(refused)?;
        if request.action != Action::Show as i32 {
            tracing::info!(action = request.action, "mesh root rotation requested");
            self.shared.metrics.roots.set(self.roots.count() as i64);
            // Every stream sends the new bundle.
            self.shared.changed();
        }
        Ok(Response::new(self.roots.status(&self.shared)))
    }

    async fn create_join_token(
        &self,
        request: Request<api::CreateJoinTokenRequest>,
    ) -> Result<Response<api::JoinToken>, Status> {
        let request = request.into_inner();
        let namespace = match request.namespace.as_str() {
            "" => "default".to_string(),
            other => other.to_string(),
        };
        for (what, name) in [("service", &request.service), ("namespace", &namespace)] {
            if !crate::discovery::name_ok(name) {
                return Err(Status::invalid_argument(format!(
                    "`{name}` is not a {what} name (1-63 of a-z, 0-9, -)"
                )));
            }
        }
        let ttl = match request.ttl_ms {
            0 => crate::join::DEFAULT_JOIN_TTL,
            ms => Duration::from_millis(ms),
        };
        if ttl > crate::join::MAX_JOIN_TTL {
            return Err(Status::invalid_argument(format!(
                "a join token lives at most {} days",
                crate::join::MAX_JOIN_TTL.as_secs() / 86400
            )));
        }
        let spiffe_id =
            lacewing_tls::SpiffeId::new(&self.trust_domain, &namespace, &request.service)
                .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let token = crate::join::new_token();
        let created_ms = crate::state::now_ms();
        let record = crate::store::JoinRecord {
            namespace: namespace.clone(),
            service: request.service.clone(),
            created_ms,
            expires_ms: created_ms.saturating_add(ttl.as_millis() as u64),
            used_ms: 0,
            used_by: String::new(),
        };
        let expires_ms = record.expires_ms;
        let store = self.shared.store.clone();
        let sha256 = crate::join::token_sha256(&token);
        tokio::task::spawn_blocking(move || store.put_join_token(&sha256, &record))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(internal)?;
        tracing::info!(id = %spiffe_id, expires_ms, "join token created");
        Ok(Response::new(api::JoinToken {
            token,
            service: request.service,
            namespace,
            expires_ms,
            spiffe_id: spiffe_id.uri(),
        }))
    }

    async fn wait_version(
        &self,
        request: Request<api::WaitVersionRequest>,
    ) -> Result<Response<Self::WaitVersionStream>, Status> {
        let request = request.into_inner();
        let shared = self.shared.clone();
        let timeout = Duration::from_millis(request.timeout_ms.clamp(1, 600_000));
        let version = request.version;
        let waiting: BTreeSet<String> = shared
            .sidecars()
            .values()
            .filter(|r| r.connected)
            .map(|r| r.hello.node_id.clone())
            .collect();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        tokio::spawn(async move {
            let deadline = tokio::time::Instant::now() + timeout;
            let mut answers = shared.answers.subscribe();
            let mut closing = shared.closing.subscribe();
            let mut last = None;
            loop {
                let progress = progress(&shared, &waiting, version);
                let settled = progress.acked as usize + progress.nacked.len() == waiting.len();
                let timed_out = tokio::time::Instant::now() >= deadline;
                if settled || timed_out {
                    let mut last_progress = progress;
                    last_progress.done = true;
                    if !settled {
                        last_progress.silent = silent(&shared, &waiting, version);
                    }
                    let _ = tx.send(Ok(last_progress)).await;
                    return;
                }
                let summary = (progress.acked, progress.nacked.len());
                if last != Some(summary) {
                    last = Some(summary);
                    if tx.send(Ok(progress)).await.is_err() {
                        return;
                    }
                }
                tokio::select! {
                    _ = async { let _ = closing.wait_for(|closed| *closed).await; } => return,
                    _ = answers.changed() => {}
                    _ = tokio::time::sleep_until(deadline) => {}
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}

fn progress(shared: &Shared, waiting: &BTreeSet<String>, version: u64) -> api::WaitProgress {
    let sidecars = shared.sidecars();
    let mut acked = 0;
    let mut nacked = Vec::new();
    for id in waiting {
        let Some(r) = sidecars.get(id) else { continue };
        if r.acked_version >= version {
            acked += 1;
        } else if r.nacked_version >= version {
            nacked.push(r.status());
        }
    }
    api::WaitProgress {
        version,
        total: waiting.len() as u32,
        acked,
        nacked,
        silent: Vec::new(),
        done: false,
    }
}

fn silent(shared: &Shared, waiting: &BTreeSet<String>, version: u64) -> Vec<api::SidecarStatus> {
    let sidecars = shared.sidecars();
    waiting
        .iter()
        .filter_map(|id| sidecars.get(id))
        .filter(|r| r.acked_version < version && r.nacked_version < version)
        .map(|r| r.status())
        .collect()
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
