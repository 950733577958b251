//! Each worker thread's VMs: a thread-local map filled when a generation is
//! published (see [`crate::WasmPlugin::start_on_worker`]), re-creation of broken VMs (rate-limited), and retirement of the VMs and
//! root contexts of dropped plugins.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rustc_hash::FxHashMap;

use crate::failure::Failure;
use crate::host::WasmHost;
use crate::plugin::PluginShared;
use crate::vm::Vm;

/// Most VM recreations per worker and VM within [`RESTART_WINDOW`].
pub(crate) const MAX_RESTARTS: usize = 5;
/// See [`MAX_RESTARTS`].
pub(crate) const RESTART_WINDOW: Duration = Duration::from_secs(10);

/// Identifies a VM in a worker's map.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum VmKey {
    /// A plugin with its own VM.
    Plugin(u64),
    /// Plugins sharing a VM by `vm_id` and module.
    Shared {
        host: u64,
        vm_id: String,
        sha256: [u8; 32],
    },
}

/// Starts a task on the current thread's `LocalSet`. `None` when the thread
/// runs none (callouts and timers then cannot work here), instead of letting
/// tokio's panic escape into the data plane.
pub(crate) fn spawn_local<F: std::future::Future<Output = ()> + 'static>(
    task: F,
) -> Option<tokio::task::JoinHandle<()>> {
    let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio::task::spawn_local(task)
    }));
    if spawned.is_err() {
        tracing::error!(
            "wasm host: no tokio LocalSet on this thread; callouts and timers are unavailable"
        );
    }
    spawned.ok()
}

/// A worker's VMs and their restart history.
struct WorkerSlot {
    vm: Option<Rc<Vm>>,
    restarts: VecDeque<Instant>,
    owner: std::sync::Weak<PluginShared>,
}

thread_local! {
    // Looked up for every request a plugin filters: Fx rather than SipHash
    // (with `pending_done` in state.rs) is 0.5k fewer instructions a request
    // with one filter; the keys are plugin ids, never a client's data.
    static WORKER_VMS: RefCell<FxHashMap<VmKey, WorkerSlot>> = RefCell::new(FxHashMap::default());
    /// The (host, retired generation) this worker last swept for.
    static SWEPT: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Forgets this worker's VMs of dropped plugins and their root contexts.
/// VMs still used by streams in flight live on until those streams end.
fn retire_dropped_plugins() {
    let slots: Vec<(VmKey, Option<Rc<Vm>>)> = WORKER_VMS.with(|m| {
        m.borrow()
            .iter()
            .map(|(k, s)| (k.clone(), s.vm.clone()))
            .collect()
    });
    let mut idle = Vec::new();
    let mut new_owners = Vec::new();
    for (key, vm) in slots {
        match vm {
            Some(vm) if !vm.retire_roots() => {
                if let Some(owner) = vm.any_root_plugin() {
                    new_owners.push((key, owner));
                }
            }
            _ => idle.push(key),
        }
    }
    WORKER_VMS.with(|m| {
        let mut map = m.borrow_mut();
        for (key, owner) in new_owners {
            if let Some(slot) = map.get_mut(&key) {
                slot.owner = Arc::downgrade(&owner);
            }
        }
        for key in idle {
            let retired = map.get(&key).is_some_and(|s| {
                s.owner
                    .upgrade()
                    .is_none_or(|p| p.retired.load(Ordering::Acquire))
            });
            if retired {
                map.remove(&key);
            }
        }
    });
}

/// Retires this thread's VMs and root contexts of plugins of `host` dropped
/// since the last look; nothing to do when none was.
pub(crate) fn sweep(host: &WasmHost) {
    let generation = (host.uid, host.retired_generation.load(Ordering::Acquire));
    if SWEPT.with(Cell::get) != generation {
        SWEPT.with(|s| s.set(generation));
        retire_dropped_plugins();
    }
}

/// The VM of `plugin` on this worker thread and the plugin's root context in
/// it, creating (or recreating, rate-limited) the VM when needed.
pub(crate) fn worker_vm(plugin: &Arc<PluginShared>) -> Result<(Rc<Vm>, u32), Failure> {
    sweep(&plugin.host);
    let existing = WORKER_VMS.with(|m| m.borrow().get(&plugin.vm_key).and_then(|s| s.vm.clone()));
    if let Some(vm) = &existing
        && !vm.broken.get()
    {
        if let Some(root) = vm.root_of(plugin) {
            return Ok((vm.clone(), root));
        }
        let root = vm.create_root(plugin)?;
        return Ok((vm.clone(), root));
    }
    let now = Instant::now();
    // Every creation after the first on this worker is a restart, rate-limited.
    let (allowed, restart) = WORKER_VMS.with(|m| {
        let mut map = m.borrow_mut();
        let restart = map.contains_key(&plugin.vm_key);
        let slot = map
            .entry(plugin.vm_key.clone())
            .or_insert_with(|| WorkerSlot {
                vm: None,
                restarts: VecDeque::new(),
                owner: Arc::downgrade(plugin),
            });
        if let Some(old) = slot.vm.take() {
            old.shutdown();
        }
        while slot
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            slot.restarts.pop_front();
        }
        if restart {
            if slot.restarts.len() >= MAX_RESTARTS {
                return (false, true);
            }
            slot.restarts.push_back(now);
        }
        (true, restart)
    });
    if !allowed {
        return Err(Failure::unavailable(format!(
            "VM restart limit reached ({MAX_RESTARTS} in {}s)",
            RESTART_WINDOW.as_secs()
        )));
    }
    if restart {
        plugin.metrics.restarts.inc();
        tracing::warn!(plugin = %plugin.name, "recreating the plugin VM after a failure");
    }
    let vm = Vm::start(plugin, true)?;
    WORKER_VMS.with(|m| {
        if let Some(slot) = m.borrow_mut().get_mut(&plugin.vm_key) {
            slot.vm = Some(vm.clone());
        }
    });
    let root = vm.create_root(plugin)?;
    Ok((vm, root))
}
