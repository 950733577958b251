//! Wiring: builds the live configuration, binds listeners, starts the admin
//! endpoint and the workers, and hands back a handle to drain and join them.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use arc_swap::ArcSwap;
use lacewing_config::{ListenerProtocol, ProxyConfig};
use lacewing_core::drain::{self, DrainTrigger};
use lacewing_core::metrics::Metrics;
use lacewing_wasm::{HostOptions, WasmHost};

use crate::admin::{self, AdminState};
use crate::listener::{BindError, bind_shared};
use crate::snapshot::{BuildError, ListenerSlot, Snapshot};
use crate::worker::{self, WorkerListener};

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("invalid configuration:\n{0}")]
    Config(#[from] lacewing_config::load::ConfigError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Bind(#[from] BindError),
    #[error("wasm host: {0}")]
    Wasm(String),
    #[error("admin listener on {address}: {source}")]
    Admin {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot start a thread: {0}")]
    Thread(std::io::Error),
}

/// Options that are not part of the configuration file.
#[derive(Debug, Clone, Default)]
pub struct StartOptions {
    /// Where compiled wasm modules are cached; the default cache directory when `None`.
    pub wasm_cache_dir: Option<PathBuf>,
}

/// The Lacewing proxy.
#[derive(Debug)]
pub struct Proxy;

/// A running proxy.
#[derive(Debug)]
pub struct ProxyHandle {
    listeners: HashMap<String, SocketAddr>,
    admin: Option<SocketAddr>,
    drain: DrainTrigger,
    /// Ends the admin endpoint once the workers are gone.
    stop_admin: DrainTrigger,
    admin_thread: Option<JoinHandle<()>>,
    workers: Vec<JoinHandle<()>>,
    ready: Arc<AtomicBool>,
    metrics: Metrics,
}

/// The default wasm cache directory: `$LACEWING_CACHE_DIR`, else
/// `$XDG_CACHE_HOME/lacewing`, else `~/.cache/lacewing`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("LACEWING_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return Some(PathBuf::from(dir).join("lacewing"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache").join("lacewing"))
}

impl Proxy {
    /// Validates and starts a configuration; returns once every listener is bound.
    pub fn start(config: ProxyConfig) -> Result<ProxyHandle, StartError> {
        Self::start_with(config, StartOptions::default())
    }

    /// [`Proxy::start`] with extra options.
    pub fn start_with(
        config: ProxyConfig,
        options: StartOptions,
    ) -> Result<ProxyHandle, StartError> {
        lacewing_config::load::validate(&config)?;
        let config = Arc::new(config);
        let metrics = Metrics::new();
        let wasm = WasmHost::new(HostOptions {
            cache_dir: options.wasm_cache_dir.or_else(default_cache_dir),
            metrics: metrics.clone(),
            log_level: lacewing_abi::LogLevel::Info,
        })
        .map_err(|e| StartError::Wasm(e.to_string()))?;
        let snapshot = Snapshot::build(config.clone(), &metrics, &wasm)?;
        let workers = config.worker_count();

        let mut per_worker: Vec<Vec<WorkerListener>> = (0..workers).map(|_| Vec::new()).collect();
        let mut addresses = HashMap::new();
        for l in &config.listeners {
            let (bound, sockets) = bind_shared(&l.name, l.address, workers)?;
            addresses.insert(l.name.clone(), bound);
            let slot = match l.protocol {
                ListenerProtocol::Http => {
                    ListenerSlot::Http(Arc::new(ArcSwap::new(snapshot.http[&l.name].clone())))
                }
                ListenerProtocol::Tcp => {
                    ListenerSlot::Tcp(Arc::new(ArcSwap::new(snapshot.tcp[&l.name].clone())))
                }
            };
            for (i, socket) in sockets.into_iter().enumerate() {
                per_worker[i].push(WorkerListener {
                    socket,
                    local: bound,
                    slot: slot.clone(),
                    max_connections: l.limits.max_connections,
                });
            }
        }

        let (trigger, _) = drain::channel();
        let (stop_admin, _) = drain::channel();
        let ready = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        let mut admin_thread = None;
        let admin = match config.admin.address {
            None => None,
            Some(address) => {
                let socket = std::net::TcpListener::bind(address)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .map_err(|source| StartError::Admin { address, source })?;
                let bound = socket
                    .local_addr()
                    .map_err(|source| StartError::Admin { address, source })?;
                let state = AdminState {
                    metrics: metrics.clone(),
                    config: Arc::new(ArcSwap::new(config.clone())),
                    ready: ready.clone(),
                };
                let watch = trigger.watch();
                let stop = stop_admin.watch();
                let thread = std::thread::Builder::new()
                    .name("lacewing-admin".into())
                    .spawn(move || {
                        let rt = match tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                        {
                            Ok(rt) => rt,
                            Err(e) => {
                                tracing::error!(error = %e, "admin runtime failed");
                                return;
                            }
                        };
                        rt.block_on(async move {
                            match tokio::net::TcpListener::from_std(socket) {
                                Ok(l) => admin::serve(l, state, watch, stop).await,
                                Err(e) => tracing::error!(error = %e, "admin listener failed"),
                            }
                        });
                    })
                    .map_err(StartError::Thread)?;
                admin_thread = Some(thread);
                Some(bound)
            }
        };

        let ids = Arc::new(AtomicU64::new(1));
        for (i, listeners) in per_worker.into_iter().enumerate() {
            let watch = trigger.watch();
            let ids = ids.clone();
            let drain_timeout = config.drain_timeout.0;
            threads.push(
                std::thread::Builder::new()
                    .name(format!("lacewing-worker-{i}"))
                    .spawn(move || {
                        if let Err(e) = worker::run(i, listeners, watch, drain_timeout, ids) {
                            tracing::error!(worker = i, error = %e, "worker failed to start");
                        }
                    })
                    .map_err(StartError::Thread)?,
            );
        }
        ready.store(true, Ordering::Release);
        // Keep the snapshot's plugins and upstreams alive as long as the listeners use them.
        drop(snapshot);
        Ok(ProxyHandle {
            listeners: addresses,
            admin,
            drain: trigger,
            stop_admin,
            admin_thread,
            workers: threads,
            ready,
            metrics,
        })
    }
}

impl ProxyHandle {
    /// The bound address of a listener (the real port when the config said 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.listeners.get(name).copied()
    }

    /// The bound admin address, if the admin listener is on.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin
    }

    /// The proxy's metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops accepting; in-flight requests finish (up to the drain timeout).
    pub fn drain(&self) {
        self.ready.store(false, Ordering::Release);
        self.drain.drain();
    }

    /// Waits for every worker to exit (they exit after a drain), then stops
    /// the admin endpoint, which reports `/ready` = 503 until then.
    pub fn join(self) {
        for w in self.workers {
            let _ = w.join();
        }
        self.stop_admin.drain();
        if let Some(admin) = self.admin_thread {
            let _ = admin.join();
        }
    }

    /// Drains and waits.
    pub fn shutdown(self) {
        self.drain();
        self.join();
    }
}
