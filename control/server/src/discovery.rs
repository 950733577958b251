//! The `Discovery` service: each sidecar's stream (hello, then snapshots
//! down and ACK/NACKs up) and module downloads. A CSR in the hello, or sent
//! later on the stream, is signed by the mesh CA and the certificate travels
//! in the next snapshot with the trust bundle. The hello is admitted first
//! ([`crate::join`]): the service it names must be the one its credential
//! allows.

use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use futures_util::Stream;
use lacewing_control_api as api;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::join::{Admission, Credential};
use crate::mesh_tls::{MeshTlsSettings, TlsRules};
use crate::push::Built;
use crate::roots::Roots;
use crate::snapshot::Index;
use crate::state::{Shared, now_ms};

pub(crate) type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

pub struct Discovery {
    shared: Arc<Shared>,
    admission: Admission,
    /// The index of the latest change, built by the first stream that needs it.
    index: Arc<Mutex<Arc<Index>>>,
    identity: Arc<StreamIdentity>,
}

/// What the streams need to hand out identities and TLS modes.
struct StreamIdentity {
    roots: Arc<Roots>,
    settings: MeshTlsSettings,
    /// The `MeshTLS` rules of the latest change (by epoch).
    rules: Mutex<Option<(u64, Arc<TlsRules>)>>,
}

impl StreamIdentity {
    fn rules_at(&self, shared: &Shared, epoch: u64) -> Arc<TlsRules> {
        let mut cached = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((at, rules)) = &*cached
            && *at == epoch
        {
            return rules.clone();
        }
        let ca = self.roots.ca();
        let rules = Arc::new(TlsRules::build(
            &shared.mesh(),
            &shared.sidecar_endpoints(),
            &self.settings,
            ca.root_pem(),
        ));
        *cached = Some((epoch, rules.clone()));
        rules
    }

    /// Signs `csr_pem` for the sidecar of `hello`, counted by result. A
    /// refused request is logged and the stream goes on without a new
    /// certificate (its snapshots name the trust domain, so a sidecar that
    /// guessed it wrong can ask again).
    fn sign(
        &self,
        shared: &Shared,
        hello: &api::Hello,
        csr_pem: &str,
    ) -> Option<api::WorkloadCertificate> {
        let ca = self.roots.ca();
        let result = lacewing_tls::SpiffeId::new(
            &self.settings.trust_domain,
            &hello.namespace,
            &hello.service,
        )
        .map_err(|e| e.to_string())
        .and_then(|caller| {
            ca.sign(csr_pem, &caller)
                .map(|issued| (caller, issued))
                .map_err(|e| e.to_string())
        });
        let (caller, issued) = match result {
            Ok(ok) => ok,
            Err(reason) => {
                shared
                    .metrics
                    .certificates
                    .with_label_values(&["refused"])
                    .inc();
                tracing::warn!(node = %hello.node_id, %reason, "certificate request refused");
                return None;
            }
        };
        shared
            .metrics
            .certificates
            .with_label_values(&["issued"])
            .inc();
        let ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64)
        };
        tracing::info!(node = %hello.node_id, id = %caller, "workload certificate issued");
        Some(api::WorkloadCertificate {
            chain_pem: issued.cert_pem,
            trust_bundle_pem: ca.root_pem().to_string(),
            not_before_ms: now_ms(),
            not_after_ms: ms(issued.not_after),
            spiffe_id: caller.uri(),
            root_sha256: crate::roots::signer_of(&ca),
        })
    }
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Discovery")
    }
}

impl Discovery {
    pub fn new(shared: Arc<Shared>, roots: Arc<Roots>, settings: MeshTlsSettings) -> Self {
        Self {
            admission: Admission {
                store: shared.store.clone(),
                trust_domain: settings.trust_domain.clone(),
                refusals: shared.metrics.token_refusals.clone(),
                registrations: shared.metrics.registrations.clone(),
            },
            shared,
            index: Arc::new(Mutex::new(Arc::new(Index::unbuilt()))),
            identity: Arc::new(StreamIdentity {
                roots,
                settings,
                rules: Mutex::new(None),
            }),
        }
    }
}

