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
//! - TLS from `MeshTLS`: the inbound listener STRICT or PERMISSIVE (plaintext
//!   when DISABLE), and every cluster the snapshot says to call over mTLS
//!   with the service's SPIFFE ID as the expected peer.

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

/// The configuration before any snapshot: inbound to the app, an outbound
/// listener with no services.
pub fn bootstrap_config(spec: &SidecarSpec) -> ProxyConfig {
    let snapshot = api::Snapshot::default();
    build(&snapshot, spec, &|_| String::new())
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
    if !is_tcp(own.protocol) {
        inbound.tls = match api::MeshTlsMode::try_from(snapshot.inbound_tls) {
            Ok(api::MeshTlsMode::MeshTlsStrict) => Some(ListenerTlsMode::Strict),
            Ok(api::MeshTlsMode::MeshTlsDisable) => None,
            _ => Some(ListenerTlsMode::Permissive),
        }
        .map(|mode| ListenerTls {
            mode,
            handshake_timeout: Dur(spec.handshake_timeout),
        });
    }
    config.listeners.push(inbound);

    // Clusters of every routable service.
    let mut clusters: BTreeMap<(String, String), String> = BTreeMap::new();
    for s in &snapshot.services {
        if is_tcp(s.protocol) {
            continue;
        }
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
        clusters.insert((s.namespace.clone(), s.name.clone()), name);
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
    fn bootstrap_is_a_valid_config() {
        let config = bootstrap_config(&spec());
        lacewing_config::validate(&config).unwrap();
        assert_eq!(config.listeners.len(), 2);
        // No service yet: the outbound listener has no routes.
        assert!(config.listeners[1].routes.is_empty());
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
