//! The stream to the control plane: hello, snapshots in, ACK/NACK out,
//! reconnecting with exponential backoff and jitter while the control plane
//! is away (the proxy keeps serving what it has meanwhile).
//!
//! A sidecar holding a join token (`lwjoin_…`) sends it on its first stream
//! only: once its workload certificate is installed, every connection
//! presents that certificate instead (the token is used up). One holding
//! the shared bootstrap token sends it on every call.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lacewing_config::ProxyConfig;
use lacewing_control_api as api;
use lacewing_control_api::discovery_client::DiscoveryClient;
use rand::Rng;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::cache::{Cache, CacheError, sha256_hex};
use crate::identity::WorkloadIdentity;
use crate::metrics::AgentMetrics;
use crate::translate::{SidecarSpec, bootstrap_config, translate};

/// Puts a configuration into service (the proxy's generation publish); the
/// error is the reason, sent back in the NACK. Called on a blocking thread.
pub type Publish = Arc<dyn Fn(ProxyConfig) -> Result<(), String> + Send + Sync>;

/// Largest module a sidecar downloads.
const MAX_MODULE_BYTES: usize = 64 * 1024 * 1024;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The waits between reconnection attempts: doubling from [`FIRST_BACKOFF`]
/// up to [`MAX_BACKOFF`], each drawn from [half, all] of its step so that
/// sidecars that lost the same control plane do not all come back at the
/// same instant.
#[derive(Debug)]
struct Backoff {
    step: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            step: FIRST_BACKOFF,
        }
    }
}

impl Backoff {
    /// The next wait; the step after it doubles, up to the cap.
    fn next_wait(&mut self) -> Duration {
        let wait = self.step.mul_f64(rand::rng().random_range(0.5..=1.0));
        self.step = (self.step * 2).min(MAX_BACKOFF);
        wait
    }
}

#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// The control plane, `HOST:PORT` (or `https://HOST:PORT`).
    pub control: String,
    /// A join token, or the shared bootstrap token.
    pub token: String,
    /// The CA the control plane's API certificate must chain to (its
    /// `ca.pem`, found beside the bootstrap token).
    pub trust: lacewing_tls::api::ApiTrust,
    pub spec: SidecarSpec,
    /// Where modules and the last good snapshot are kept.
    pub state_dir: PathBuf,
    /// Where the workload certificate goes; the proxy's TLS reads it.
    pub identity: Arc<lacewing_tls::LiveIdentity>,
}

/// Why a snapshot was refused: a short code (metrics) and the reason.
#[derive(Debug)]
struct Refusal {
    code: &'static str,
    reason: String,
}

impl Refusal {
    fn new(code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason.into(),
        }
    }
}

/// A sidecar's control-plane client.
pub struct Agent {
    options: AgentOptions,
    cache: Cache,
    publish: Publish,
    metrics: AgentMetrics,
    /// The snapshot being served (version 0: none).
    serving: api::Snapshot,
    served_config: Option<ProxyConfig>,
    identity: WorkloadIdentity,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("options", &self.options)
            .field("serving", &self.serving.version)
            .finish_non_exhaustive()
    }
}

fn discovery_client(channel: Channel) -> DiscoveryClient<Channel> {
    DiscoveryClient::new(channel).max_decoding_message_size(64 * 1024 * 1024)
}

