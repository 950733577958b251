//! A loaded plugin: its module checked once against the linker (`InstancePre`),
//! its ABI version, configuration bytes and limits. Shared by every worker.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use bytes::Bytes;
use lacewing_abi::AbiVersion;
use lacewing_abi::names::{ALL_IMPORTS, ENV_MODULE, WASI_IMPORTS, WASI_MODULES};
use lacewing_config::PluginConfig;
use lacewing_core::callout::Upstreams;
use sha2::{Digest, Sha256};
use wasmtime::{ExternType, InstancePre, Module};

use crate::engine::{EPOCH_TICK, hex};
use crate::error::WasmError;
use crate::exports::Callback;
use crate::host::{WasmHost, next_uid};
use crate::host_metrics::PluginHostMetrics;
use crate::vm::{HostState, Vm, VmKey};

/// A plugin ready to make filters. Implements
/// [`lacewing_core::filter::HttpFilterFactory`] and
/// [`lacewing_core::filter::NetworkFilterFactory`]; each worker thread gets its
/// own VM, created by [`WasmPlugin::start_on_worker`] when the plugin is
/// published (or on first use where nobody did).
pub struct WasmPlugin {
    pub(crate) shared: Arc<PluginShared>,
}

impl std::fmt::Debug for WasmPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WasmPlugin")
            .field("name", &self.shared.name)
            .field("abi", &self.shared.abi)
            .finish_non_exhaustive()
    }
}

impl Drop for WasmPlugin {
    fn drop(&mut self) {
        // Streams in flight keep their VM; workers drop the plugin's root
        // context, timers and idle VMs the next time they look for a VM.
        self.shared.retired.store(true, Ordering::Release);
        self.shared
            .host
            .retired_generation
            .fetch_add(1, Ordering::AcqRel);
    }
}

impl WasmPlugin {
    /// The plugin name from the configuration.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The ABI version the module advertises.
    pub fn abi_version(&self) -> AbiVersion {
        self.shared.abi
    }

    /// Hex sha256 of the module.
    pub fn sha256(&self) -> String {
        hex(&self.shared.sha256)
    }

    /// The configuration the plugin was loaded with.
    pub fn config(&self) -> &PluginConfig {
        &self.shared.cfg
    }

    /// Makes sure the calling worker thread has this plugin's VM and root
    /// context: instantiates the module (or joins the shared `vm_id` VM) and
    /// runs `proxy_on_vm_start` and `proxy_on_configure`, which must return
    /// true. Call it on every worker, inside its tokio `LocalSet`, before the
    /// plugin serves traffic: tick timers and queues then run with no request.
    /// Nothing happens when the VM is already there.
    pub fn start_on_worker(&self) -> Result<(), WasmError> {
        crate::workers::worker_vm(&self.shared)
            .map(|_| ())
            .map_err(|f| WasmError::Start {
                plugin: self.shared.name.clone(),
                reason: f.to_string(),
            })
    }
}

/// Everything about a plugin that VMs and hostcalls need.
pub(crate) struct PluginShared {
    pub uid: u64,
    pub name: String,
    pub cfg: PluginConfig,
    pub host: Arc<WasmHost>,
    pub pre: InstancePre<HostState>,
    pub abi: AbiVersion,
    pub sha256: [u8; 32],
    pub plugin_config: Bytes,
    pub vm_config: Bytes,
    pub upstreams: Arc<dyn Upstreams>,
    /// Epoch ticks one callback may run.
    pub deadline_ticks: u64,
    /// Most bytes of linear memory.
    pub memory_cap: usize,
    pub metrics: PluginHostMetrics,
    pub vm_key: VmKey,
    /// Set when the [`WasmPlugin`] is dropped (for example replaced by a reload).
    pub retired: AtomicBool,
    /// Stream callbacks the module said it does nothing in (one bit per
    /// [`Callback`]), skipped from then on: see [`PluginShared::skips`].
    pub unused_callbacks: AtomicU32,
}

impl PluginShared {
    /// Whether `callback` is skipped: the module declared it unused through
    /// the `lacewing_unused_callbacks` foreign function. Each skipped call
    /// saves a wasm entry and exit, its timing and the guest's dispatch
    /// (about 600 instructions for a callback that does nothing, callgrind).
    pub fn skips(&self, callback: Callback) -> bool {
        self.unused_callbacks.load(Ordering::Relaxed) & callback.bit() != 0
    }
}

fn config_bytes(value: &Option<serde_json::Value>) -> Bytes {
    match value {
        None | Some(serde_json::Value::Null) => Bytes::new(),
        Some(serde_json::Value::String(s)) => Bytes::copy_from_slice(s.as_bytes()),
        Some(other) => Bytes::from(serde_json::to_vec(other).unwrap_or_default()),
    }
}

/// The longest callback deadline, in epoch ticks (one day).
const MAX_DEADLINE_TICKS: u64 = 24 * 3600 * 1000 / EPOCH_TICK.as_millis() as u64;

/// The epoch deadline of a callback that may run for `timeout`: whole ticks,
/// rounded up, and one more for the tick already under way when it starts.
/// It fires after more than the rounded-up timeout (never before the
/// timeout) and less than two ticks after the timeout. At most a day.
fn deadline_ticks(timeout: Duration) -> u64 {
    let ticks = timeout.as_micros().div_ceil(EPOCH_TICK.as_micros().max(1));
    u64::try_from(ticks)
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_DEADLINE_TICKS)
        + 1
}

