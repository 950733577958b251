//! The process-wide wasm host: engine, linker, shared data, queues and plugin metrics.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use lacewing_abi::LogLevel;
use lacewing_config::PluginConfig;
use lacewing_core::callout::Upstreams;
use lacewing_core::metrics::Metrics;
use sha2::{Digest, Sha256};
use wasmtime::Linker;

use crate::engine::WasmEngine;
use crate::error::WasmError;
use crate::host_metrics::HostMetrics;
use crate::plugin::WasmPlugin;
use crate::plugin_metrics::PluginMetrics;
use crate::queues::SharedQueues;
use crate::shared_data::SharedData;
use crate::vm::HostState;

/// What the host is built with.
#[derive(Debug, Clone)]
pub struct HostOptions {
    /// Where precompiled module artifacts are kept; `None` keeps them in memory only.
    pub cache_dir: Option<PathBuf>,
    /// The proxy's registry; plugin and host metrics are exported on it.
    pub metrics: Metrics,
    /// Messages a plugin logs below this level are dropped (and `proxy_get_log_level` returns it).
    pub log_level: LogLevel,
}

/// The proxy-wasm host. One per process, shared by every worker.
pub struct WasmHost {
    pub(crate) engine: WasmEngine,
    pub(crate) linker: Linker<HostState>,
    pub(crate) log_level: LogLevel,
    pub(crate) shared_data: SharedData,
    pub(crate) queues: SharedQueues,
    pub(crate) plugin_metrics: PluginMetrics,
    pub(crate) host_metrics: HostMetrics,
    /// Distinguishes hosts in per-thread VM maps.
    pub(crate) uid: u64,
    /// Base of the WASI monotonic clock.
    pub(crate) started: Instant,
    pub(crate) node_id: String,
    pub(crate) node_cluster: String,
    /// Bumped whenever a plugin is dropped, so workers retire its VMs and timers.
    pub(crate) retired_generation: AtomicU64,
}

impl std::fmt::Debug for WasmHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmHost")
            .field("uid", &self.uid)
            .finish_non_exhaustive()
    }
}

static NEXT_UID: AtomicU64 = AtomicU64::new(1);

/// A process-unique id for hosts and plugins.
pub(crate) fn next_uid() -> u64 {
    NEXT_UID.fetch_add(1, Ordering::Relaxed)
}

impl WasmHost {
    /// Starts the engine (and its epoch ticker) and links every hostcall.
    pub fn new(opts: HostOptions) -> Result<Arc<WasmHost>, WasmError> {
        let engine = WasmEngine::new(opts.cache_dir).map_err(WasmError::Engine)?;
        let mut linker = Linker::new(&engine.engine);
        crate::hostcalls::add_to_linker(&mut linker)
            .map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        let node_id = std::env::var("LACEWING_NODE_ID")
            .ok()
            .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "lacewing".into());
        let node_cluster = std::env::var("LACEWING_NODE_CLUSTER").unwrap_or_default();
        Ok(Arc::new(WasmHost {
            engine,
            linker,
            log_level: opts.log_level,
            shared_data: SharedData::new(),
            queues: SharedQueues::new(),
            plugin_metrics: PluginMetrics::new(&opts.metrics.registry),
            host_metrics: HostMetrics::new(&opts.metrics.registry),
            uid: next_uid(),
            started: Instant::now(),
            node_id,
            node_cluster,
            retired_generation: AtomicU64::new(0),
        }))
    }

    /// Reads, verifies (sha256 pin), compiles (cached by sha256), links and
    /// validates a plugin: one instance runs `_initialize`/`_start`,
    /// `proxy_on_vm_start`, creates the root context and runs
    /// `proxy_on_configure`. The error says why the plugin was refused.
    pub fn load_plugin(
        self: &Arc<Self>,
        cfg: &PluginConfig,
        upstreams: Arc<dyn Upstreams>,
    ) -> Result<Arc<WasmPlugin>, WasmError> {
        let bytes = std::fs::read(&cfg.module).map_err(|source| WasmError::Read {
            plugin: cfg.name.clone(),
            path: cfg.module.clone(),
            source,
        })?;
        self.load_plugin_bytes(cfg, &bytes, upstreams)
    }

    /// [`WasmHost::load_plugin`] for the next generation: when `previous` was
    /// loaded from the same configuration and a module with the same sha256,
    /// it is returned as is (its VMs and their state carry over); otherwise
    /// the plugin is loaded anew.
    pub fn reload_plugin(
        self: &Arc<Self>,
        cfg: &PluginConfig,
        upstreams: Arc<dyn Upstreams>,
        previous: Option<&Arc<WasmPlugin>>,
    ) -> Result<Arc<WasmPlugin>, WasmError> {
        let bytes = std::fs::read(&cfg.module).map_err(|source| WasmError::Read {
            plugin: cfg.name.clone(),
            path: cfg.module.clone(),
            source,
        })?;
        if let Some(previous) = previous
            && previous.config() == cfg
            && previous.shared.sha256 == <[u8; 32]>::from(Sha256::digest(&bytes))
        {
            return Ok(previous.clone());
        }
        self.load_plugin_bytes(cfg, &bytes, upstreams)
    }

    /// [`WasmHost::load_plugin`] for module bytes already in memory (`cfg.module`
    /// is then only a label).
    pub fn load_plugin_bytes(
        self: &Arc<Self>,
        cfg: &PluginConfig,
        bytes: &[u8],
        upstreams: Arc<dyn Upstreams>,
    ) -> Result<Arc<WasmPlugin>, WasmError> {
        crate::plugin::load(self, cfg, bytes, upstreams).map(Arc::new)
    }

    /// On the calling worker thread: ends the root contexts (`proxy_on_done`,
    /// `proxy_on_delete`) and timers of plugins dropped since the last call,
    /// and drops their VMs unless a stream in flight still uses one (it goes
    /// when that stream ends). Cheap when no plugin was dropped.
    pub fn retire_dropped_plugins(&self) {
        crate::workers::sweep(self);
    }

    /// The process-wide shared key/value store (`proxy_{get,set}_shared_data`).
    pub fn shared_data(&self) -> &SharedData {
        &self.shared_data
    }

    /// The process-wide shared queues.
    pub fn queues(&self) -> &SharedQueues {
        &self.queues
    }
}
