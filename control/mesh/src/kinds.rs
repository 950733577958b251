//! The `spec` of each kind, as operators write it (camelCase, as Kubernetes
//! resources are). SMI kinds follow the SMI specification's own schema.

use std::collections::BTreeMap;

use lacewing_config::units::{Dur, Size};
use serde::{Deserialize, Serialize};

/// `Service` (`lacewing.dev/v1alpha1`): a service of the mesh. Its endpoints
/// are the inbound addresses of the sidecars registered for it, plus `endpoints`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ServiceSpec {
    /// The port clients write in `Host` (`orders:8080`); routing also accepts the bare name.
    pub port: u32,
    #[serde(default)]
    pub protocol: Protocol,
    /// Static `host:port` endpoints, for instances without a sidecar.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<String>,
    #[serde(default)]
    pub timeouts: Timeouts,
    #[serde(default)]
    pub retries: Retries,
    #[serde(default)]
    pub lb: Lb,
    #[serde(default)]
    pub outlier: Outlier,
}

/// What a service speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Http,
    H2,
    Grpc,
    Tcp,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Timeouts {
    /// Whole exchange up to the response head.
    #[serde(default = "defaults::request")]
    pub request: Dur,
    #[serde(default = "defaults::connect")]
    pub connect: Dur,
    /// Idle pooled connections are closed after this.
    #[serde(default = "defaults::idle")]
    pub idle: Dur,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            request: defaults::request(),
            connect: defaults::connect(),
            idle: defaults::idle(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Retries {
    /// Extra attempts after the first.
    #[serde(default = "defaults::attempts")]
    pub attempts: u32,
    /// Statuses retried (requests without a body).
    #[serde(default = "defaults::on_status")]
    pub on_status: Vec<u16>,
}

impl Default for Retries {
    fn default() -> Self {
        Self {
            attempts: defaults::attempts(),
            on_status: defaults::on_status(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lb {
    #[default]
    RoundRobin,
    LeastRequest,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Outlier {
    /// Consecutive failures that eject an endpoint; 0 turns ejection off.
    #[serde(default = "defaults::consecutive_failures")]
    pub consecutive_failures: u32,
    #[serde(default = "defaults::base_ejection_time")]
    pub base_ejection_time: Dur,
    #[serde(default = "defaults::max_ejection_percent")]
    pub max_ejection_percent: u32,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: defaults::consecutive_failures(),
            base_ejection_time: defaults::base_ejection_time(),
            max_ejection_percent: defaults::max_ejection_percent(),
        }
    }
}

/// `WasmPlugin` (`lacewing.dev/v1alpha1`): a proxy-wasm module run by the
/// sidecars of the selected service (all sidecars without a selector).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WasmPluginSpec {
    /// A file path (`apply` uploads it and stores `sha256:<hex>`),
    /// `sha256:<hex>` of an uploaded module, or `builtin:<name>` for a
    /// first-party filter the control plane ships (`authz`, `telemetry`,
    /// `headers`, `ratelimit`, `seal`).
    pub module: String,
    /// Expected sha256 (hex) of the module; apply refuses a module that differs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<Selector>,
    #[serde(default)]
    pub direction: Direction,
    #[serde(default)]
    pub phase: Phase,
    /// Within a phase, higher runs first.
    #[serde(default)]
    pub priority: i32,
    #[serde(default)]
    pub fail: Fail,
    /// Handed to `on_configure`: a string as is, any other value as JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub configuration: Option<serde_json::Value>,
    #[serde(default, alias = "root_id", skip_serializing_if = "String::is_empty")]
    pub root_id: String,
    #[serde(default, alias = "vm_id", skip_serializing_if = "String::is_empty")]
    pub vm_id: String,
    #[serde(default)]
    pub limits: PluginLimits,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    pub service: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    #[default]
    Inbound,
    Outbound,
    Both,
}

/// Where in the chain a plugin runs: authn, then authz, then stats, then none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Authn,
    Authz,
    Stats,
    #[default]
    None,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Authn => "authn",
            Phase::Authz => "authz",
            Phase::Stats => "stats",
            Phase::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fail {
    #[default]
    Closed,
    Open,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PluginLimits {
    #[serde(default = "defaults::memory")]
    pub memory: Size,
    #[serde(default = "defaults::callback_timeout")]
    pub callback_timeout: Dur,
}

impl Default for PluginLimits {
    fn default() -> Self {
        Self {
            memory: defaults::memory(),
            callback_timeout: defaults::callback_timeout(),
        }
    }
}

/// `MeshTLS` (`lacewing.dev/v1alpha1`): whether traffic to `destination` must be mTLS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshTlsSpec {
    pub destination: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<String>,
    pub mode: TlsMode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum TlsMode {
    Strict,
    Permissive,
    Disable,
}

/// SMI `TrafficSplit` (`split.smi-spec.io/v1alpha4`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficSplitSpec {
    /// The root service clients call.
    pub service: String,
    pub backends: Vec<SplitBackend>,
    /// HTTPRouteGroups the split applies to (stored; not enforced yet).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<TypedRef>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitBackend {
    pub service: String,
    pub weight: u32,
}

/// A reference to another resource: `{kind, name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TypedRef {
    pub kind: String,
    pub name: String,
}

/// SMI `TrafficTarget` (`access.smi-spec.io/v1alpha3`): who may call a
/// destination, through which routes. The control plane turns the targets of
/// a destination into the configuration of the `authz` filter on its inbound
/// listener.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrafficTargetSpec {
    pub destination: Subject,
    #[serde(default)]
    pub sources: Vec<Subject>,
    #[serde(default)]
    pub rules: Vec<TargetRule>,
}

/// An SMI identity: `kind: ServiceAccount`, whose name is a Lacewing service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Subject {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRule {
    pub kind: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<String>,
}

/// SMI `HTTPRouteGroup` (`specs.smi-spec.io/v1alpha4`): named request
/// matches that TrafficTargets refer to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpRouteGroupSpec {
    #[serde(default)]
    pub matches: Vec<HttpMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HttpMatch {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_regex: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Header name to a regex its whole value must match. Written as a map
    /// or, as many SMI files do, as a list of one-entry maps.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "header_matches"
    )]
    pub headers: BTreeMap<String, String>,
}

