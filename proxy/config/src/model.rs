//! The configuration model: what a YAML config file (and `/config_dump`) contains.
//!
//! Every field has a sane default so a minimal file is a listener, a route and a
//! cluster. Names are the ones operators write; see `docs/config.md`.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize, de};

use crate::units::{Dur, Size};

/// A whole proxy configuration.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// The admin listener (`/metrics`, `/ready`, `/config_dump`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// Worker threads; 0 means one per core.
    #[serde(default)]
    pub workers: usize,
    /// How long in-flight requests may take to finish after SIGTERM.
    #[serde(default = "defaults::drain_timeout")]
    pub drain_timeout: Dur,
    /// Access log; off when absent.
    #[serde(default)]
    pub access_log: Option<AccessLogConfig>,
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub clusters: Vec<ClusterConfig>,
    /// proxy-wasm plugins that listeners and routes name in their `filters`.
    #[serde(default)]
    pub plugins: Vec<PluginConfig>,
    /// The proxy's own identity from files, for listeners and clusters with
    /// `tls` when no control plane gives one (a standalone proxy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<IdentityFilesConfig>,
}

/// Where a standalone proxy reads its identity: PEM files, read again on
/// every reload so they can be replaced while the proxy runs. Paths are
/// relative to the working directory.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct IdentityFilesConfig {
    /// The certificate chain, leaf first; the leaf carries a SPIFFE ID as URI SAN.
    pub cert_file: std::path::PathBuf,
    /// The leaf's private key (PKCS#8, SEC1 or PKCS#1).
    pub key_file: std::path::PathBuf,
    /// Root certificate(s) that peers' chains must lead to.
    pub trust_file: std::path::PathBuf,
}

/// The admin endpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Where it listens; loopback by default. `null` turns it off.
    #[serde(default = "defaults::admin_address")]
    pub address: Option<SocketAddr>,
    /// A non-loopback `address` is refused unless this is true: the admin
    /// endpoint has no authentication.
    #[serde(default)]
    pub allow_remote: bool,
    /// `/config_dump` shows plugin `configuration`, `vm_configuration` and
    /// `env` values only when this is true; otherwise they read `"[redacted]"`.
    #[serde(default)]
    pub expose_secrets: bool,
    /// An admin connection that has not sent a whole request head within this is closed.
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: Dur,
}

impl AdminConfig {
    /// The admin endpoint at `address`, with every other setting at its default.
    pub fn at(address: Option<SocketAddr>) -> Self {
        Self {
            address,
            ..Self::default()
        }
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            address: defaults::admin_address(),
            allow_remote: false,
            expose_secrets: false,
            header_read_timeout: defaults::header_read_timeout(),
        }
    }
}

/// Where and how access log lines are written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// `stdout`, `stderr`, or a file path.
    #[serde(default = "defaults::access_log_path")]
    pub path: String,
}

/// One listening socket.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub name: String,
    pub address: SocketAddr,
    #[serde(default)]
    pub protocol: ListenerProtocol,
    /// HTTP listeners: routes, tried in order; the first match wins.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// TCP listeners: the cluster every connection goes to.
    #[serde(default)]
    pub cluster: Option<String>,
    /// Plugins run on every request (HTTP) or connection (TCP), before route filters.
    #[serde(default)]
    pub filters: Vec<String>,
    #[serde(default)]
    pub limits: ListenerLimits,
    /// Mutual TLS with the proxy's identity; plaintext when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ListenerTls>,
}

/// A listener's mutual TLS: the proxy presents its identity (the mesh's, or
/// the top-level `tls` files') and asks every TLS client for a certificate
/// chaining to the trust bundle.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    pub mode: ListenerTlsMode,
    /// Time allowed for the first bytes and the handshake.
    #[serde(default = "defaults::tls_handshake_timeout")]
    pub handshake_timeout: Dur,
}

