//! Snapshot → proxy configuration.
//!
//! - `inbound` listener (the sidecar's inbound address) → cluster `local-app`
//!   (the app), running the plugins whose direction is inbound or both;
//! - `outbound` listener (where the app sends its calls) with one route per
//!   reachable service, matched on `Host`/`:authority` without the port:
//!   `name` for services of the sidecar's namespace, `name.namespace` for all;
//!   a `TrafficSplit` on the service turns its route into weighted clusters;
//!   the plugins whose direction is outbound or both run there;
//! - one cluster per service: `svc.<namespace>.<name>`; a service with no
//!   endpoints yet keeps its route, and its calls get 503 (flag UH); a host
//!   no service has gets 404 (flag NR);
//! - one `outbound-tcp.<namespace>.<name>` TCP listener per `tcp` service the
//!   sidecar was told to expose to its app ([`OutboundTcp`], at the address
//!   given), splicing to that service's cluster; a name that is no `tcp`
//!   service of the snapshot gets a cluster with no endpoints (connections
//!   are closed) so the listener and its port stay;
//! - TLS from `MeshTLS`: the inbound listener, HTTP or TCP, STRICT or
//!   PERMISSIVE (plaintext when DISABLE), and every cluster the snapshot says
//!   to call over mTLS with the service's SPIFFE ID as the expected peer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use lacewing_config::units::{Dur, Size};
use lacewing_config::{
    ClusterConfig, ClusterTls, FailPolicy, LbPolicy, ListenerConfig, ListenerTls, ListenerTlsMode,
    OutlierDetection, PluginConfig, PluginLimits, ProxyConfig, RetryPolicy, RouteConfig,
    RouteMatch, UpstreamProtocol, WeightedCluster,
};
use lacewing_control_api as api;

use crate::cache::Cache;

/// The cluster of the local app.
pub const LOCAL_APP: &str = "local-app";
/// The listener other sidecars reach this one on.
pub const INBOUND: &str = "inbound";
/// The listener the local app sends its calls to.
pub const OUTBOUND: &str = "outbound";

/// The prefix of the listeners of [`OutboundTcp`] services.
pub const OUTBOUND_TCP: &str = "outbound-tcp";

/// A `tcp` service the local app reaches at a local address of its sidecar:
/// `SERVICE[.NAMESPACE]=ADDRESS` (`lacewing proxy --outbound-tcp`). HTTP
/// services share one outbound listener and are told apart by `Host`; a TCP
/// connection names nothing, so each service gets its own address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundTcp {
    pub service: String,
    /// `None`: the sidecar's namespace.
    pub namespace: Option<String>,
    /// Port 0: any free port, kept across generations.
    pub address: SocketAddr,
}

/// Why an `--outbound-tcp` value was refused.
#[derive(Debug, thiserror::Error)]
#[error("{text:?}: {reason} (expected SERVICE[.NAMESPACE]=HOST:PORT)")]
pub struct OutboundTcpError {
    text: String,
    reason: String,
}

impl std::str::FromStr for OutboundTcp {
    type Err = OutboundTcpError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| OutboundTcpError {
            text: text.to_string(),
            reason,
        };
        let (name, address) = text.split_once('=').ok_or_else(|| err("no `=`".into()))?;
        let address: SocketAddr = address
            .parse()
            .map_err(|e| err(format!("address {address:?}: {e}")))?;
        let (service, namespace) = match name.split_once('.') {
            Some((service, namespace)) => (service, Some(namespace)),
            None => (name, None),
        };
        for label in std::iter::once(service).chain(namespace) {
            if !is_dns_label(label) {
                return Err(err(format!(
                    "{label:?} is not a service or namespace name (a DNS label)"
                )));
            }
        }
        Ok(Self {
            service: service.to_string(),
            namespace: namespace.map(str::to_string),
            address,
        })
    }
}

/// 1 to 63 lowercase letters, digits and `-`, not starting or ending with `-`.
fn is_dns_label(text: &str) -> bool {
    (1..=63).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !text.starts_with('-')
        && !text.ends_with('-')
}

impl OutboundTcp {
    /// The service's namespace, `own` (the sidecar's) when not named.
    pub fn namespace<'a>(&'a self, own: &'a str) -> &'a str {
        self.namespace.as_deref().unwrap_or(own)
    }

