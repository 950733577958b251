//! Wiring: starts the workers, publishes the first generation to them, starts
//! the admin endpoint, and hands back a handle to publish, drain and join.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use lacewing_config::ProxyConfig;
use lacewing_core::drain::{self, DrainTrigger};
use lacewing_core::metrics::Metrics;
use lacewing_wasm::{HostOptions, WasmHost};

use crate::admin::{self, AdminState};
use crate::publish::{Generation, PublishError, Publisher};
use crate::snapshot::BuildError;
use crate::worker;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The first generation was rejected.
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Build(#[from] BuildError),
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
    /// Where the first generation's configuration came from (shown by
    /// `/config_dump`); `start` when `None`.
    pub source: Option<String>,
    /// The mesh identity (kept current by its owner, the sidecar's agent)
    /// that listeners and clusters with `tls` present.
    pub identity: Option<Arc<lacewing_tls::LiveIdentity>>,
}

/// The Lacewing proxy.
#[derive(Debug)]
pub struct Proxy;

/// A running proxy.
#[derive(Debug)]
pub struct ProxyHandle {
    publisher: Publisher,
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
    ///
    /// Starts the workers with no listener, then publishes `config` as
    /// generation 1 through the same path as every later generation.
    pub fn start_with(
        config: ProxyConfig,
        options: StartOptions,
    ) -> Result<ProxyHandle, StartError> {
        lacewing_config::load::validate(&config).map_err(PublishError::from)?;
        let metrics = Metrics::new();
        let open_files = crate::accept::raise_open_files_limit();
        let open_files_limit = open_files.current.unwrap_or(0);
        metrics
            .open_files_limit
            .set(i64::try_from(open_files_limit).unwrap_or(i64::MAX));
        tracing::info!(
            limit = open_files_limit,
            inherited = open_files.inherited.unwrap_or(0),
            "open files limit (0: unlimited)"
        );
        let wasm = WasmHost::new(HostOptions {
            cache_dir: options.wasm_cache_dir.or_else(default_cache_dir),
            metrics: metrics.clone(),
            log_level: lacewing_abi::LogLevel::Info,
        })
        .map_err(|e| StartError::Wasm(e.to_string()))?;
        let admin_address = config.admin.address;

        let (trigger, _) = drain::channel();
        let ids = Arc::new(AtomicU64::new(1));
        let mut threads = Vec::new();
        let mut commands = Vec::new();
        let stop = |threads: Vec<JoinHandle<()>>, trigger: &DrainTrigger| {
            trigger.drain();
            for t in threads {
                let _ = t.join();
            }
        };
        for i in 0..config.worker_count() {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let watch = trigger.watch();
            let ids = ids.clone();
            let wasm = wasm.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("lacewing-worker-{i}"))
                .spawn(move || {
                    if let Err(e) = worker::run(i, rx, watch, ids, wasm) {
                        tracing::error!(worker = i, error = %e, "worker failed to start");
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    stop(threads, &trigger);
                    return Err(StartError::Thread(e));
                }
            }
            commands.push(tx);
        }
        let publisher = Publisher::new(metrics.clone(), wasm, commands, options.identity)?;
        let source = options.source.unwrap_or_else(|| "start".into());
        if let Err(e) = publisher.publish(config, source) {
            stop(threads, &trigger);
            return Err(e.into());
        }

        let (stop_admin, _) = drain::channel();
        let ready = Arc::new(AtomicBool::new(false));
        let mut admin_thread = None;
        let admin = match admin_address {
            None => None,
            Some(address) => {
                let bound = std::net::TcpListener::bind(address)
                    .and_then(|s| s.set_nonblocking(true).map(|()| s))
                    .and_then(|s| s.local_addr().map(|a| (s, a)));
                let (socket, bound) = match bound {
                    Ok(b) => b,
                    Err(source) => {
                        stop(threads, &trigger);
                        return Err(StartError::Admin { address, source });
                    }
                };
                let state = AdminState {
                    metrics: metrics.clone(),
                    publisher: publisher.clone(),
                    ready: ready.clone(),
                };
                let watch = trigger.watch();
                let stop_watch = stop_admin.watch();
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
                                Ok(l) => admin::serve(l, state, watch, stop_watch).await,
                                Err(e) => tracing::error!(error = %e, "admin listener failed"),
                            }
                        });
                    });
                match thread {
                    Ok(t) => admin_thread = Some(t),
                    Err(e) => {
                        stop(threads, &trigger);
                        return Err(StartError::Thread(e));
                    }
                }
                Some(bound)
            }
        };
        ready.store(true, Ordering::Release);
        Ok(ProxyHandle {
            publisher,
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
    /// The bound address of a live listener (the real port when the config said 0).
    pub fn listener_addr(&self, name: &str) -> Option<SocketAddr> {
        self.publisher.listener_addr(name)
    }

    /// Publishes a new generation; see [`Publisher::publish`].
    pub fn publish(
        &self,
        config: ProxyConfig,
        source: impl Into<String>,
    ) -> Result<Generation, PublishError> {
        self.publisher.publish(config, source)
    }

    /// A publisher for this proxy, to keep and use from any thread or task.
    pub fn publisher(&self) -> Publisher {
        self.publisher.clone()
    }

    /// The live generation.
    pub fn generation(&self) -> Option<Generation> {
        self.publisher.current()
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