/// Whether a TLS listener also serves plaintext.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTlsMode {
    /// TLS only: a plaintext connection is closed.
    Strict,
    /// TLS, or plaintext when the first byte is not a TLS handshake record.
    Permissive,
}

/// A cluster's mutual TLS: the proxy presents its identity and accepts
/// only a server whose certificate carries `peer` as its URI SAN.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`.
    pub peer: String,
}

/// What a listener speaks.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum ListenerProtocol {
    /// HTTP/1.1, and HTTP/2 with prior knowledge (h2c), detected per connection.
    #[default]
    Http,
    /// Raw TCP, proxied byte for byte.
    Tcp,
}

/// The smallest `limits.max_request_headers` the proxy can honour: HTTP/1.1
/// heads are bounded by the connection's read buffer, which cannot be smaller.
pub const MIN_REQUEST_HEADERS: u64 = 8 * 1024;

/// Per-listener protections.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ListenerLimits {
    /// Largest request head (request line plus headers); larger gets 431.
    /// At least [`MIN_REQUEST_HEADERS`].
    #[serde(default = "defaults::max_request_headers")]
    pub max_request_headers: Size,
    /// Most header fields in an HTTP/1.1 request.
    #[serde(default = "defaults::max_header_count")]
    pub max_header_count: usize,
    /// Time allowed for a request head: from accept for the first request
    /// (HTTP/1.1 head, or HTTP/2 preface, SETTINGS and first HEADERS), and for
    /// each later HTTP/1.1 head from its first byte (slowloris guard).
    #[serde(default = "defaults::header_read_timeout")]
    pub header_read_timeout: Dur,
    /// Connections that move no byte for between one and two of these are closed.
    #[serde(default = "defaults::downstream_idle_timeout")]
    pub idle_timeout: Dur,
    /// Most bytes a filter may make the proxy buffer per body; beyond, 413.
    #[serde(default = "defaults::max_buffered_body")]
    pub max_buffered_body: Size,
    /// Most concurrent connections per worker.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Longest an upstream response body may go without a byte once its head
    /// has come; then the exchange is cut (flag `UT`).
    #[serde(default = "defaults::upstream_body_timeout")]
    pub upstream_body_timeout: Dur,
    /// Longest a connection with response data to send may go without the
    /// client taking any (it does not read, or opens no HTTP/2 window); then
    /// the connection is closed (flag `SI` on the exchanges it cuts).
    #[serde(default = "defaults::write_timeout")]
    pub write_timeout: Dur,
    /// Most concurrent HTTP/2 streams per connection
    /// (`SETTINGS_MAX_CONCURRENT_STREAMS`).
    #[serde(default = "defaults::max_concurrent_streams")]
    pub max_concurrent_streams: u32,
    /// Largest share, from 0 (exclusive) to 1, of a cluster's connections
    /// (HTTP/1.1 upstreams: the smaller of `max_connections` and
    /// `max_pending_requests`; HTTP/2: `max_requests`) that the exchanges of
    /// one downstream connection may hold at once, at least one; beyond,
    /// 503 (flag `UO`).
    #[serde(default = "defaults::max_upstream_share")]
    pub max_upstream_share: f64,
    /// When set, a connection open this long is closed gracefully (HTTP/1.1
    /// after its request in flight, HTTP/2 with GOAWAY). Off by default.
    #[serde(default)]
    pub max_connection_duration: Option<Dur>,
    /// When set, an exchange whose upstream response body is still streaming
    /// this long after its request came is cut (flag `UT`). Off by default.
    #[serde(default)]
    pub max_stream_duration: Option<Dur>,
    /// Longest an exchange may go with no progress either way (no request
    /// body byte from the client, no response head or body byte from the
    /// upstream): before the response head it gets 408 (flag `SI`), after it
    /// the stream is cut. `0s` turns it off.
    #[serde(default = "defaults::stream_idle_timeout")]
    pub stream_idle_timeout: Dur,
    /// Most bytes one HTTP/2 connection may make the proxy hold for it:
    /// its receive window (request body bytes the client may send ahead of
    /// the proxy), and the response bytes queued for its streams, shared
    /// among `max_concurrent_streams` (at least 16 KiB a stream). From
    /// [`MIN_CONNECTION_BUFFER`] to [`MAX_CONNECTION_BUFFER`].
    #[serde(default = "defaults::max_connection_buffer")]
    pub max_connection_buffer: Size,
}

