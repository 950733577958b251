//! The live configuration, compiled: listeners with their route tables and
//! filter chains, clusters, plugins. Built completely before it is published,
//! so a request sees one whole generation from start to end.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use lacewing_config::{ListenerConfig, ListenerProtocol, ProxyConfig, RouteConfig};
use lacewing_core::filter::{HttpFilterFactory, NetworkFilterFactory};
use lacewing_core::metrics::{Metrics, status_class};
use lacewing_upstream::{Cluster, RequestPolicy, Resolver, Upstreams};
use lacewing_wasm::{WasmHost, WasmPlugin};
use prometheus::{Histogram, IntCounter};
use rand::Rng;

use crate::access_log::AccessLog;
use crate::http::tls::DownstreamTls;
use crate::router::{RouteError, RouteTable};
use lacewing_tls::LiveIdentity;

/// Why a configuration could not be made live.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error("{0}")]
    Upstream(String),
    /// `reason` already names the plugin.
    #[error("{reason}")]
    Plugin { name: String, reason: String },
    #[error("{0}")]
    Reference(String),
    #[error("access log: {0}")]
    AccessLog(String),
}

/// Counters of one (route, cluster) pair, resolved once.
#[derive(Debug)]
pub struct TargetStats {
    by_class: [IntCounter; 5],
    pub duration: Histogram,
}

impl TargetStats {
    fn new(metrics: &Metrics, listener: &str, route: &str, cluster: &str) -> Self {
        let class = |c| {
            metrics
                .requests
                .with_label_values(&[listener, route, cluster, c])
        };
        Self {
            by_class: [
                class("1xx"),
                class("2xx"),
                class("3xx"),
                class("4xx"),
                class("5xx"),
            ],
            duration: metrics
                .request_duration
                .with_label_values(&[listener, route, cluster]),
        }
    }

    /// Counts a response of that status.
    pub fn count(&self, status: u16) {
        let i = match status_class(status) {
            "1xx" => 0,
            "2xx" => 1,
            "3xx" => 2,
            "4xx" => 3,
            _ => 4,
        };
        self.by_class[i].inc();
    }
}

/// A cluster as seen from one route.
#[derive(Debug)]
pub struct Target {
    pub cluster: Arc<Cluster>,
    pub cluster_name: Arc<str>,
    pub stats: TargetStats,
}

/// A compiled route.
pub struct RouteState {
    pub name: Arc<str>,
    targets: Vec<Target>,
    /// Cumulative weights, same length as `targets` (empty for a single target).
    cumulative: Vec<u32>,
    pub policy: RequestPolicy,
    /// Listener filters then route filters, in order.
    pub filters: Vec<Arc<dyn HttpFilterFactory>>,
}

impl std::fmt::Debug for RouteState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteState")
            .field("name", &self.name)
            .field("targets", &self.targets.len())
            .field("filters", &self.filters.len())
            .finish()
    }
}

impl RouteState {
    /// The route's clusters, in configuration order.
    pub fn targets(&self) -> &[Target] {
        &self.targets
    }

    /// Picks the cluster for one request (by weight when split).
    pub fn pick(&self) -> &Target {
        if self.cumulative.is_empty() {
            return &self.targets[0];
        }
        let total = *self.cumulative.last().unwrap_or(&1);
        let roll = rand::rng().random_range(0..total.max(1));
        let i = self.cumulative.partition_point(|&c| c <= roll);
        &self.targets[i.min(self.targets.len() - 1)]
    }
}

/// Counters of one listener, resolved once.
#[derive(Debug)]
pub struct ListenerStats {
    pub no_route: IntCounter,
    pub connections_active: prometheus::IntGauge,
    pub connections_total: IntCounter,
    pub bytes_received: IntCounter,
    pub bytes_sent: IntCounter,
    pub metrics: Metrics,
    pub name: Arc<str>,
}

impl ListenerStats {
    fn new(metrics: &Metrics, name: &str) -> Self {
        Self {
            no_route: metrics.local_replies.with_label_values(&[name, "NR"]),
            connections_active: metrics
                .downstream_connections_active
                .with_label_values(&[name]),
            connections_total: metrics
                .downstream_connections_total
                .with_label_values(&[name]),
            bytes_received: metrics.downstream_bytes_received.with_label_values(&[name]),
            bytes_sent: metrics.downstream_bytes_sent.with_label_values(&[name]),
            metrics: metrics.clone(),
            name: name.into(),
        }
    }