    /// The name of its listener on a sidecar of namespace `own`.
    pub fn listener(&self, own: &str) -> String {
        format!("{OUTBOUND_TCP}.{}.{}", self.namespace(own), self.service)
    }
}

/// What the sidecar is, from its flags.
#[derive(Debug, Clone)]
pub struct SidecarSpec {
    pub node_id: String,
    pub service: String,
    pub namespace: String,
    pub inbound: SocketAddr,
    pub outbound: SocketAddr,
    pub app: SocketAddr,
    pub admin: Option<SocketAddr>,
    /// 0: one per core.
    pub workers: usize,
    /// The time a caller has to complete the TLS handshake on the inbound
    /// listener (and to send its first byte).
    pub handshake_timeout: Duration,
    /// The `tcp` services the app reaches through this sidecar, each at its
    /// own address (listener names must differ: one entry per service).
    pub outbound_tcp: Vec<OutboundTcp>,
}

fn ms(value: u64) -> Dur {
    Dur(Duration::from_millis(value))
}

fn upstream(protocol: i32) -> UpstreamProtocol {
    match api::Protocol::try_from(protocol) {
        Ok(api::Protocol::H2 | api::Protocol::Grpc) => UpstreamProtocol::H2,
        _ => UpstreamProtocol::Http1,
    }
}

fn is_tcp(protocol: i32) -> bool {
    api::Protocol::try_from(protocol) == Ok(api::Protocol::Tcp)
}

/// The cluster the bootstrap inbound routes to: no endpoints, so a request
/// gets 503 (`UH`) until the first snapshot says what the inbound may serve.
pub const AWAITING_SNAPSHOT: &str = "awaiting-snapshot";

/// The configuration before any snapshot: every listener bound (the hello
/// names their ports), an outbound listener with no services, and an
/// inbound listener that answers 503 rather than reach the app: until the
/// control plane's MeshTLS and authz policy is in place, nothing passes to
/// the app unchecked. (An HTTP inbound; a TCP service's inbound comes with
/// its first snapshot.)
pub fn bootstrap_config(spec: &SidecarSpec) -> ProxyConfig {
    let snapshot = api::Snapshot::default();
    let mut config = build(&snapshot, spec, &|_| String::new());
    config
        .clusters
        .push(ClusterConfig::new(AWAITING_SNAPSHOT, Vec::new()));
    for listener in config.listeners.iter_mut().filter(|l| l.name == INBOUND) {
        for route in &mut listener.routes {
            route.cluster = Some(AWAITING_SNAPSHOT.to_string());
            route.weighted_clusters.clear();
        }
    }
    config
}

/// The configuration for `snapshot`; plugins load their modules from `cache`.
/// Fails if the snapshot names a module the cache lacks.
pub fn translate(
    snapshot: &api::Snapshot,
    spec: &SidecarSpec,
    cache: &Cache,
) -> Result<ProxyConfig, String> {
    for plugin in &snapshot.plugins {
        if !cache.has_module(&plugin.sha256) {
            return Err(format!(
                "plugin {}: module {} is not in the cache",
                plugin.name, plugin.sha256
            ));
        }
    }
    Ok(build(snapshot, spec, &|sha| {
        cache.module_path(sha).display().to_string()
    }))
}