/// The smallest `limits.max_connection_buffer`: HTTP/2's initial window.
pub const MIN_CONNECTION_BUFFER: u64 = 65_535;
/// The largest `limits.max_connection_buffer`: HTTP/2's largest window.
pub const MAX_CONNECTION_BUFFER: u64 = (1 << 31) - 1;

impl Default for ListenerLimits {
    fn default() -> Self {
        Self {
            max_request_headers: defaults::max_request_headers(),
            max_header_count: defaults::max_header_count(),
            header_read_timeout: defaults::header_read_timeout(),
            idle_timeout: defaults::downstream_idle_timeout(),
            max_buffered_body: defaults::max_buffered_body(),
            max_connections: defaults::max_connections(),
            upstream_body_timeout: defaults::upstream_body_timeout(),
            write_timeout: defaults::write_timeout(),
            max_concurrent_streams: defaults::max_concurrent_streams(),
            max_upstream_share: defaults::max_upstream_share(),
            max_connection_duration: None,
            max_stream_duration: None,
            stream_idle_timeout: defaults::stream_idle_timeout(),
            max_connection_buffer: defaults::max_connection_buffer(),
        }
    }
}

/// A route: a match and where matching requests go.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub name: String,
    #[serde(default, rename = "match")]
    pub matches: RouteMatch,
    /// One cluster...
    #[serde(default)]
    pub cluster: Option<String>,
    /// ...or several, by weight (the base of TrafficSplit).
    #[serde(default)]
    pub weighted_clusters: Vec<WeightedCluster>,
    /// Time for the whole upstream exchange up to the response head; 504 after.
    #[serde(default = "defaults::route_timeout")]
    pub timeout: Dur,
    #[serde(default)]
    pub retry: RetryPolicy,
    /// Plugins run for this route after the listener's.
    #[serde(default)]
    pub filters: Vec<String>,
}

/// What a request must look like to take a route. Empty matches everything.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct RouteMatch {
    /// Host without port: exact (`orders`), or a suffix wildcard (`*.example.com`).
    #[serde(default)]
    pub authority: Option<String>,
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// HTTP method, e.g. GET.
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default)]
    pub headers: Vec<HeaderMatch>,
}

/// How the path is matched.
///
/// Written as a one-key mapping: `{ exact: /healthz }`, `{ prefix: /api }`
/// or `{ regex: "^/v[0-9]+/" }` (the `!prefix /api` tag form is accepted too).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(String),
}

/// The key of a [`PathMatch`] mapping.
#[derive(Deserialize)]
#[serde(rename_all = "lowercase")]
enum PathMatchKind {
    Exact,
    Prefix,
    Regex,
}

impl PathMatchKind {
    fn with(self, value: String) -> PathMatch {
        match self {
            PathMatchKind::Exact => PathMatch::Exact(value),
            PathMatchKind::Prefix => PathMatch::Prefix(value),
            PathMatchKind::Regex => PathMatch::Regex(value),
        }
    }
}

struct PathMatchVisitor;

impl<'de> de::Visitor<'de> for PathMatchVisitor {
    type Value = PathMatch;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("one of `exact: /path`, `prefix: /path`, `regex: ^/path`")
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<PathMatch, A::Error> {
        let mut found = None;
        while let Some(kind) = map.next_key::<PathMatchKind>()? {
            let value: String = map.next_value()?;
            if found.is_some() {
                return Err(de::Error::custom(
                    "give only one of `exact`, `prefix`, `regex`",
                ));
            }
            found = Some(kind.with(value));
        }
        found.ok_or_else(|| de::Error::custom("give one of `exact`, `prefix`, `regex`"))
    }