/// `headers` as `{name: regex, …}` or `[{name: regex}, …]`.
fn header_matches<'de, D>(d: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Map(BTreeMap<String, String>),
        List(Vec<BTreeMap<String, String>>),
    }
    match Written::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "expected a map of header name to regex, or a list of one-entry maps",
        )
    })? {
        Written::Map(map) => Ok(map),
        Written::List(list) => {
            let mut map = BTreeMap::new();
            for entry in list {
                for (name, re) in entry {
                    if map.insert(name.clone(), re).is_some() {
                        return Err(serde::de::Error::custom(format!(
                            "header `{name}` listed twice"
                        )));
                    }
                }
            }
            Ok(map)
        }
    }
}

/// `MeshConfig` (`lacewing.dev/v1alpha1`): settings for every sidecar of its
/// namespace (at most one per namespace).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshConfigSpec {
    #[serde(default)]
    pub telemetry: TelemetrySettings,
}

/// The first-party `telemetry` filter, which runs on every sidecar's
/// inbound and outbound listeners unless turned off here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct TelemetrySettings {
    #[serde(default = "defaults::yes")]
    pub enabled: bool,
    /// One JSON access-log line per request.
    #[serde(default = "defaults::yes")]
    pub access_log: bool,
    /// W3C `traceparent` propagation.
    #[serde(default = "defaults::yes")]
    pub trace: bool,
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            enabled: true,
            access_log: true,
            trace: true,
        }
    }
}

/// Defaults, shared with the docs.
pub mod defaults {
    use std::time::Duration;

    use super::{Dur, Size};

    pub fn request() -> Dur {
        Dur(Duration::from_secs(15))
    }
    pub fn connect() -> Dur {
        Dur(Duration::from_secs(1))
    }
    pub fn idle() -> Dur {
        Dur(Duration::from_secs(60))
    }
    pub fn attempts() -> u32 {
        2
    }
    pub fn on_status() -> Vec<u16> {
        vec![503]
    }
    pub fn consecutive_failures() -> u32 {
        5
    }
    pub fn base_ejection_time() -> Dur {
        Dur(Duration::from_secs(30))
    }
    pub fn max_ejection_percent() -> u32 {
        50
    }
    pub fn memory() -> Size {
        Size(64 * 1024 * 1024)
    }
    pub fn callback_timeout() -> Dur {
        Dur(Duration::from_millis(100))
    }
    pub fn yes() -> bool {
        true
    }
}
