//! Live generations: a whole configuration is built, started on every worker
//! and only then swapped in. [`Publisher::publish`] is the one way any source
//! (the configuration at start, a file re-read on SIGHUP, a control plane)
//! changes what the proxy runs.
//!
//! The steps of one publish, all under one lock so publishes never interleave:
//! ```text
//! validate ─▶ build (clusters, plugins, routes) ─▶ bind new listeners ─▶ start plugin VMs on every worker
//!     │ any failure: the generation is dropped, the live one stays, the error says why
//!     ▼
//! swap: one store makes every listener's new state live at once, workers open new /
//!       close removed listeners, callouts go to the new clusters, the old generation
//!       is released
//! ```
//! Every listener's state of the live generation sits in one table behind
//! one `ArcSwap` ([`LiveListeners`]): no request on one listener sees the new
//! generation while a later one on another listener still sees the old. A
//! request reads its listener's state once, so it runs wholly on one
//! generation; what it holds (routes, clusters, plugins) lives until it ends.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use lacewing_config::load::ConfigError;
use lacewing_config::{ListenerProtocol, ProxyConfig};
use lacewing_core::ProxyError;
use lacewing_core::body::BoxBody;
use lacewing_core::callout::{self, LocalFuture};
use lacewing_core::metrics::Metrics;
use lacewing_tls::{IdentityFiles, LiveIdentity};
use lacewing_upstream::{Resolver, Upstreams};
use lacewing_wasm::{WasmHost, WasmPlugin};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};
use serde::Serialize;

use crate::listener::{BindError, bind_listener};
use crate::snapshot::{
    BuildError, ListenerKey, ListenerRef, ListenerTable, LiveListeners, Snapshot,
};
use crate::worker::{Command, CommandSender, PluginStartFailure, WorkerListener};

/// How often host-name endpoints are resolved again.
const DNS_REFRESH: Duration = Duration::from_secs(5);
/// Longest a publish waits for the first answer for a new host name.
const DNS_FIRST_ANSWER: Duration = Duration::from_secs(5);

/// A generation that went live: its number and where its configuration came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Generation {
    /// 1 for the configuration the proxy started with, then one more per
    /// successful publish.
    pub number: u64,
    /// Where the configuration came from, as its publisher named it
    /// (for example `file:proxy.yaml`).
    pub source: String,
}