    fn visit_enum<A: de::EnumAccess<'de>>(self, data: A) -> Result<PathMatch, A::Error> {
        use de::VariantAccess;
        let (kind, variant) = data.variant::<PathMatchKind>()?;
        Ok(kind.with(variant.newtype_variant()?))
    }
}

impl<'de> Deserialize<'de> for PathMatch {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PathMatchVisitor)
    }
}

/// A condition on one request header.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    /// `true`: the header must be present; `false`: absent. Ignored when `exact` or `regex` is set.
    #[serde(default)]
    pub present: Option<bool>,
}

/// A share of a route's traffic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedCluster {
    pub cluster: String,
    pub weight: u32,
}

/// When and how often a request is tried again.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryPolicy {
    /// Extra attempts after the first.
    #[serde(default = "defaults::retry_attempts")]
    pub attempts: u32,
    /// Response statuses that are retried (only for requests without a body).
    #[serde(default = "defaults::retry_statuses")]
    pub on_status: Vec<u16>,
    /// Retry when the connection to an endpoint fails (always safe: nothing was sent).
    #[serde(default = "defaults::yes")]
    pub on_connect_failure: bool,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: defaults::retry_attempts(),
            on_status: defaults::retry_statuses(),
            on_connect_failure: true,
        }
    }
}

/// A named group of upstream endpoints.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    pub name: String,
    /// `host:port` of each endpoint; host names are resolved at load.
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    #[serde(default)]
    pub lb: LbPolicy,
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Dur,
    /// Pooled connections idle longer than this are closed.
    #[serde(default = "defaults::upstream_idle_timeout")]
    pub idle_timeout: Dur,
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    #[serde(default)]
    pub retry_budget: RetryBudget,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    /// Mutual TLS to the endpoints; plaintext when absent. A cluster's
    /// connections are pooled per cluster, so TLS and plaintext never mix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<ClusterTls>,
}

/// The protocol spoken to a cluster's endpoints.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    #[default]
    Http1,
    /// HTTP/2 with prior knowledge (gRPC upstreams).
    H2,
}

/// How an endpoint is picked.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    /// Power of two random choices, fewer active requests wins.
    LeastRequest,
}

/// Limits beyond which requests fail fast with 503 (flag UO).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    /// Most open connections to the cluster.
    #[serde(default = "defaults::cb_limit")]
    pub max_connections: usize,
    /// Most requests waiting for a connection.
    #[serde(default = "defaults::cb_limit")]
    pub max_pending_requests: usize,
    /// Most requests in flight.
    #[serde(default = "defaults::cb_limit")]
    pub max_requests: usize,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            max_connections: defaults::cb_limit(),
            max_pending_requests: defaults::cb_limit(),
            max_requests: defaults::cb_limit(),
        }
    }
}

/// Caps retries to a share of active requests so retries cannot amplify an outage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryBudget {
    /// Retries in flight may be at most this share of requests in flight.
    #[serde(default = "defaults::budget_ratio")]
    pub ratio: f64,
    /// Retries always allowed regardless of the ratio.
    #[serde(default = "defaults::budget_min")]
    pub min_concurrent: usize,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self {
            ratio: defaults::budget_ratio(),
            min_concurrent: defaults::budget_min(),
        }
    }
}

/// Passive health: endpoints that keep failing are taken out for a while.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    /// Consecutive connect failures or 5xx that eject an endpoint; 0 turns ejection off.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    /// First ejection time; doubles with each ejection in a row.
    #[serde(default = "defaults::base_ejection")]
    pub base_ejection_time: Dur,
    /// Most endpoints that may be out at once, in percent.
    #[serde(default = "defaults::max_ejection_percent")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            consecutive_failures: defaults::consecutive_failures(),
            base_ejection_time: defaults::base_ejection(),
            max_ejection_percent: defaults::max_ejection_percent(),
        }
    }
}