    /// Counts a reply the proxy generated itself.
    pub fn local_reply(&self, flag: &str) {
        self.metrics
            .local_replies
            .with_label_values(&[&self.name, flag])
            .inc();
    }
}

/// An HTTP listener's compiled state.
#[derive(Debug)]
pub struct HttpListenerState {
    pub config: ListenerConfig,
    pub routes: RouteTable<RouteState>,
    pub stats: ListenerStats,
    pub access_log: Option<AccessLog>,
    /// Mutual TLS, when the listener has it; read per accepted connection,
    /// so a new generation changes the mode of the next connections.
    pub tls: Option<Arc<DownstreamTls>>,
}

/// A TCP listener's compiled state.
pub struct TcpListenerState {
    pub config: ListenerConfig,
    pub cluster: Arc<Cluster>,
    pub filters: Vec<Arc<dyn NetworkFilterFactory>>,
    pub stats: ListenerStats,
    pub access_log: Option<AccessLog>,
}

impl std::fmt::Debug for TcpListenerState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpListenerState")
            .field("name", &self.config.name)
            .finish()
    }
}

/// One listener's live state, swappable on reload.
#[derive(Debug, Clone)]
pub enum ListenerSlot {
    Http(Arc<ArcSwap<HttpListenerState>>),
    Tcp(Arc<ArcSwap<TcpListenerState>>),
}

impl ListenerSlot {
    /// The live state's connection limit (per worker).
    pub fn max_connections(&self) -> usize {
        match self {
            ListenerSlot::Http(s) => s.load().config.limits.max_connections,
            ListenerSlot::Tcp(s) => s.load().config.limits.max_connections,
        }
    }

    /// The backoff state for this listener's accept loop, counting failures
    /// on the listener's `accept_failures_total`.
    pub fn accept_backoff(&self) -> crate::accept::AcceptBackoff {
        let stats = match self {
            ListenerSlot::Http(s) => &s.load().stats,
            ListenerSlot::Tcp(s) => &s.load().stats,
        };
        let failures = stats
            .metrics
            .accept_failures
            .with_label_values(&[&stats.name]);
        crate::accept::AcceptBackoff::new(&stats.name, failures)
    }
}

/// A whole compiled configuration.
pub struct Snapshot {
    pub config: Arc<ProxyConfig>,
    pub upstreams: Arc<Upstreams>,
    pub plugins: HashMap<String, Arc<WasmPlugin>>,
    pub http: HashMap<String, Arc<HttpListenerState>>,
    pub tcp: HashMap<String, Arc<TcpListenerState>>,
}