/// Why a generation was rejected. The generation that was live stays live.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The configuration breaks a rule (unknown cluster, bad value, ...).
    #[error("invalid configuration:\n{0}")]
    Config(#[from] ConfigError),
    /// Building routes, clusters or plugins failed.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// A new or moved listener could not be bound.
    #[error(transparent)]
    Bind(#[from] BindError),
    /// A plugin's VM did not start on a worker (`proxy_on_vm_start` or
    /// `proxy_on_configure` returned false, or the module trapped).
    #[error("plugin `{plugin}` did not start on worker {worker}: {reason}")]
    PluginStart {
        plugin: String,
        worker: usize,
        reason: String,
    },
    /// A setting that only a restart can change was changed.
    #[error("`{field}` cannot change while the proxy runs (live: {live}, new: {new})")]
    Fixed {
        field: &'static str,
        live: String,
        new: String,
    },
    /// The top-level `tls` files are unreadable or not a valid identity.
    #[error(transparent)]
    Identity(#[from] lacewing_tls::IdentityFileError),
    /// The proxy is draining or stopped.
    #[error("the proxy is shutting down")]
    Stopped,
}

impl From<PluginStartFailure> for PublishError {
    fn from(f: PluginStartFailure) -> Self {
        PublishError::PluginStart {
            plugin: f.plugin,
            worker: f.worker,
            reason: f.reason,
        }
    }
}

/// The live generation as the admin endpoint shows it.
#[derive(Debug)]
pub struct LiveGeneration {
    pub generation: Generation,
    pub config: Arc<ProxyConfig>,
}

/// Publishes generations to a running proxy. Cheap to clone, usable from any
/// thread; publishes are applied one at a time.
#[derive(Clone, Debug)]
pub struct Publisher {
    live: Arc<Live>,
}

#[derive(Debug)]
struct Live {
    inner: Mutex<Inner>,
    current: ArcSwapOption<LiveGeneration>,
    /// Every listener's state in the live generation; stored once per publish.
    listeners: LiveListeners,
    addresses: ArcSwap<HashMap<String, SocketAddr>>,
    metrics: Metrics,
    wasm: Arc<WasmHost>,
    callouts: Arc<LiveUpstreams>,
    resolver: Resolver,
    stats: PublishStats,
    /// The mesh identity TLS listeners and clusters present.
    identity: Option<Arc<LiveIdentity>>,
    /// The identity read from the configuration's `tls` files, used when
    /// there is no mesh identity; installed when a generation goes live.
    files: Arc<LiveIdentity>,
}

struct Inner {
    snapshot: Option<Snapshot>,
    listeners: HashMap<String, LiveListener>,
    workers: Vec<CommandSender>,
    next: u64,
    /// The id the next opened listener gets ([`ListenerKey::id`]).
    next_listener: u64,
    /// The bytes of the identity files installed last.
    files_content: Option<Vec<u8>>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("listeners", &self.listeners)
            .field("workers", &self.workers.len())
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

/// A listener the workers accept on.
#[derive(Debug)]
struct LiveListener {
    /// The configured address (port 0 stays 0 here).
    address: SocketAddr,
    bound: SocketAddr,
    protocol: ListenerProtocol,
    key: ListenerKey,
}

/// Publish metrics.
#[derive(Debug)]
struct PublishStats {
    generation: IntGauge,
    reload_success: IntCounter,
    reload_failure: IntCounter,
}

impl PublishStats {
    fn new(metrics: &Metrics) -> Self {
        // The registry prefixes every name with `lacewing_`.
        let generation = IntGauge::new(
            "config_generation",
            "Number of the live configuration generation.",
        )
        .expect("valid metric");
        let reloads = IntCounterVec::new(
            Opts::new(
                "config_reloads_total",
                "Generations published after start, by result (success, failure).",
            ),
            &["result"],
        )
        .expect("valid metric");
        // Registered once per proxy; a clash would be a second Publisher on one registry.
        for c in [
            Box::new(generation.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(reloads.clone()),
        ] {
            if let Err(e) = metrics.registry.register(c) {
                tracing::warn!(error = %e, "publish metrics not registered");
            }
        }
        Self {
            generation,
            reload_success: reloads.with_label_values(&["success"]),
            reload_failure: reloads.with_label_values(&["failure"]),
        }
    }
}

/// The clusters plugins call out to: those of the live generation.
struct LiveUpstreams(ArcSwap<Upstreams>);

impl std::fmt::Debug for LiveUpstreams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LiveUpstreams")
    }
}

impl callout::Upstreams for LiveUpstreams {
    fn has_cluster(&self, name: &str) -> bool {
        self.0.load().has_cluster(name)
    }

    fn send(
        &self,
        cluster: &str,
        request: http::Request<BoxBody>,
        timeout: Duration,
    ) -> LocalFuture<Result<http::Response<BoxBody>, ProxyError>> {
        self.0.load().send(cluster, request, timeout)
    }
}

impl Publisher {
    /// A publisher for the workers behind `workers` (one command channel
    /// each); nothing is live until the first [`Publisher::publish`].
    pub(crate) fn new(
        metrics: Metrics,
        wasm: Arc<WasmHost>,
        workers: Vec<CommandSender>,
        identity: Option<Arc<LiveIdentity>>,
    ) -> Result<Self, BuildError> {
        let empty =
            Upstreams::new(&[], &metrics).map_err(|e| BuildError::Upstream(e.to_string()))?;
        let resolver = Resolver::start(DNS_REFRESH)
            .map_err(|e| BuildError::Upstream(format!("cannot start the DNS resolver: {e}")))?;
        Ok(Self {
            live: Arc::new(Live {
                inner: Mutex::new(Inner {
                    snapshot: None,
                    listeners: HashMap::new(),
                    workers,
                    next: 1,
                    next_listener: 1,
                    files_content: None,
                }),
                current: ArcSwapOption::empty(),
                listeners: LiveListeners::default(),
                addresses: ArcSwap::default(),
                stats: PublishStats::new(&metrics),
                metrics,
                wasm,
                callouts: Arc::new(LiveUpstreams(ArcSwap::new(empty))),
                resolver,
                identity,
                files: LiveIdentity::new(),
            }),
        })
    }

    /// Validates and builds `config` as a whole new generation, starts its
    /// plugins' VMs on every worker, and swaps it in; returns the new
    /// generation. On any failure nothing changes and the error says why.
    ///
    /// Blocks until every worker has answered (usually milliseconds; longer
    /// when a module must be compiled): from async code call it through
    /// `tokio::task::spawn_blocking`. Never call it from a worker thread.
    /// `workers` and `admin.address` cannot change ([`PublishError::Fixed`]).
    pub fn publish(
        &self,
        config: ProxyConfig,
        source: impl Into<String>,
    ) -> Result<Generation, PublishError> {
        let source = source.into();
        let mut inner = self.live.inner.lock().unwrap_or_else(|p| p.into_inner());
        let first = inner.snapshot.is_none();
        let result = self.live.publish(&mut inner, config, source.clone());
        drop(inner);
        match &result {
            Ok(g) => {
                tracing::info!(generation = g.number, source = %g.source, "configuration generation live");
                if !first {
                    self.live.stats.reload_success.inc();
                }
            }
            Err(e) => {
                let live = self.current().map_or(0, |g| g.number);
                tracing::error!(%source, live, "configuration rejected; generation {live} stays live:\n{e}");
                if !first {
                    self.live.stats.reload_failure.inc();
                }
            }
        }
        result
    }

    /// Records a reload that failed before it could be published (for
    /// example a file that does not parse): logged with its reason and
    /// counted as a failed reload, like a rejected generation.
    pub fn reload_failed(&self, source: &str, reason: &dyn std::fmt::Display) {
        let live = self.current().map_or(0, |g| g.number);
        tracing::error!(%source, live, "configuration rejected; generation {live} stays live:\n{reason}");
        self.live.stats.reload_failure.inc();
    }

    /// The live generation (`None` before the first publish).
    pub fn current(&self) -> Option<Generation> {
        self.live
            .current
            .load()
            .as_ref()
            .map(|g| g.generation.clone())
    }

    /// The live generation's configuration (`None` before the first
    /// publish). A source that builds configurations of its own copies
    /// `workers` and `admin` from it: those cannot change while the proxy runs.
    pub fn config(&self) -> Option<Arc<ProxyConfig>> {
        self.live.current.load().as_ref().map(|g| g.config.clone())
    }

    /// The live generation and its configuration, for `/config_dump`.
    pub(crate) fn live(&self) -> Option<Arc<LiveGeneration>> {
        self.live.current.load_full()
    }

    /// The bound address of a live listener.
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.live.addresses.load().get(name).copied()
    }
}

impl Live {
    fn publish(
        &self,
        inner: &mut Inner,
        config: ProxyConfig,
        source: String,
    ) -> Result<Generation, PublishError> {
        lacewing_config::load::validate(&config)?;
        if let Some(live) = &inner.snapshot {
            fixed(
                "workers",
                &live.config.worker_count(),
                &config.worker_count(),
            )?;
            fixed(
                "admin.address",
                &live.config.admin.address,
                &config.admin.address,
            )?;
        }
        let workers = inner.workers.len();
        // Identity files are read (again) on every publish, so a reload picks
        // up replaced files; they are installed only if the generation goes live.
        let now = std::time::SystemTime::now();
        let (identity, files) = match (&self.identity, &config.tls) {
            (Some(mesh), _) => (Some(mesh), None),
            (None, Some(tls)) => {
                let files = IdentityFiles {
                    cert: &tls.cert_file,
                    key: &tls.key_file,
                    trust: &tls.trust_file,
                };
                (Some(&self.files), Some(files.load(now)?))
            }
            (None, None) => (None, None),
        };
        let config = Arc::new(config);
        // New host names are resolved on the resolver's thread; the build only reads answers.
        self.resolver
            .prepare(Upstreams::host_names(&config.clusters), DNS_FIRST_ANSWER);
        let snapshot = Snapshot::build(
            config.clone(),
            &self.metrics,
            &self.wasm,
            inner.snapshot.as_ref(),
            self.callouts.clone(),
            Some(&self.resolver),
            identity,
        )?;

        // Listeners, keyed by name: kept (same protocol, and the address it
        // was configured with or the one it is bound to: a port-0 listener
        // keeps its port whether the new generation says 0 or that port; only
        // its state changes) or opened anew.
        let (kept, to_open): (Vec<_>, Vec<_>) = config.listeners.iter().partition(|l| {
            inner.listeners.get(&l.name).is_some_and(|old| {
                (old.address == l.address || old.bound == l.address) && old.protocol == l.protocol
            })
        });
        let kept: Vec<String> = kept.into_iter().map(|l| l.name.clone()).collect();
        // Table indices: kept listeners keep theirs; opened ones take the
        // lowest free, so the table is as long as the most listeners open at once.
        let mut taken: Vec<usize> = kept
            .iter()
            .filter_map(|name| inner.listeners.get(name))
            .map(|l| l.key.index)
            .collect();
        let mut opened = Vec::new();
        for l in to_open {
            // An address one of our listeners holds is joined (SO_REUSEPORT), not refused.
            let ours = l.address.port() != 0
                && inner
                    .listeners
                    .values()
                    .any(|o| o.address == l.address || o.bound == l.address);
            let (bound, sockets) = bind_listener(&l.name, l.address, workers, !ours)?;
            let index = (0..).find(|i| !taken.contains(i)).unwrap_or_default();
            taken.push(index);
            let key = ListenerKey {
                index,
                id: inner.next_listener,
            };
            inner.next_listener += 1;
            opened.push((
                l.name.clone(),
                LiveListener {
                    address: l.address,
                    bound,
                    protocol: l.protocol,
                    key,
                },
                sockets,
            ));
        }
        let closed: Vec<String> = inner
            .listeners
            .keys()
            .filter(|name| !kept.contains(name))
            .cloned()
            .collect();

        // Every plugin's VM on every worker, before anything is swapped.
        let plugins: Vec<Arc<WasmPlugin>> = snapshot.plugins.values().cloned().collect();
        if !plugins.is_empty() {
            let started = ask_workers(&inner.workers, |_, done| Command::StartPlugins {
                plugins: plugins.clone(),
                done,
            });
            let failure = match started {
                Ok(results) => results.into_iter().find_map(Result::err).map(Into::into),
                Err(stopped) => Some(stopped),
            };
            if let Some(error) = failure {
                drop(plugins);
                drop(snapshot);
                retire(&inner.workers);
                return Err(error);
            }
        }

        // New handshakes use the files' identity from here on, unless it is
        // the one already installed.
        if let Some(files) = files
            && inner.files_content.as_ref() != Some(&files.content)
        {
            self.files.store(files.material);
            inner.files_content = Some(files.content);
            tracing::info!("identity files installed");
        }

        // The swap: one store makes every listener's new state live.
        let table = config.listeners.iter().filter_map(|l| {
            let key = match inner.listeners.get(&l.name) {
                Some(old) if kept.contains(&l.name) => old.key,
                _ => opened.iter().find(|(name, ..)| name == &l.name)?.1.key,
            };
            Some((key, snapshot.listener(&l.name)?))
        });
        self.listeners.store(Arc::new(ListenerTable::new(table)));
        let mut per_worker: Vec<Vec<(String, WorkerListener)>> =
            (0..workers).map(|_| Vec::new()).collect();
        for (name, listener, sockets) in opened {
            for (i, socket) in sockets.into_iter().enumerate() {
                per_worker[i].push((
                    name.clone(),
                    WorkerListener {
                        socket,
                        local: listener.bound,
                        listener: ListenerRef {
                            live: self.listeners.clone(),
                            key: listener.key,
                        },
                    },
                ));
            }
            inner.listeners.insert(name, listener);
        }
        for name in &closed {
            if !config.listeners.iter().any(|l| &l.name == name) {
                inner.listeners.remove(name);
            }
        }
        let mut per_worker = per_worker.into_iter();
        let drain_timeout = config.drain_timeout.0;
        let applied = ask_workers(&inner.workers, |_, done| Command::Listeners {
            close: closed.clone(),
            listen: per_worker.next().unwrap_or_default(),
            drain_timeout,
            done,
        });
        snapshot.upstreams.activate(Some(&self.resolver));
        self.callouts.0.store(snapshot.upstreams.clone());
        let generation = Generation {
            number: inner.next,
            source,
        };
        inner.next += 1;
        self.stats.generation.set(generation.number as i64);
        self.current.store(Some(Arc::new(LiveGeneration {
            generation: generation.clone(),
            config,
        })));
        self.addresses.store(Arc::new(
            inner
                .listeners
                .iter()
                .map(|(name, l)| (name.clone(), l.bound))
                .collect(),
        ));
        // The old generation goes once its last request ends; idle VMs of its
        // retired plugins go now.
        drop(inner.snapshot.replace(snapshot));
        retire(&inner.workers);
        applied?;
        Ok(generation)
    }
}

/// Refuses a change of a setting only a restart can change.
fn fixed<T: PartialEq + std::fmt::Debug>(
    field: &'static str,
    live: &T,
    new: &T,
) -> Result<(), PublishError> {
    if live == new {
        return Ok(());
    }
    Err(PublishError::Fixed {
        field,
        live: format!("{live:?}"),
        new: format!("{new:?}"),
    })
}

/// Sends each worker its command and waits for every answer.
fn ask_workers<T>(
    workers: &[CommandSender],
    mut command: impl FnMut(usize, std::sync::mpsc::Sender<T>) -> Command,
) -> Result<Vec<T>, PublishError> {
    let (done, answers) = std::sync::mpsc::channel();
    for (i, worker) in workers.iter().enumerate() {
        worker
            .send(command(i, done.clone()))
            .map_err(|_| PublishError::Stopped)?;
    }
    drop(done);
    (0..workers.len())
        .map(|_| answers.recv().map_err(|_| PublishError::Stopped))
        .collect()
}

/// Asks every worker to drop the VMs of plugins no longer used.
fn retire(workers: &[CommandSender]) {
    for worker in workers {
        let _ = worker.send(Command::RetirePlugins);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_publisher_goes_to_any_thread() {
        fn shareable<T: Clone + Send + Sync + 'static>() {}
        shareable::<Publisher>();
        shareable::<Generation>();
    }
}