/// A proxy-wasm plugin.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    pub name: String,
    /// Path of the `.wasm` module.
    pub module: String,
    /// Expected sha256 of the module, hex; the plugin is rejected on mismatch.
    #[serde(default)]
    pub sha256: Option<String>,
    /// Envoy's `root_id`, which some SDKs dispatch on.
    #[serde(default)]
    pub root_id: String,
    /// Plugins with the same non-empty `vm_id` (and module) share one VM.
    #[serde(default)]
    pub vm_id: String,
    /// Bytes handed to the plugin in `on_configure` (a string, or any YAML value, sent as JSON).
    #[serde(default)]
    pub configuration: Option<serde_json::Value>,
    /// Bytes handed to the VM in `on_vm_start`.
    #[serde(default)]
    pub vm_configuration: Option<serde_json::Value>,
    /// What happens to a request when the plugin fails.
    #[serde(default)]
    pub fail: FailPolicy,
    #[serde(default)]
    pub limits: PluginLimits,
    /// Environment variables the module sees through WASI.
    #[serde(default)]
    pub env: std::collections::BTreeMap<String, String>,
    /// Clusters the plugin may call out to; empty means any configured cluster.
    #[serde(default)]
    pub allowed_clusters: Vec<String>,
}

/// What a failing plugin does to the request it was handling.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum FailPolicy {
    /// Answer 503 (HTTP) or close the connection (TCP).
    #[default]
    Closed,
    /// Skip the plugin and carry on.
    Open,
}

/// Sandbox limits of one plugin's VM.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginLimits {
    /// Most linear memory the VM may grow to.
    #[serde(default = "defaults::plugin_memory")]
    pub memory: Size,
    /// Most wall time one callback may run.
    #[serde(default = "defaults::plugin_callback_timeout")]
    pub callback_timeout: Dur,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory: defaults::plugin_memory(),
            callback_timeout: defaults::plugin_callback_timeout(),
        }
    }
}

impl ListenerConfig {
    /// An HTTP listener with default limits and no filters.
    pub fn http(name: impl Into<String>, address: SocketAddr, routes: Vec<RouteConfig>) -> Self {
        Self {
            name: name.into(),
            address,
            protocol: ListenerProtocol::Http,
            routes,
            cluster: None,
            filters: Vec::new(),
            limits: ListenerLimits::default(),
            tls: None,
        }
    }

    /// A TCP listener sending every connection to `cluster`.
    pub fn tcp(name: impl Into<String>, address: SocketAddr, cluster: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            address,
            protocol: ListenerProtocol::Tcp,
            routes: Vec::new(),
            cluster: Some(cluster.into()),
            filters: Vec::new(),
            limits: ListenerLimits::default(),
            tls: None,
        }
    }
}

impl RouteConfig {
    /// A route matching every request and sending it to `cluster`, with default timeout and retries.
    pub fn to_cluster(name: impl Into<String>, cluster: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            matches: RouteMatch::default(),
            cluster: Some(cluster.into()),
            weighted_clusters: Vec::new(),
            timeout: defaults::route_timeout(),
            retry: RetryPolicy::default(),
            filters: Vec::new(),
        }
    }
}

impl ClusterConfig {
    /// A cluster of `endpoints` (`host:port`) with every other field at its default.
    pub fn new(name: impl Into<String>, endpoints: Vec<String>) -> Self {
        Self {
            name: name.into(),
            endpoints,
            protocol: UpstreamProtocol::default(),
            lb: LbPolicy::default(),
            connect_timeout: defaults::connect_timeout(),
            idle_timeout: defaults::upstream_idle_timeout(),
            circuit_breaker: CircuitBreaker::default(),
            retry_budget: RetryBudget::default(),
            outlier_detection: OutlierDetection::default(),
            tls: None,
        }
    }
}

