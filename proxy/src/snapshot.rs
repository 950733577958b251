//! The live configuration, compiled: listeners with their route tables and
//! filter chains, clusters, plugins. Built completely before it is published,
//! so a request sees one whole generation from start to end.

use std::collections::HashMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use lacewing_config::{
    ListenerConfig, ListenerProtocol, ListenerTlsMode, ProxyConfig, RouteConfig,
};
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
    /// Mutual TLS, when the listener has it; read per accepted connection.
    pub tls: Option<Arc<DownstreamTls>>,
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

/// One listener's state in one generation.
#[derive(Debug, Clone)]
pub enum ListenerState {
    Http(Arc<HttpListenerState>),
    Tcp(Arc<TcpListenerState>),
}

impl ListenerState {
    fn stats(&self) -> &ListenerStats {
        match self {
            ListenerState::Http(s) => &s.stats,
            ListenerState::Tcp(s) => &s.stats,
        }
    }

    /// The listener's mutual TLS, when it has any.
    pub fn tls(&self) -> Option<&Arc<DownstreamTls>> {
        match self {
            ListenerState::Http(s) => s.tls.as_ref(),
            ListenerState::Tcp(s) => s.tls.as_ref(),
        }
    }

    /// Whether the listener refuses plaintext (its TLS is STRICT).
    fn tls_only(&self) -> bool {
        self.tls()
            .is_some_and(|t| t.mode() == ListenerTlsMode::Strict)
    }

    /// The connection limit (per worker).
    pub fn max_connections(&self) -> usize {
        match self {
            ListenerState::Http(s) => s.config.limits.max_connections,
            ListenerState::Tcp(s) => s.config.limits.max_connections,
        }
    }

    /// The backoff state for this listener's accept loop, counting failures
    /// on the listener's `accept_failures_total`.
    pub fn accept_backoff(&self) -> crate::accept::AcceptBackoff {
        let stats = self.stats();
        let failures = stats
            .metrics
            .accept_failures
            .with_label_values(&[&stats.name]);
        crate::accept::AcceptBackoff::new(&stats.name, failures)
    }
}

/// Where a listener's state sits in every generation while the listener is
/// open: an index into [`ListenerTable`], reused once the listener closes,
/// and an id no other listener ever gets, so a connection of a closed
/// listener never finds its successor's state at the same index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerKey {
    pub index: usize,
    pub id: u64,
}

/// Every listener's state in one generation, by [`ListenerKey::index`].
/// One `ArcSwap` holds the live table ([`LiveListeners`]), so one store makes
/// a whole generation visible on every listener at once: a request that
/// loads it after the store sees the new generation whatever its listener.
#[derive(Debug, Default)]
pub struct ListenerTable {
    entries: Vec<Option<(u64, ListenerState)>>,
}

impl ListenerTable {
    /// A table holding each `(key, state)`.
    pub fn new(listeners: impl IntoIterator<Item = (ListenerKey, ListenerState)>) -> Self {
        let mut entries: Vec<Option<(u64, ListenerState)>> = Vec::new();
        for (key, state) in listeners {
            if entries.len() <= key.index {
                entries.resize_with(key.index + 1, || None);
            }
            entries[key.index] = Some((key.id, state));
        }
        Self { entries }
    }

    /// The state of the listener `key`, if it is in this generation.
    pub fn get(&self, key: ListenerKey) -> Option<&ListenerState> {
        match self.entries.get(key.index) {
            Some(Some((id, state))) if *id == key.id => Some(state),
            _ => None,
        }
    }
}

/// The live generation's listeners, shared by the publisher (the only one
/// that stores) and every accept loop and connection (which load). Each
/// store is also announced, for connections that must react to a new
/// generation (a plaintext connection whose listener turned STRICT).
#[derive(Debug, Clone)]
pub struct LiveListeners(Arc<LiveTable>);

#[derive(Debug)]
struct LiveTable {
    table: ArcSwap<ListenerTable>,
    stores: tokio::sync::watch::Sender<u64>,
}

impl Default for LiveListeners {
    fn default() -> Self {
        Self(Arc::new(LiveTable {
            table: ArcSwap::default(),
            stores: tokio::sync::watch::Sender::new(0),
        }))
    }
}

impl LiveListeners {
    /// The live table.
    pub fn load(&self) -> arc_swap::Guard<Arc<ListenerTable>> {
        self.0.table.load()
    }

    /// Makes `table` live and announces it.
    pub fn store(&self, table: Arc<ListenerTable>) {
        self.0.table.store(table);
        self.0.stores.send_modify(|n| *n += 1);
    }

    /// Wakes on each later [`LiveListeners::store`].
    pub fn stores(&self) -> tokio::sync::watch::Receiver<u64> {
        self.0.stores.subscribe()
    }

    /// Completes once the live generation makes the listener `key` TLS only
    /// (STRICT), at once if it already does: what a plaintext connection of
    /// that listener waits for before it closes. A generation without the
    /// listener forbids nothing (its connections finish as they were).
    pub async fn turns_tls_only(&self, key: ListenerKey) {
        let mut stores = self.stores();
        loop {
            if self.load().get(key).is_some_and(ListenerState::tls_only) {
                return;
            }
            if stores.changed().await.is_err() {
                // The publisher is gone: no generation will come.
                return std::future::pending().await;
            }
        }
    }
}

/// A listener as its accept loops see it.
#[derive(Debug, Clone)]
pub struct ListenerRef {
    pub live: LiveListeners,
    pub key: ListenerKey,
}