fn build(
    snapshot: &api::Snapshot,
    spec: &SidecarSpec,
    module_path: &dyn Fn(&str) -> String,
) -> ProxyConfig {
    let own = snapshot.own.clone().unwrap_or_default();
    let mut config = ProxyConfig {
        admin: Default::default(),
        workers: spec.workers,
        drain_timeout: lacewing_config::defaults::drain_timeout(),
        access_log: None,
        listeners: Vec::new(),
        clusters: Vec::new(),
        plugins: Vec::new(),
        tls: None,
    };
    config.admin.address = spec.admin;

    let mut local = ClusterConfig::new(LOCAL_APP, vec![spec.app.to_string()]);
    local.protocol = upstream(own.protocol);
    config.clusters.push(local);

    let mut inbound_filters = Vec::new();
    let mut outbound_filters = Vec::new();
    for p in &snapshot.plugins {
        let name = format!("{}.{}", p.namespace, p.name);
        let direction = api::Direction::try_from(p.direction).unwrap_or(api::Direction::Inbound);
        if matches!(direction, api::Direction::Inbound | api::Direction::Both) {
            inbound_filters.push(name.clone());
        }
        if matches!(direction, api::Direction::Outbound | api::Direction::Both) {
            outbound_filters.push(name.clone());
        }
        let mut plugin = PluginConfig::new(name, module_path(&p.sha256));
        plugin.sha256 = Some(p.sha256.clone());
        plugin.root_id = p.root_id.clone();
        plugin.vm_id = p.vm_id.clone();
        if !p.configuration.is_empty() {
            plugin.configuration = Some(serde_json_string(&p.configuration));
        }
        plugin.fail = if p.fail_open {
            FailPolicy::Open
        } else {
            FailPolicy::Closed
        };
        plugin.limits = PluginLimits {
            memory: if p.memory_limit_bytes > 0 {
                Size(p.memory_limit_bytes)
            } else {
                lacewing_config::defaults::plugin_memory()
            },
            callback_timeout: if p.callback_timeout_ms > 0 {
                ms(p.callback_timeout_ms)
            } else {
                lacewing_config::defaults::plugin_callback_timeout()
            },
        };
        config.plugins.push(plugin);
    }

    let mut inbound = if is_tcp(own.protocol) {
        ListenerConfig::tcp(INBOUND, spec.inbound, LOCAL_APP)
    } else {
        let mut route = RouteConfig::to_cluster("app", LOCAL_APP);
        if own.request_timeout_ms > 0 {
            route.timeout = ms(own.request_timeout_ms);
        }
        ListenerConfig::http(INBOUND, spec.inbound, vec![route])
    };
    inbound.filters = inbound_filters;
    // HTTP and TCP alike: TCP connections are spliced once past the handshake.
    inbound.tls = match api::MeshTlsMode::try_from(snapshot.inbound_tls) {
        Ok(api::MeshTlsMode::MeshTlsStrict) => Some(ListenerTlsMode::Strict),
        Ok(api::MeshTlsMode::MeshTlsDisable) => None,
        _ => Some(ListenerTlsMode::Permissive),
    }
    .map(|mode| ListenerTls {
        mode,
        handshake_timeout: Dur(spec.handshake_timeout),
    });
    config.listeners.push(inbound);

    // Clusters of every service: HTTP ones routed below, TCP ones spliced to
    // by the outbound TCP listeners.
    let mut clusters: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut tcp_clusters: BTreeMap<(String, String), String> = BTreeMap::new();
    for s in &snapshot.services {
        let name = format!("svc.{}.{}", s.namespace, s.name);
        let mut cluster = ClusterConfig::new(name.clone(), s.endpoints.clone());
        cluster.protocol = upstream(s.protocol);
        cluster.lb = match api::Lb::try_from(s.lb) {
            Ok(api::Lb::LeastRequest) => LbPolicy::LeastRequest,
            _ => LbPolicy::RoundRobin,
        };
        if s.connect_timeout_ms > 0 {
            cluster.connect_timeout = ms(s.connect_timeout_ms);
        }
        if s.idle_timeout_ms > 0 {
            cluster.idle_timeout = ms(s.idle_timeout_ms);
        }
        cluster.outlier_detection = OutlierDetection {
            consecutive_failures: s.outlier_consecutive_failures,
            base_ejection_time: if s.outlier_base_ejection_ms > 0 {
                ms(s.outlier_base_ejection_ms)
            } else {
                lacewing_config::defaults::base_ejection()
            },
            max_ejection_percent: s.outlier_max_ejection_percent,
        };
        let tls = api::MeshTlsMode::try_from(s.client_tls)
            .is_ok_and(|m| m != api::MeshTlsMode::MeshTlsDisable);
        if tls && !s.spiffe_id.is_empty() {
            cluster.tls = Some(ClusterTls {
                peer: s.spiffe_id.clone(),
            });
        }
        config.clusters.push(cluster);
        let key = (s.namespace.clone(), s.name.clone());
        if is_tcp(s.protocol) {
            tcp_clusters.insert(key, name);
        } else {
            clusters.insert(key, name);
        }
    }

    let mut routes = Vec::new();
    for s in &snapshot.services {
        if is_tcp(s.protocol) {
            continue;
        }
        let split = snapshot
            .splits
            .iter()
            .find(|x| x.service == s.name && x.namespace == s.namespace);
        let weighted: Vec<WeightedCluster> = split
            .map(|x| {
                x.backends
                    .iter()
                    .filter(|b| b.weight > 0)
                    .filter_map(|b| {
                        clusters
                            .get(&(s.namespace.clone(), b.service.clone()))
                            .map(|c| WeightedCluster {
                                cluster: c.clone(),
                                weight: b.weight,
                            })
                    })
                    .collect()
            })
            .unwrap_or_default();
        let direct = clusters.get(&(s.namespace.clone(), s.name.clone()));
        if split.is_some() && weighted.is_empty() || split.is_none() && direct.is_none() {
            continue;
        }
        let mut hosts = vec![format!("{}.{}", s.name, s.namespace)];
        if s.namespace == spec.namespace {
            hosts.insert(0, s.name.clone());
        }
        for host in hosts {
            let mut route = RouteConfig::to_cluster(format!("to.{host}"), "");
            route.cluster = None;
            if split.is_some() {
                route.weighted_clusters = weighted.clone();
            } else {
                route.cluster = direct.cloned();
            }
            route.matches = RouteMatch {
                authority: Some(host),
                ..RouteMatch::default()
            };
            if s.request_timeout_ms > 0 {
                route.timeout = ms(s.request_timeout_ms);
            }
            route.retry = RetryPolicy {
                attempts: s.retry_attempts,
                on_status: s
                    .retry_on_status
                    .iter()
                    .filter_map(|&c| u16::try_from(c).ok())
                    .collect(),
                on_connect_failure: true,
            };
            routes.push(route);
        }
    }
    let mut outbound = ListenerConfig::http(OUTBOUND, spec.outbound, routes);
    outbound.filters = outbound_filters;
    config.listeners.push(outbound);

    // The outbound plugins are HTTP filters: TCP listeners run none.
    for target in &spec.outbound_tcp {
        let listener = target.listener(&spec.namespace);
        let key = (
            target.namespace(&spec.namespace).to_string(),
            target.service.clone(),
        );
        let cluster = match tcp_clusters.get(&key) {
            Some(cluster) => cluster.clone(),
            None => {
                // No such tcp service (yet): the listener keeps its address
                // and closes what it accepts.
                config
                    .clusters
                    .push(ClusterConfig::new(listener.clone(), Vec::new()));
                listener.clone()
            }
        };
        config
            .listeners
            .push(ListenerConfig::tcp(listener, target.address, cluster));
    }
    config
}