impl Snapshot {
    /// Compiles a validated configuration: clusters, plugins (each loaded and
    /// configured in a VM), listeners and routes.
    ///
    /// With the `previous` generation, unchanged clusters and plugins are
    /// taken over from it with their state (see [`Upstreams::build`] and
    /// [`WasmHost::reload_plugin`]). Plugins call out through `callouts`.
    /// Host names are answered from `resolver` (see [`Upstreams::build`]).
    /// Listeners and clusters with `tls` present `identity`.
    pub fn build(
        config: Arc<ProxyConfig>,
        metrics: &Metrics,
        wasm: &Arc<WasmHost>,
        previous: Option<&Snapshot>,
        callouts: Arc<dyn lacewing_core::callout::Upstreams>,
        resolver: Option<&Resolver>,
        identity: Option<&Arc<LiveIdentity>>,
    ) -> Result<Self, BuildError> {
        let upstreams = Upstreams::build(
            &config.clusters,
            metrics,
            previous.map(|p| &*p.upstreams),
            resolver,
            identity,
        )
        .map_err(|e| BuildError::Upstream(e.to_string()))?;
        let mut plugins = HashMap::new();
        for p in &config.plugins {
            let old = previous.and_then(|s| s.plugins.get(&p.name));
            let plugin =
                wasm.reload_plugin(p, callouts.clone(), old)
                    .map_err(|e| BuildError::Plugin {
                        name: p.name.clone(),
                        reason: e.to_string(),
                    })?;
            plugins.insert(p.name.clone(), plugin);
        }
        let access_log = config
            .access_log
            .as_ref()
            .map(|c| AccessLog::open(c, metrics))
            .transpose()
            .map_err(|e| BuildError::AccessLog(e.to_string()))?;
        let mut http = HashMap::new();
        let mut tcp = HashMap::new();
        for l in &config.listeners {
            let stats = ListenerStats::new(metrics, &l.name);
            match l.protocol {
                ListenerProtocol::Http => {
                    let routes = RouteTable::new(&l.routes, |r| {
                        build_route(l, r, &upstreams, &plugins, metrics)
                    })?;
                    let tls = match (&l.tls, identity) {
                        (None, _) => None,
                        (Some(tls), Some(identity)) => Some(Arc::new(DownstreamTls::new(
                            &l.name,
                            identity.clone(),
                            tls.mode,
                            tls.handshake_timeout.0,
                            metrics,
                        ))),
                        (Some(_), None) => {
                            return Err(BuildError::Reference(format!(
                                "listener `{}`: tls needs a mesh identity (given by the control plane)",
                                l.name
                            )));
                        }
                    };
                    http.insert(
                        l.name.clone(),
                        Arc::new(HttpListenerState {
                            config: l.clone(),
                            routes,
                            stats,
                            access_log: access_log.clone(),
                            tls,
                        }),
                    );
                }
                ListenerProtocol::Tcp => {
                    let name = l.cluster.as_deref().unwrap_or_default();
                    let cluster = upstreams.cluster(name).cloned().ok_or_else(|| {
                        BuildError::Reference(format!(
                            "listener `{}`: unknown cluster `{name}`",
                            l.name
                        ))
                    })?;
                    let filters = l
                        .filters
                        .iter()
                        .map(|f| {
                            plugin(&plugins, &l.name, f).map(|p| p as Arc<dyn NetworkFilterFactory>)
                        })
                        .collect::<Result<_, _>>()?;
                    tcp.insert(
                        l.name.clone(),
                        Arc::new(TcpListenerState {
                            config: l.clone(),
                            cluster,
                            filters,
                            stats,
                            access_log: access_log.clone(),
                        }),
                    );
                }
            }
        }
        Ok(Self {
            config,
            upstreams,
            plugins,
            http,
            tcp,
        })
    }
}

fn plugin(
    plugins: &HashMap<String, Arc<WasmPlugin>>,
    owner: &str,
    name: &str,
) -> Result<Arc<WasmPlugin>, BuildError> {
    plugins
        .get(name)
        .cloned()
        .ok_or_else(|| BuildError::Reference(format!("`{owner}`: unknown plugin `{name}`")))
}

fn build_route(
    listener: &ListenerConfig,
    route: &RouteConfig,
    upstreams: &Upstreams,
    plugins: &HashMap<String, Arc<WasmPlugin>>,
    metrics: &Metrics,
) -> Result<RouteState, BuildError> {
    let mut targets = Vec::new();
    let mut cumulative = Vec::new();
    let mut add = |name: &str| -> Result<(), BuildError> {
        let cluster = upstreams.cluster(name).cloned().ok_or_else(|| {
            BuildError::Reference(format!("route `{}`: unknown cluster `{name}`", route.name))
        })?;
        targets.push(Target {
            cluster,
            cluster_name: name.into(),
            stats: TargetStats::new(metrics, &listener.name, &route.name, name),
        });
        Ok(())
    };
    if let Some(c) = &route.cluster {
        add(c)?;
    } else {
        let mut sum = 0u32;
        for w in &route.weighted_clusters {
            add(&w.cluster)?;
            sum = sum.saturating_add(w.weight);
            cumulative.push(sum);
        }
    }
    if targets.is_empty() {
        return Err(BuildError::Reference(format!(
            "route `{}` has no cluster",
            route.name
        )));
    }
    let filters = listener
        .filters
        .iter()
        .chain(&route.filters)
        .map(|f| plugin(plugins, &route.name, f).map(|p| p as Arc<dyn HttpFilterFactory>))
        .collect::<Result<_, _>>()?;
    Ok(RouteState {
        name: route.name.as_str().into(),
        targets,
        cumulative,
        policy: RequestPolicy {
            timeout: route.timeout.0,
            retry_attempts: route.retry.attempts,
            retry_on_status: route.retry.on_status.clone(),
            retry_on_connect_failure: route.retry.on_connect_failure,
        },
        filters,
    })
}