impl Discovery {
    /// Reads the hello, registers the sidecar and starts its stream: each
    /// snapshot goes out as `message(built, revision)`.
    pub(crate) async fn open<T: Send + 'static>(
        &self,
        request: Request<Streaming<api::SidecarMessage>>,
        message: SnapshotMessage<T>,
    ) -> Result<Response<BoxStream<T>>, Status> {
        let credential = request.extensions().get::<Credential>().cloned();
        let mut incoming = request.into_inner();
        let hello = match incoming.next().await {
            Some(Ok(api::SidecarMessage {
                message: Some(api::sidecar_message::Message::Hello(hello)),
            })) => hello,
            Some(Err(status)) => return Err(status),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ));
            }
        };
        check_hello(&hello)?;
        self.admission.admit(credential.as_ref(), &hello).await?;
        let identity = self.identity.clone();
        let certificate = hello
            .certificate_request
            .as_ref()
            .and_then(|request| identity.sign(&self.shared, &hello, &request.csr_pem));
        let shared = self.shared.clone();
        let cache = self.index.clone();
        let session = shared.register(hello.clone());
        tracing::info!(node = %hello.node_id, service = %hello.service, inbound = %hello.inbound, "sidecar connected");
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(async move {
            let stream = SidecarStream {
                shared: &shared,
                cache: &cache,
                identity: &identity,
                hello: &hello,
                session,
            };
            stream.serve(certificate, incoming, tx, message).await;
            shared.unregister(&hello.node_id, session);
            tracing::info!(node = %hello.node_id, "sidecar disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

fn index_at(shared: &Shared, cache: &Mutex<Arc<Index>>, epoch: u64) -> Arc<Index> {
    let mut cached = cache.lock().unwrap_or_else(PoisonError::into_inner);
    if cached.epoch != epoch {
        let view = shared.mesh();
        *cached = Arc::new(Index::build(
            epoch,
            &view,
            &shared.sidecar_endpoints(),
            &shared.first_party,
        ));
    }
    cached.clone()
}

/// Whether `s` may name a service or a namespace: 1-63 of `a-z0-9-`.
pub(crate) fn name_ok(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn check_hello(hello: &api::Hello) -> Result<(), Status> {
    if hello.node_id.is_empty() || hello.node_id.len() > 253 {
        return Err(Status::invalid_argument(
            "hello: node_id must be 1-253 characters",
        ));
    }
    if !name_ok(&hello.service) {
        return Err(Status::invalid_argument(format!(
            "hello: `{}` is not a service name",
            hello.service
        )));
    }
    if !name_ok(&hello.namespace) {
        return Err(Status::invalid_argument(format!(
            "hello: `{}` is not a namespace",
            hello.namespace
        )));
    }
    if hello.inbound.parse::<std::net::SocketAddr>().is_err() {
        return Err(Status::invalid_argument(format!(
            "hello: inbound `{}` is not an address",
            hello.inbound
        )));
    }
    Ok(())
}

#[tonic::async_trait]
impl api::discovery_server::Discovery for Discovery {
    type StreamStream = BoxStream<api::Snapshot>;
    type FetchModuleStream = BoxStream<api::ModuleChunk>;

    /// Not reached in service: [`crate::push::DiscoveryService`] serves
    /// `Stream` with snapshots encoded once. Kept equivalent for callers of
    /// the generated server.
    async fn stream(
        &self,
        request: Request<Streaming<api::SidecarMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        self.open(request, |built, revision, certificate| api::Snapshot {
            revision,
            certificate: certificate.cloned(),
            ..built.snapshot.clone()
        })
        .await
    }

    async fn fetch_module(
        &self,
        request: Request<api::FetchModuleRequest>,
    ) -> Result<Response<Self::FetchModuleStream>, Status> {
        if let Some(Credential::Join(_)) = request.extensions().get::<Credential>() {
            self.shared
                .metrics
                .token_refusals
                .with_label_values(&["join", "not_for_modules"])
                .inc();
            return Err(Status::unauthenticated(
                "a join token only registers a sidecar: modules are fetched with its workload certificate",
            ));
        }
        let sha256 = request.into_inner().sha256;
        let bytes = self
            .shared
            .store
            .module(&sha256)
            .map_err(|e| Status::internal(e.to_string()))?
            .ok_or_else(|| Status::not_found(format!("no module with sha256 {sha256}")))?;
        self.shared.metrics.module_downloads.inc();
        let chunks: Vec<Result<api::ModuleChunk, Status>> = bytes
            .chunks(api::MODULE_CHUNK)
            .enumerate()
            .map(|(i, data)| {
                Ok(api::ModuleChunk {
                    sha256: if i == 0 {
                        sha256.clone()
                    } else {
                        String::new()
                    },
                    data: data.to_vec(),
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

/// How a stream turns a shared snapshot, its revision and the sidecar's own
/// certificate into the message it sends.
pub(crate) type SnapshotMessage<T> = fn(&Built, u64, Option<&api::WorkloadCertificate>) -> T;

/// One sidecar's stream.
struct SidecarStream<'a> {
    shared: &'a Shared,
    cache: &'a Mutex<Arc<Index>>,
    identity: &'a StreamIdentity,
    hello: &'a api::Hello,
    session: u64,
}

impl SidecarStream<'_> {
    /// Records the certificate issued to the sidecar (for `lacewing status`).
    fn record_certificate(&self, certificate: &api::WorkloadCertificate) {
        let mut sidecars = self.shared.sidecars();
        if let Some(r) = sidecars
            .get_mut(&self.hello.node_id)
            .filter(|r| r.session == self.session)
        {
            r.cert_not_after_ms = certificate.not_after_ms;
            r.spiffe_id = certificate.spiffe_id.clone();
            r.cert_root = certificate.root_sha256.clone();
        }
    }

    /// Sends a snapshot whenever what the sidecar should have changes (the
    /// mesh, its `MeshTLS` modes, its certificate), and records its answers
    /// and signs its certificate requests, until either side ends the
    /// stream. The snapshot itself is shared by the sidecars of a service;
    /// only the revision and the certificate are the stream's own.
    async fn serve<T>(
        &self,
        mut certificate: Option<api::WorkloadCertificate>,
        mut incoming: Streaming<api::SidecarMessage>,
        tx: mpsc::Sender<Result<T, Status>>,
        message: SnapshotMessage<T>,
    ) {
        let (shared, cache, hello, session) = (self.shared, self.cache, self.hello, self.session);
        if let Some(c) = &certificate {
            self.record_certificate(c);
        }
        let mut changes = shared.changes.subscribe();
        let mut closing = shared.closing.subscribe();
        let mut last_sent: Option<Arc<Built>> = None;
        let mut certificate_sent = false;
        let mut revision = 0;
        loop {
            // Shutting down: the sidecars leaving would make every snapshot
            // from now on lack their endpoints.
            if *closing.borrow() {
                let _ = tx
                    .send(Err(Status::unavailable(
                        "the control plane is shutting down",
                    )))
                    .await;
                return;
            }
            let epoch = *changes.borrow_and_update();
            let snapshot = index_at(shared, cache, epoch).snapshot_with(hello, |snapshot| {
                self.identity.rules_at(shared, epoch).apply(snapshot, hello);
            });
            let same = certificate_sent
                && last_sent.as_ref().is_some_and(|last| {
                    Arc::ptr_eq(last, &snapshot) || last.bytes == snapshot.bytes
                });
            // Just after a restart, a sidecar that serves this version
            // already waits for the others to reconnect: a snapshot now
            // would lack their endpoints.
            let hold = (revision == 0
                && hello.serving_version != 0
                && hello.serving_version == snapshot.snapshot.version)
                .then(|| shared.reconnect_grace_until())
                .flatten();
            if !same && hold.is_none() {
                revision += 1;
                let numbered = message(&snapshot, revision, certificate.as_ref());
                {
                    let mut sidecars = shared.sidecars();
                    match sidecars.get_mut(&hello.node_id) {
                        Some(r) if r.session == session => {
                            r.sent_version = snapshot.snapshot.version;
                            r.sent_revision = revision;
                            r.sent_bundle =
                                crate::roots::root_sha256(&snapshot.snapshot.trust_bundle_pem);
                            r.sent_at = Some(Instant::now());
                        }
                        // A newer stream of the same node took over.
                        _ => return,
                    }
                }
                if tx.send(Ok(numbered)).await.is_err() {
                    return;
                }
                shared.metrics.pushes.inc();
                last_sent = Some(snapshot);
                certificate_sent = true;
            }
            use api::sidecar_message::Message;
            tokio::select! {
                _ = async { let _ = closing.wait_for(|closed| *closed).await; } => {
                    let _ = tx.send(Err(Status::unavailable("the control plane is shutting down"))).await;
                    return;
                }
                changed = changes.changed() => if changed.is_err() { return },
                () = async {
                    match hold {
                        Some(until) => tokio::time::sleep_until(until.into()).await,
                        None => std::future::pending().await,
                    }
                } => {}
                message = incoming.next() => match message {
                    Some(Ok(api::SidecarMessage { message: Some(Message::Answer(answer)) })) => {
                        record_answer(shared, &hello.node_id, session, &answer);
                    }
                    Some(Ok(api::SidecarMessage { message: Some(Message::CertificateRequest(request)) })) => {
                        if let Some(issued) = self.identity.sign(shared, hello, &request.csr_pem) {
                            self.record_certificate(&issued);
                            certificate = Some(issued);
                            certificate_sent = false;
                        }
                    }
                    Some(Ok(_)) => {
                        let _ = tx.send(Err(Status::invalid_argument("only answers and certificate requests may follow the hello"))).await;
                        return;
                    }
                    Some(Err(_)) | None => return,
                },
            }
        }
    }
}

fn record_answer(shared: &Shared, node_id: &str, session: u64, answer: &api::Answer) {
    let mut sidecars = shared.sidecars();
    let Some(r) = sidecars.get_mut(node_id).filter(|r| r.session == session) else {
        return;
    };
    r.last_answer_ms = now_ms();
    if answer.ack {
        r.acked_version = r.acked_version.max(answer.version);
        if answer.revision == r.sent_revision {
            r.acked_bundle = r.sent_bundle.clone();
        }
        if answer.revision == r.sent_revision
            && let Some(sent) = r.sent_at.take()
        {
            shared
                .metrics
                .push_latency
                .observe(sent.elapsed().as_secs_f64());
        }
        shared.metrics.answers.with_label_values(&["ack", ""]).inc();
    } else {
        r.nacked_version = r.nacked_version.max(answer.version);
        r.nack_reason = answer.reason.clone();
        let code: String = answer
            .code
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
            .take(32)
            .collect();
        shared
            .metrics
            .answers
            .with_label_values(&["nack", &code])
            .inc();
        tracing::warn!(node = %node_id, version = answer.version, reason = %answer.reason, "sidecar NACKed");
    }
    drop(sidecars);
    shared.answered();
}