impl ListenerRef {
    /// The listener's state in the live generation; `None` once a generation
    /// without it went live.
    pub fn load(&self) -> Option<ListenerState> {
        self.live.load().get(self.key).cloned()
    }

    /// Completes once a generation makes this listener TLS only (see
    /// [`LiveListeners::turns_tls_only`]).
    pub async fn turns_tls_only(&self) {
        self.live.turns_tls_only(self.key).await;
    }
}

/// An HTTP connection's view of its listener: each request reads the live
/// generation's state of it through [`HttpSlot::load_full`].
#[derive(Debug, Clone)]
pub struct HttpSlot {
    live: LiveListeners,
    key: ListenerKey,
    /// The state the connection was accepted under: what its requests use
    /// once the listener is no longer in the live generation (removed or
    /// moved), as the connection finishes.
    accepted: Arc<HttpListenerState>,
}

impl HttpSlot {
    /// The slot of a connection accepted on `listener` under `accepted`.
    pub fn new(listener: &ListenerRef, accepted: Arc<HttpListenerState>) -> Self {
        Self {
            live: listener.live.clone(),
            key: listener.key,
            accepted,
        }
    }

    /// A slot that always answers `state`: a connection served outside a
    /// running proxy.
    pub fn fixed(state: Arc<HttpListenerState>) -> Self {
        Self {
            live: LiveListeners::default(),
            key: ListenerKey { index: 0, id: 0 },
            accepted: state,
        }
    }

    /// Completes once a generation makes this connection's listener TLS
    /// only (see [`LiveListeners::turns_tls_only`]).
    pub async fn turns_tls_only(&self) {
        self.live.turns_tls_only(self.key).await;
    }

    /// The listener's state in the live generation (or, once the listener
    /// left it, the state the connection was accepted under).
    ///
    /// On the request path: one `load` of the whole table (a guard, no
    /// allocation, no lock), an index, and one reference count increment,
    /// which is what `ArcSwap::load_full` on a slot per listener cost.
    pub fn load_full(&self) -> Arc<HttpListenerState> {
        match self.live.load().get(self.key) {
            Some(ListenerState::Http(state)) => state.clone(),
            _ => self.accepted.clone(),
        }
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
                    let tls = downstream_tls(l, identity, metrics)?;
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
                            tls: downstream_tls(l, identity, metrics)?,
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

impl Snapshot {
    /// The state of listener `name` in this generation.
    pub fn listener(&self, name: &str) -> Option<ListenerState> {
        match self.http.get(name) {
            Some(state) => Some(ListenerState::Http(state.clone())),
            None => self.tcp.get(name).cloned().map(ListenerState::Tcp),
        }
    }
}

/// The TLS of listener `l`, presenting `identity`; an error when `l` has
/// `tls` and the proxy no identity.
fn downstream_tls(
    l: &ListenerConfig,
    identity: Option<&Arc<LiveIdentity>>,
    metrics: &Metrics,
) -> Result<Option<Arc<DownstreamTls>>, BuildError> {
    match (&l.tls, identity) {
        (None, _) => Ok(None),
        (Some(tls), Some(identity)) => Ok(Some(Arc::new(DownstreamTls::new(
            &l.name,
            identity.clone(),
            tls.mode,
            tls.handshake_timeout.0,
            metrics,
        )))),
        (Some(_), None) => Err(BuildError::Reference(format!(
            "listener `{}`: tls needs an identity (given by the control plane, or read from the top-level `tls` files)",
            l.name
        ))),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::server::tests::listener_state;

    fn state() -> Arc<HttpListenerState> {
        listener_state("127.0.0.1:9".parse().unwrap(), &Metrics::new())
    }

    fn key(index: usize, id: u64) -> ListenerKey {
        ListenerKey { index, id }
    }

    #[test]
    fn one_store_moves_every_listener_to_the_next_generation() {
        let live = LiveListeners::default();
        let (a, b) = (key(0, 1), key(1, 2));
        let slots = [a, b].map(|key| {
            let listener = ListenerRef {
                live: live.clone(),
                key,
            };
            HttpSlot::new(&listener, state())
        });
        let old = [state(), state()];
        let new = [state(), state()];
        let table = |states: &[Arc<HttpListenerState>; 2]| {
            ListenerTable::new(
                [a, b]
                    .into_iter()
                    .zip(states.iter().map(|s| ListenerState::Http(s.clone()))),
            )
        };
        live.store(Arc::new(table(&old)));
        for (slot, state) in slots.iter().zip(&old) {
            assert!(Arc::ptr_eq(&slot.load_full(), state));
        }
        live.store(Arc::new(table(&new)));
        for (slot, state) in slots.iter().zip(&new) {
            assert!(Arc::ptr_eq(&slot.load_full(), state));
        }
    }

    #[test]
    fn a_connection_of_a_closed_listener_keeps_its_state_not_its_successors() {
        let live = LiveListeners::default();
        let closed = ListenerRef {
            live: live.clone(),
            key: key(0, 1),
        };
        let accepted = state();
        let slot = HttpSlot::new(&closed, accepted.clone());
        // The next listener opened takes the freed index, with a new id.
        let successor = state();
        live.store(Arc::new(ListenerTable::new([(
            key(0, 2),
            ListenerState::Http(successor.clone()),
        )])));
        assert!(closed.load().is_none());
        assert!(Arc::ptr_eq(&slot.load_full(), &accepted));
        let opened = ListenerRef {
            live: live.clone(),
            key: key(0, 2),
        };
        assert!(
            matches!(opened.load(), Some(ListenerState::Http(s)) if Arc::ptr_eq(&s, &successor))
        );
    }
}