/// Loads and validates a plugin (see [`WasmHost::load_plugin`]).
pub(crate) fn load(
    host: &Arc<WasmHost>,
    cfg: &PluginConfig,
    bytes: &[u8],
    upstreams: Arc<dyn Upstreams>,
) -> Result<WasmPlugin, WasmError> {
    let plugin = cfg.name.clone();
    let sha256: [u8; 32] = Sha256::digest(bytes).into();
    if let Some(expected) = &cfg.sha256
        && !expected.trim().eq_ignore_ascii_case(&hex(&sha256))
    {
        return Err(WasmError::Sha256Mismatch {
            plugin,
            expected: expected.clone(),
            actual: hex(&sha256),
        });
    }
    let module = host
        .engine
        .module(&sha256, bytes)
        .map_err(|reason| WasmError::Compile {
            plugin: plugin.clone(),
            reason,
        })?;
    check_imports(&module).map_err(|reason| WasmError::Link {
        plugin: plugin.clone(),
        reason,
    })?;
    let pre = host
        .linker
        .instantiate_pre(&module)
        .map_err(|e| WasmError::Link {
            plugin: plugin.clone(),
            reason: format!("{e:#}"),
        })?;
    let abi = detect_abi(&module).ok_or_else(|| WasmError::Link {
        plugin: plugin.clone(),
        reason: "module exports no proxy_abi_version_* marker (supported: \
                 proxy_abi_version_0_1_0, proxy_abi_version_0_2_0, proxy_abi_version_0_2_1)"
            .into(),
    })?;
    let allocates = module
        .exports()
        .any(|e| matches!(e.name(), "proxy_on_memory_allocate" | "malloc"));
    if !allocates {
        return Err(WasmError::Link {
            plugin: plugin.clone(),
            reason: "module exports neither proxy_on_memory_allocate nor malloc, \
                     so the host cannot hand it data"
                .into(),
        });
    }
    let uid = next_uid();
    let vm_key = if cfg.vm_id.is_empty() {
        VmKey::Plugin(uid)
    } else {
        VmKey::Shared {
            host: host.uid,
            vm_id: cfg.vm_id.clone(),
            sha256,
        }
    };
    let deadline_ticks = deadline_ticks(cfg.limits.callback_timeout.0);
    let shared = Arc::new(PluginShared {
        uid,
        name: cfg.name.clone(),
        cfg: cfg.clone(),
        host: host.clone(),
        pre,
        abi,
        sha256,
        plugin_config: config_bytes(&cfg.configuration),
        vm_config: config_bytes(&cfg.vm_configuration),
        upstreams,
        deadline_ticks,
        memory_cap: cfg.limits.memory.as_usize(),
        metrics: host.host_metrics.for_plugin(&cfg.name),
        vm_key,
        retired: AtomicBool::new(false),
        unused_callbacks: AtomicU32::new(0),
    });
    // One throwaway instance proves the plugin starts and accepts its configuration.
    let vm = Vm::start(&shared, false).map_err(|f| WasmError::Start {
        plugin: plugin.clone(),
        reason: f.to_string(),
    })?;
    vm.create_root(&shared).map_err(|f| WasmError::Start {
        plugin: plugin.clone(),
        reason: f.to_string(),
    })?;
    vm.shutdown();
    tracing::info!(plugin = %plugin, abi = %abi, sha256 = %hex(&sha256), "wasm plugin loaded");
    Ok(WasmPlugin { shared })
}

/// Every function import must be one the host links; the error names the first that is not.
fn check_imports(module: &Module) -> Result<(), String> {
    for import in module.imports() {
        let (m, name) = (import.module(), import.name());
        match import.ty() {
            ExternType::Func(_) => {
                let known = (m == ENV_MODULE && ALL_IMPORTS.contains(&name))
                    || (WASI_MODULES.contains(&m) && WASI_IMPORTS.contains(&name));
                if !known {
                    return Err(format!("module imports unknown function {m}.{name}"));
                }
            }
            _ => {
                return Err(format!(
                    "module imports {m}.{name}, which is not a function; only functions can be imported"
                ));
            }
        }
    }
    Ok(())
}

/// The ABI version from the exported `proxy_abi_version_*` marker (the newest
/// when several are exported).
pub(crate) fn detect_abi(module: &Module) -> Option<AbiVersion> {
    module
        .exports()
        .filter_map(|e| AbiVersion::from_marker(e.name()))
        .max()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The deadline's window in milliseconds: the tick under way may have
    /// just begun or be about to end when the callback starts.
    fn window_ms(timeout: Duration) -> (u128, u128) {
        let ticks = u128::from(deadline_ticks(timeout));
        let tick = EPOCH_TICK.as_millis();
        ((ticks - 1) * tick, ticks * tick)
    }

    #[test]
    fn a_deadline_never_fires_before_its_timeout_nor_two_ticks_after() {
        let tick = EPOCH_TICK.as_millis();
        for ms in [1, 5, 9, 10, 11, 25, 50, 99, 100, 101, 5000] {
            let (earliest, latest) = window_ms(Duration::from_millis(ms));
            assert!(
                earliest >= u128::from(ms),
                "{ms}ms: fires from {earliest}ms"
            );
            assert!(
                latest < u128::from(ms) + 2 * tick,
                "{ms}ms: fires until {latest}ms"
            );
        }
        assert_eq!(window_ms(Duration::from_millis(100)), (100, 110));
        let day = Duration::from_secs(7 * 24 * 3600);
        assert_eq!(deadline_ticks(day), MAX_DEADLINE_TICKS + 1);
    }
}