/// Configuration bytes as the proxy's plugin `configuration` value: a string
/// is passed to `on_configure` as its bytes.
fn serde_json_string(bytes: &[u8]) -> serde_json::Value {
    serde_json::Value::String(String::from_utf8_lossy(bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SidecarSpec {
        SidecarSpec {
            node_id: "web-1".into(),
            service: "web".into(),
            namespace: "default".into(),
            inbound: "127.0.0.1:15001".parse().unwrap(),
            outbound: "127.0.0.1:15002".parse().unwrap(),
            app: "127.0.0.1:3000".parse().unwrap(),
            admin: None,
            workers: 1,
            handshake_timeout: Duration::from_secs(10),
            outbound_tcp: Vec::new(),
        }
    }

    fn service(name: &str, endpoints: &[&str]) -> api::Service {
        api::Service {
            name: name.into(),
            namespace: "default".into(),
            port: 80,
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            request_timeout_ms: 5000,
            retry_attempts: 1,
            retry_on_status: vec![503],
            ..Default::default()
        }
    }

    #[test]
    fn bootstrap_is_a_valid_config_whose_inbound_does_not_reach_the_app() {
        let config = bootstrap_config(&spec());
        lacewing_config::validate(&config).unwrap();
        assert_eq!(config.listeners.len(), 2);
        // No service yet: the outbound listener has no routes.
        assert!(config.listeners[1].routes.is_empty());
        // No policy yet: the inbound routes to a cluster without endpoints.
        let inbound = &config.listeners[0];
        assert_eq!(inbound.name, INBOUND);
        assert!(!inbound.routes.is_empty());
        for route in &inbound.routes {
            assert_eq!(route.cluster.as_deref(), Some(AWAITING_SNAPSHOT));
        }
        let awaiting = config
            .clusters
            .iter()
            .find(|c| c.name == AWAITING_SNAPSHOT)
            .unwrap();
        assert!(awaiting.endpoints.is_empty());
        // The first snapshot, even an empty one, routes the inbound to the app.
        let first = build(&api::Snapshot::default(), &spec(), &|_| String::new());
        assert_eq!(
            first.listeners[0].routes[0].cluster.as_deref(),
            Some(LOCAL_APP)
        );
    }

    #[test]
    fn services_become_routes_and_splits_weighted_clusters() {
        let snapshot = api::Snapshot {
            version: 3,
            services: vec![
                service("orders", &["127.0.0.1:1"]),
                service("orders-v2", &["127.0.0.1:2"]),
                service("empty", &[]),
            ],
            splits: vec![api::Split {
                service: "orders".into(),
                namespace: "default".into(),
                backends: vec![
                    api::Backend {
                        service: "orders".into(),
                        weight: 90,
                    },
                    api::Backend {
                        service: "orders-v2".into(),
                        weight: 10,
                    },
                ],
            }],
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let config = translate(&snapshot, &spec(), &Cache::open(dir.path()).unwrap()).unwrap();
        lacewing_config::validate(&config).unwrap();
        let outbound = &config.listeners[1];
        let hosts: Vec<_> = outbound
            .routes
            .iter()
            .map(|r| r.matches.authority.clone().unwrap())
            .collect();
        assert_eq!(
            hosts,
            [
                "orders",
                "orders.default",
                "orders-v2",
                "orders-v2.default",
                "empty",
                "empty.default"
            ]
        );
        let empty = config
            .clusters
            .iter()
            .find(|c| c.name == "svc.default.empty")
            .unwrap();
        assert!(empty.endpoints.is_empty());
        let weights: Vec<_> = outbound.routes[0]
            .weighted_clusters
            .iter()
            .map(|w| (w.cluster.as_str(), w.weight))
            .collect();
        assert_eq!(
            weights,
            [("svc.default.orders", 90), ("svc.default.orders-v2", 10)]
        );
        assert_eq!(
            outbound.routes[2].cluster.as_deref(),
            Some("svc.default.orders-v2")
        );
    }

    fn tcp_service(name: &str, endpoints: &[&str], client_tls: api::MeshTlsMode) -> api::Service {
        api::Service {
            protocol: api::Protocol::Tcp as i32,
            client_tls: client_tls as i32,
            spiffe_id: format!("spiffe://lacewing.local/ns/default/sa/{name}"),
            ..service(name, endpoints)
        }
    }

    #[test]
    fn tcp_services_get_a_tls_inbound_and_an_outbound_listener_each() {
        let mut spec = spec();
        spec.outbound_tcp = vec![
            "db=127.0.0.1:15005".parse().unwrap(),
            "cache.other=127.0.0.1:0".parse().unwrap(),
            "legacy=127.0.0.1:15007".parse().unwrap(),
            "missing=127.0.0.1:15008".parse().unwrap(),
        ];
        let mut cache = tcp_service("cache", &["127.0.0.1:3"], api::MeshTlsMode::MeshTlsStrict);
        cache.namespace = "other".into();
        cache.spiffe_id = "spiffe://lacewing.local/ns/other/sa/cache".into();
        let snapshot = api::Snapshot {
            own: Some(api::Service {
                protocol: api::Protocol::Tcp as i32,
                ..service("web", &[])
            }),
            inbound_tls: api::MeshTlsMode::MeshTlsStrict as i32,
            services: vec![
                tcp_service("db", &["127.0.0.1:1"], api::MeshTlsMode::MeshTlsPermissive),
                cache,
                tcp_service("legacy", &["127.0.0.1:2"], api::MeshTlsMode::MeshTlsDisable),
                service("orders", &["127.0.0.1:4"]),
            ],
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let config = translate(&snapshot, &spec, &Cache::open(dir.path()).unwrap()).unwrap();
        lacewing_config::validate(&config).unwrap();

        let inbound = &config.listeners[0];
        assert_eq!(inbound.protocol, lacewing_config::ListenerProtocol::Tcp);
        assert_eq!(
            inbound.tls.as_ref().map(|t| t.mode),
            Some(ListenerTlsMode::Strict)
        );
        // The HTTP outbound listener routes only the HTTP service.
        let hosts: Vec<_> = config.listeners[1]
            .routes
            .iter()
            .map(|r| r.matches.authority.clone().unwrap())
            .collect();
        assert_eq!(hosts, ["orders", "orders.default"]);

        let tcp: Vec<_> = config.listeners[2..]
            .iter()
            .map(|l| {
                let cluster = config.cluster(l.cluster.as_deref().unwrap()).unwrap();
                (
                    l.name.as_str(),
                    l.address.to_string(),
                    cluster.name.as_str(),
                    cluster.endpoints.clone(),
                    cluster.tls.as_ref().map(|t| t.peer.as_str()),
                )
            })
            .collect();
        assert_eq!(
            tcp,
            [
                (
                    "outbound-tcp.default.db",
                    "127.0.0.1:15005".to_string(),
                    "svc.default.db",
                    vec!["127.0.0.1:1".to_string()],
                    Some("spiffe://lacewing.local/ns/default/sa/db"),
                ),
                (
                    "outbound-tcp.other.cache",
                    "127.0.0.1:0".to_string(),
                    "svc.other.cache",
                    vec!["127.0.0.1:3".to_string()],
                    Some("spiffe://lacewing.local/ns/other/sa/cache"),
                ),
                (
                    "outbound-tcp.default.legacy",
                    "127.0.0.1:15007".to_string(),
                    "svc.default.legacy",
                    vec!["127.0.0.1:2".to_string()],
                    None,
                ),
                (
                    "outbound-tcp.default.missing",
                    "127.0.0.1:15008".to_string(),
                    "outbound-tcp.default.missing",
                    vec![],
                    None,
                ),
            ]
        );
        for l in &config.listeners[2..] {
            assert_eq!(l.protocol, lacewing_config::ListenerProtocol::Tcp);
            assert!(l.filters.is_empty() && l.tls.is_none(), "{}", l.name);
        }
        // Before any snapshot the listeners exist already (their ports are bound at start).
        let bootstrap = bootstrap_config(&spec);
        lacewing_config::validate(&bootstrap).unwrap();
        assert_eq!(bootstrap.listeners.len(), 6);
    }

    #[test]
    fn outbound_tcp_values_parse_or_say_what_is_wrong() {
        let parsed: OutboundTcp = "db.shop=127.0.0.1:5432".parse().unwrap();
        assert_eq!(
            parsed,
            OutboundTcp {
                service: "db".into(),
                namespace: Some("shop".into()),
                address: "127.0.0.1:5432".parse().unwrap(),
            }
        );
        assert_eq!(parsed.listener("default"), "outbound-tcp.shop.db");
        let own: OutboundTcp = "db=[::1]:0".parse().unwrap();
        assert_eq!(own.listener("default"), "outbound-tcp.default.db");
        for (text, reason) in [
            ("db", "no `=`"),
            ("db=localhost:5432", "address \"localhost:5432\""),
            (
                "Db=127.0.0.1:1",
                "\"Db\" is not a service or namespace name",
            ),
            ("db.=127.0.0.1:1", "\"\" is not a service or namespace name"),
            (
                "db.a.b=127.0.0.1:1",
                "\"a.b\" is not a service or namespace name",
            ),
        ] {
            let err = text.parse::<OutboundTcp>().unwrap_err().to_string();
            assert!(err.contains(reason), "{text}: {err}");
            assert!(err.contains("SERVICE[.NAMESPACE]=HOST:PORT"), "{err}");
        }
    }

    #[test]
    fn a_missing_module_is_refused() {
        let snapshot = api::Snapshot {
            plugins: vec![api::Plugin {
                name: "p".into(),
                sha256: "00".repeat(32),
                ..Default::default()
            }],
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let err = translate(&snapshot, &spec(), &Cache::open(dir.path()).unwrap()).unwrap_err();
        assert!(err.contains("not in the cache"), "{err}");
    }
}
