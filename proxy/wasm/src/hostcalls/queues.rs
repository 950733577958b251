//! Shared queues: registered per VM id, readable by any VM; an enqueue wakes a
//! registering VM on its own worker thread with `proxy_on_queue_ready`.

use bytes::Bytes;
use lacewing_abi::Status;
use tokio::sync::mpsc;
use wasmtime::{Caller, Linker};

use super::{ENV, spawn_delivery};
use crate::memory::{self, HostResult, status};
use crate::queues::{QueueError, QueueWaker};
use crate::vm::{HostState, Vm};

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_register_shared_queue",
        |mut c: Caller<'_, HostState>, name_ptr: i32, name_len: i32, ret_id: i32| {
            status(register(&mut c, name_ptr, name_len, ret_id))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_resolve_shared_queue",
        |mut c: Caller<'_, HostState>,
         vm_ptr: i32,
         vm_len: i32,
         name_ptr: i32,
         name_len: i32,
         ret_id: i32| {
            status(resolve(
                &mut c,
                (vm_ptr, vm_len),
                (name_ptr, name_len),
                ret_id,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_enqueue_shared_queue",
        |mut c: Caller<'_, HostState>, id: i32, ptr: i32, len: i32| {
            status(enqueue(&mut c, id as u32, ptr, len))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_dequeue_shared_queue",
        |mut c: Caller<'_, HostState>, id: i32, ret_ptr: i32, ret_len: i32| {
            status(dequeue(&mut c, id as u32, ret_ptr, ret_len))
        },
    )?;
    Ok(())
}

/// This VM's waker; the first registration starts the task that delivers `proxy_on_queue_ready`.
fn waker(state: &mut HostState) -> QueueWaker {
    if let Some(tx) = &state.queue_tx {
        return QueueWaker::new(tx.clone());
    }
    let (tx, rx) = mpsc::unbounded_channel::<u32>();
    if state.spawn {
        let task = spawn_delivery(state.vm.clone(), rx, Vm::deliver_queue_ready);
        if task.is_some() {
            state.queue_tx = Some(tx.clone());
        }
    }
    // Without a task (load-time validation) the receiver is dropped and the waker is dead.
    QueueWaker::new(tx)
}

fn register(
    caller: &mut Caller<'_, HostState>,
    name_ptr: i32,
    name_len: i32,
    ret_id: i32,
) -> HostResult {
    let name = memory::read_string(caller, name_ptr, name_len)?;
    let state = caller.data_mut();
    let waker = waker(state);
    let vm_id = state.plugin.cfg.vm_id.clone();
    let id = state.plugin.host.queues.register(&vm_id, &name, waker);
    let root = state.effective_root();
    state.queue_owners.insert(id, root);
    memory::write_u32(caller, ret_id, id)?;
    Ok(())
}

fn resolve(
    caller: &mut Caller<'_, HostState>,
    vm_id: (i32, i32),
    name: (i32, i32),
    ret_id: i32,
) -> HostResult {
    let vm_id = memory::read_string(caller, vm_id.0, vm_id.1)?;
    let name = memory::read_string(caller, name.0, name.1)?;
    let id = caller
        .data()
        .plugin
        .host
        .queues
        .resolve(&vm_id, &name)
        .ok_or(Status::NotFound)?;
    memory::write_u32(caller, ret_id, id)?;
    Ok(())
}

fn enqueue(caller: &mut Caller<'_, HostState>, id: u32, ptr: i32, len: i32) -> HostResult {
    let (data, state) = memory::split(caller)?;
    let value = Bytes::copy_from_slice(memory::slice(data, ptr, len)?);
    match state.plugin.host.queues.enqueue(id, value) {
        Ok(()) => Ok(()),
        Err(QueueError::NotFound(_)) => Err(Status::NotFound.into()),
        Err(_) => Err(Status::InternalFailure.into()),
    }
}

fn dequeue(caller: &mut Caller<'_, HostState>, id: u32, ret_ptr: i32, ret_len: i32) -> HostResult {
    let item = match caller.data().plugin.host.queues.dequeue(id) {
        Ok(Some(item)) => item,
        Ok(None) => return Err(Status::Empty.into()),
        Err(QueueError::NotFound(_)) => return Err(Status::NotFound.into()),
        Err(_) => return Err(Status::InternalFailure.into()),
    };
    memory::give(caller, &item, ret_ptr, ret_len)
}
