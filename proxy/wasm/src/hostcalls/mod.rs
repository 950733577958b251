//! The host functions, one file per ABI area; each adds itself to the `Linker`.

use std::rc::{Rc, Weak};

use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use wasmtime::Linker;

use crate::vm::{HostState, Vm};

mod buffers;
mod foreign;
mod grpc;
mod http_call;
mod log;
mod maps;
mod metrics;
mod properties;
mod queues;
mod shared_data;
mod stream;
mod time;
mod wasi;

/// The request header pairs as `proxy_get_header_map_pairs` serializes them.
#[cfg(test)]
pub(crate) fn request_pairs_for_tests<'a>(
    stream: &'a lacewing_core::stream::HttpStream,
    out: &mut Vec<(&'a [u8], &'a [u8])>,
) {
    maps::request_pairs(stream, out);
}

/// Module name of proxy-wasm imports.
const ENV: &str = lacewing_abi::names::ENV_MODULE;

/// The VM behind `vm` while it is alive and not broken: the only state in which
/// a callout, queue or timer event is still delivered to it.
fn live_vm(vm: &Weak<Vm>) -> Option<Rc<Vm>> {
    vm.upgrade().filter(|vm| !vm.broken.get())
}

/// Spawns the task that hands each of `events` to the VM, ending once the VM
/// is gone or broken. `None` where no task can be spawned.
fn spawn_delivery<T: 'static>(
    vm: Weak<Vm>,
    mut events: mpsc::UnboundedReceiver<T>,
    deliver: impl Fn(&Vm, T) + 'static,
) -> Option<JoinHandle<()>> {
    crate::vm::spawn_local(async move {
        while let Some(event) = events.recv().await {
            let Some(vm) = live_vm(&vm) else { return };
            deliver(&vm, event);
        }
    })
}

/// Links every proxy-wasm (0.1.0, 0.2.0, 0.2.1) and WASI preview 1 import.
pub(crate) fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    log::add(linker)?;
    maps::add(linker)?;
    buffers::add(linker)?;
    properties::add(linker)?;
    stream::add(linker)?;
    time::add(linker)?;
    shared_data::add(linker)?;
    queues::add(linker)?;
    metrics::add(linker)?;
    http_call::add(linker)?;
    grpc::add(linker)?;
    foreign::add(linker)?;
    wasi::add(linker)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_import_is_linked() {
        let engine = wasmtime::Engine::default();
        let mut linker = Linker::<HostState>::new(&engine);
        add_to_linker(&mut linker).unwrap();
        // Defining a name again fails exactly when it is already linked.
        let env = lacewing_abi::names::ALL_IMPORTS.iter().map(|n| (ENV, *n));
        let wasi = lacewing_abi::names::WASI_MODULES.iter().flat_map(|module| {
            lacewing_abi::names::WASI_IMPORTS
                .iter()
                .map(move |name| (*module, *name))
        });
        for (module, name) in env.chain(wasi) {
            assert!(
                linker.func_wrap(module, name, || {}).is_err(),
                "{module}.{name} is not linked"
            );
        }
    }
}