impl PluginConfig {
    /// A plugin loading `module` with every other field at its default.
    pub fn new(name: impl Into<String>, module: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            module: module.into(),
            sha256: None,
            root_id: String::new(),
            vm_id: String::new(),
            configuration: None,
            vm_configuration: None,
            fail: FailPolicy::default(),
            limits: PluginLimits::default(),
            env: Default::default(),
            allowed_clusters: Vec::new(),
        }
    }

    /// The bytes given to the plugin in `proxy_on_configure`: a YAML string as
    /// its raw bytes, any other value as its JSON text, nothing when absent.
    pub fn configuration_bytes(&self) -> Vec<u8> {
        value_bytes(self.configuration.as_ref())
    }

    /// The bytes given to the VM in `proxy_on_vm_start`, by the same rule as
    /// [`PluginConfig::configuration_bytes`].
    pub fn vm_configuration_bytes(&self) -> Vec<u8> {
        value_bytes(self.vm_configuration.as_ref())
    }
}

fn value_bytes(value: Option<&serde_json::Value>) -> Vec<u8> {
    match value {
        None => Vec::new(),
        Some(serde_json::Value::String(text)) => text.as_bytes().to_vec(),
        Some(other) => other.to_string().into_bytes(),
    }
}

impl ProxyConfig {
    /// The effective worker count (`workers`, or the core count when 0).
    pub fn worker_count(&self) -> usize {
        if self.workers > 0 {
            self.workers
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The cluster of that name.
    pub fn cluster(&self, name: &str) -> Option<&ClusterConfig> {
        self.clusters.iter().find(|c| c.name == name)
    }

    /// The plugin of that name.
    pub fn plugin(&self, name: &str) -> Option<&PluginConfig> {
        self.plugins.iter().find(|p| p.name == name)
    }
}

/// Defaults, named so `/config_dump` and the docs agree.
pub mod defaults {
    use super::*;

    pub fn tls_handshake_timeout() -> Dur {
        Dur(Duration::from_secs(10))
    }

    pub fn drain_timeout() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn admin_address() -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], 9901)))
    }
    pub fn access_log_path() -> String {
        "stdout".into()
    }
    pub fn max_request_headers() -> Size {
        Size(60 * 1024)
    }
    pub fn max_header_count() -> usize {
        100
    }
    pub fn header_read_timeout() -> Dur {
        Dur(Duration::from_secs(10))
    }
    pub fn downstream_idle_timeout() -> Dur {
        Dur(Duration::from_secs(300))
    }
    pub fn max_buffered_body() -> Size {
        Size(1024 * 1024)
    }
    pub fn max_connections() -> usize {
        100_000
    }
    pub fn upstream_body_timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn write_timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn max_concurrent_streams() -> u32 {
        1024
    }
    pub fn max_upstream_share() -> f64 {
        0.5
    }
    pub fn stream_idle_timeout() -> Dur {
        Dur(Duration::from_secs(300))
    }
    pub fn max_connection_buffer() -> Size {
        Size(1024 * 1024)
    }
    pub fn route_timeout() -> Dur {
        Dur(Duration::from_secs(15))
    }
    pub fn retry_attempts() -> u32 {
        2
    }
    pub fn retry_statuses() -> Vec<u16> {
        vec![503]
    }
    pub fn yes() -> bool {
        true
    }
    pub fn connect_timeout() -> Dur {
        Dur(Duration::from_secs(1))
    }
    pub fn upstream_idle_timeout() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn cb_limit() -> usize {
        1024
    }
    pub fn budget_ratio() -> f64 {
        0.2
    }
    pub fn budget_min() -> usize {
        3
    }
    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn base_ejection() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn max_ejection_percent() -> u32 {
        50
    }
    pub fn plugin_memory() -> Size {
        Size(64 * 1024 * 1024)
    }
    pub fn plugin_callback_timeout() -> Dur {
        Dur(Duration::from_millis(100))
    }
}