/// Waits until `at`, or for ever.
async fn sleep_until(at: Option<std::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

impl Agent {
    /// The configuration to start the proxy with: the last good snapshot on
    /// disk when there is one (so the sidecar serves while the control plane
    /// is away), else the bootstrap configuration. Also returns its version.
    pub fn initial_config(options: &AgentOptions) -> Result<(ProxyConfig, u64), CacheError> {
        let cache = Cache::open(&options.state_dir)?;
        if let Some(snapshot) = cache.load_snapshot() {
            match translate(&snapshot, &options.spec, &cache) {
                Ok(config) if lacewing_config::validate(&config).is_ok() => {
                    return Ok((config, snapshot.version));
                }
                _ => tracing::warn!("the saved snapshot no longer builds; starting without it"),
            }
        }
        Ok((bootstrap_config(&options.spec), 0))
    }

    /// An agent for a proxy already serving `initial` (from [`Agent::initial_config`]).
    pub fn new(
        options: AgentOptions,
        publish: Publish,
        metrics: AgentMetrics,
        initial: &ProxyConfig,
        initial_version: u64,
    ) -> Result<Self, CacheError> {
        let cache = Cache::open(&options.state_dir)?;
        let serving = if initial_version > 0 {
            cache.load_snapshot().unwrap_or_default()
        } else {
            api::Snapshot::default()
        };
        metrics.version.set(serving.version as i64);
        if serving.version > 0 {
            metrics.last_update.set(unix_now());
        }
        let mut identity = WorkloadIdentity::new(options.identity.clone());
        // The trust domain of the saved snapshot: the first hello can ask for a certificate.
        identity.learn(&serving);
        identity.restore(&cache);
        Ok(Self {
            options,
            cache,
            publish,
            metrics,
            serving,
            served_config: Some(initial.clone()),
            identity,
        })
    }

    /// Keeps a stream to the control plane open for ever.
    pub async fn run(mut self) {
        let mut backoff = Backoff::default();
        loop {
            match self.session().await {
                Ok(got_snapshot) => {
                    tracing::warn!("control plane ended the stream");
                    if got_snapshot {
                        backoff = Backoff::default();
                    }
                }
                Err(status) if status.code() == tonic::Code::Unauthenticated => {
                    tracing::error!(error = %status.message(), "the control plane refused this sidecar");
                }
                Err(status) => {
                    tracing::warn!(error = %status.message(), "control plane unreachable");
                }
            }
            self.metrics.connected.set(0);
            tokio::time::sleep(backoff.next_wait()).await;
        }
    }

    /// `message` with the bearer token, unless the connection presents
    /// the workload certificate.
    fn authorized<T>(&self, message: T, with_certificate: bool) -> Result<Request<T>, Status> {
        let mut request = Request::new(message);
        if with_certificate {
            return Ok(request);
        }
        let value = format!("Bearer {}", self.options.token)
            .parse()
            .map_err(|_| Status::invalid_argument("the token is not valid metadata"))?;
        request.metadata_mut().insert(api::AUTHORIZATION, value);
        Ok(request)
    }

    /// Whether the token is a join token (used once, then the certificate).
    fn joins(&self) -> bool {
        self.options.token.starts_with(api::JOIN_TOKEN_PREFIX)
    }

    /// The workload certificate to authenticate with: a joined sidecar's
    /// installed one.
    fn credential_certificate(&self) -> Option<lacewing_tls::Identity> {
        if !self.joins() {
            return None;
        }
        self.identity
            .live()
            .current()
            .map(|material| material.identity.clone())
    }

    /// Connects verifying the control plane with the mesh's trust bundle as
    /// the last snapshot gave it (it follows a root rotation), or else with
    /// the CA file the sidecar was started with; presenting `certificate`
    /// when given.
    async fn connect(
        &self,
        certificate: Option<&lacewing_tls::Identity>,
    ) -> Result<Channel, Status> {
        let presenting = |trust: lacewing_tls::api::ApiTrust| match certificate {
            Some(identity) => trust.presenting(identity),
            None => Ok(trust),
        };
        let learned = self.identity.trust_bundle_pem();
        if !learned.is_empty() {
            match lacewing_tls::api::ApiTrust::from_pem(learned, "the mesh trust bundle")
                .and_then(presenting)
            {
                Ok(trust) => match self.connect_with(&trust).await {
                    Ok(channel) => return Ok(channel),
                    Err(status) => {
                        tracing::debug!(error = %status.message(), "the mesh trust bundle does not verify the control plane");
                    }
                },
                Err(error) => tracing::warn!(%error, "the mesh trust bundle is not usable"),
            }
        }
        let trust = presenting(self.options.trust.clone())
            .map_err(|e| Status::invalid_argument(format!("the workload certificate: {e}")))?;
        self.connect_with(&trust).await
    }

    async fn connect_with(&self, trust: &lacewing_tls::api::ApiTrust) -> Result<Channel, Status> {
        let bare = lacewing_tls::api::api_address(&self.options.control)
            .map_err(Status::invalid_argument)?;
        // The URI only names the authority: the connector does the TLS.
        Endpoint::from_shared(format!("http://{bare}"))
            .map_err(|e| Status::invalid_argument(e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_with_connector(trust.connector())
            .await
            .map_err(|e| Status::unavailable(lacewing_tls::api::describe_connect_error(&e)))
    }

    /// One stream; returns whether any snapshot arrived on it.
    async fn session(&mut self) -> Result<bool, Status> {
        let certificate = self.credential_certificate();
        let mut with_certificate = certificate.is_some();
        let channel = self.connect(certificate.as_ref()).await?;
        let mut client = discovery_client(channel);
        let spec = &self.options.spec;
        let hello = api::Hello {
            node_id: spec.node_id.clone(),
            service: spec.service.clone(),
            namespace: spec.namespace.clone(),
            inbound: spec.inbound.to_string(),
            outbound: spec.outbound.to_string(),
            serving_version: self.serving.version,
            certificate_request: self.certificate_request(),
            certificate_root_sha256: self.identity.certificate_root().to_string(),
            certificate_not_after_ms: self.identity.certificate_not_after_ms(),
        };
        let (tx, rx) = mpsc::channel(8);
        let _ = tx
            .send(api::SidecarMessage {
                message: Some(api::sidecar_message::Message::Hello(hello)),
            })
            .await;
        let request = self.authorized(ReceiverStream::new(rx), with_certificate)?;
        let mut snapshots = client.stream(request).await?.into_inner();
        self.metrics.connected.set(1);
        tracing::info!(control = %self.options.control, with_certificate, "connected to the control plane");
        let mut got = false;
        let mut saving = false;
        loop {
            let rotate_at = self.identity.rotate_at();
            let snapshot = tokio::select! {
                snapshot = snapshots.next() => match snapshot {
                    Some(snapshot) => snapshot?,
                    None => break,
                },
                () = sleep_until(rotate_at) => {
                    if let Some(request) = self.certificate_request()
                        && tx.send(api::SidecarMessage {
                            message: Some(api::sidecar_message::Message::CertificateRequest(request)),
                        }).await.is_err()
                    {
                        break;
                    }
                    continue;
                }
            };
            got = true;
            let (version, revision) = (snapshot.version, snapshot.revision);
            let answer = match self
                .take(&mut client, &mut with_certificate, snapshot)
                .await
            {
                Ok(()) => {
                    saving = true;
                    self.metrics.snapshots.with_label_values(&["ack"]).inc();
                    api::Answer {
                        version,
                        revision,
                        ack: true,
                        ..Default::default()
                    }
                }
                Err(refusal) => {
                    tracing::warn!(version, code = refusal.code, reason = %refusal.reason, "snapshot refused; the previous one stays");
                    self.metrics.snapshots.with_label_values(&["nack"]).inc();
                    api::Answer {
                        version,
                        revision,
                        ack: false,
                        code: refusal.code.to_string(),
                        reason: refusal.reason,
                    }
                }
            };
            // Kept on disk before the ACK, so an ACKed version is one a
            // sidecar restarted while the control plane is away serves.
            if std::mem::take(&mut saving) {
                self.save_serving().await;
            }
            let message = api::SidecarMessage {
                message: Some(api::sidecar_message::Message::Answer(answer)),
            };
            if tx.send(message).await.is_err() {
                break;
            }
            // The first snapshot told the trust domain: ask for a certificate.
            if self.identity.wants_certificate()
                && let Some(request) = self.certificate_request()
            {
                let message = api::SidecarMessage {
                    message: Some(api::sidecar_message::Message::CertificateRequest(request)),
                };
                if tx.send(message).await.is_err() {
                    break;
                }
            }
        }
        Ok(got)
    }

    /// A CSR for this sidecar's identity, once the trust domain is known.
    fn certificate_request(&mut self) -> Option<api::CertificateRequest> {
        let spec = &self.options.spec;
        match self.identity.request(&spec.namespace, &spec.service) {
            Ok(request) => request,
            Err(error) => {
                tracing::error!(%error, "cannot make a certificate request");
                None
            }
        }
    }

    /// Fetches what is missing, builds and publishes a snapshot. Modules
    /// come over `client`; a sidecar that joined on this stream opens
    /// another connection presenting its new certificate for them (its
    /// token is used up).
    async fn take(
        &mut self,
        client: &mut DiscoveryClient<Channel>,
        with_certificate: &mut bool,
        snapshot: api::Snapshot,
    ) -> Result<(), Refusal> {
        // The identity first: the configuration may need it for its TLS.
        self.identity
            .take(&snapshot, &self.cache)
            .map_err(|e| Refusal::new("certificate", e.to_string()))?;
        for plugin in &snapshot.plugins {
            if self.cache.has_module(&plugin.sha256) {
                continue;
            }
            if self.joins() && !*with_certificate {
                let certificate = self.credential_certificate().ok_or_else(|| {
                    Refusal::new(
                        "module_fetch",
                        "modules are fetched with the workload certificate, and none is installed yet",
                    )
                })?;
                let channel = self
                    .connect(Some(&certificate))
                    .await
                    .map_err(|s| Refusal::new("module_fetch", s.message()))?;
                *client = discovery_client(channel);
                *with_certificate = true;
            }
            self.fetch_module(client, *with_certificate, &plugin.sha256)
                .await?;
        }
        let config = translate(&snapshot, &self.options.spec, &self.cache)
            .map_err(|reason| Refusal::new("build", reason))?;
        lacewing_config::validate(&config).map_err(|e| Refusal::new("invalid", e.to_string()))?;
        if self.served_config.as_ref() != Some(&config) {
            let publish = self.publish.clone();
            let to_publish = config.clone();
            tokio::task::spawn_blocking(move || publish(to_publish))
                .await
                .map_err(|e| Refusal::new("publish", e.to_string()))?
                .map_err(|reason| Refusal::new("publish", reason))?;
            self.served_config = Some(config);
        }
        self.metrics.version.set(snapshot.version as i64);
        self.metrics.last_update.set(unix_now());
        tracing::info!(
            version = snapshot.version,
            revision = snapshot.revision,
            "snapshot in service"
        );
        self.serving = snapshot;
        Ok(())
    }

    /// Keeps the snapshot being served on disk, for a start while the
    /// control plane is away.
    async fn save_serving(&self) {
        let cache = self.cache.clone();
        let snapshot = self.serving.clone();
        let saved = tokio::task::spawn_blocking(move || cache.save_snapshot(&snapshot)).await;
        match saved {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot keep the snapshot on disk"),
            Err(e) => tracing::warn!(error = %e, "cannot keep the snapshot on disk"),
        }
    }

    async fn fetch_module(
        &self,
        client: &mut DiscoveryClient<Channel>,
        with_certificate: bool,
        sha256: &str,
    ) -> Result<(), Refusal> {
        let request = self
            .authorized(
                api::FetchModuleRequest {
                    sha256: sha256.to_string(),
                },
                with_certificate,
            )
            .map_err(|s| Refusal::new("module_fetch", s.message()))?;
        let fetch_error =
            |s: Status| Refusal::new("module_fetch", format!("module {sha256}: {}", s.message()));
        let mut chunks = client
            .fetch_module(request)
            .await
            .map_err(fetch_error)?
            .into_inner();
        let mut bytes = Vec::new();
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(fetch_error)?;
            if bytes.len() + chunk.data.len() > MAX_MODULE_BYTES {
                return Err(Refusal::new(
                    "module_fetch",
                    format!("module {sha256} is larger than {MAX_MODULE_BYTES} bytes"),
                ));
            }
            bytes.extend_from_slice(&chunk.data);
        }
        self.cache.put_module(sha256, &bytes).map_err(|e| match e {
            CacheError::Mismatch { .. } => Refusal::new("module_verify", e.to_string()),
            CacheError::Io { .. } => Refusal::new("module_cache", e.to_string()),
        })?;
        tracing::info!(sha256, size = bytes.len(), digest = %sha256_hex(&bytes), "module fetched");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_double_from_the_first_step_to_the_cap_with_jitter() {
        let mut backoff = Backoff::default();
        let mut step = FIRST_BACKOFF;
        for _ in 0..12 {
            let wait = backoff.next_wait();
            assert!(
                wait >= step / 2 && wait <= step,
                "{wait:?} outside [{:?}, {step:?}]",
                step / 2
            );
            step = (step * 2).min(MAX_BACKOFF);
        }
        assert_eq!(backoff.step, MAX_BACKOFF);
        let waits: std::collections::HashSet<Duration> =
            (0..20).map(|_| Backoff::default().next_wait()).collect();
        assert!(waits.len() > 1, "jittered: {waits:?}");
    }
}
