//! gRPC callouts: unary calls and streams to a configured cluster; events come
//! back as `proxy_on_grpc_receive_initial_metadata`, `_receive`,
//! `_receive_trailing_metadata` and `_close` on the calling context.

use std::time::Duration;

use bytes::Bytes;
use lacewing_abi::Status;
use tokio::sync::mpsc;
use wasmtime::{Caller, Linker};

use super::http_call::{begin_callout, owned_pairs};
use super::{ENV, spawn_delivery};
use crate::callout::GrpcEvent;
use crate::memory::{self, HostResult, status};
use crate::vm::{GrpcCall, HostState};

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_grpc_call",
        |mut c: Caller<'_, HostState>,
         service_ptr: i32,
         service_len: i32,
         name_ptr: i32,
         name_len: i32,
         method_ptr: i32,
         method_len: i32,
         md_ptr: i32,
         md_len: i32,
         msg_ptr: i32,
         msg_len: i32,
         timeout_ms: i32,
         ret_token: i32| {
            let target = Target {
                cluster: (service_ptr, service_len),
                service: (name_ptr, name_len),
                method: (method_ptr, method_len),
                metadata: (md_ptr, md_len),
            };
            status(start(
                &mut c,
                target,
                Some((msg_ptr, msg_len)),
                Some(timeout_ms as u32),
                ret_token,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_grpc_stream",
        |mut c: Caller<'_, HostState>,
         service_ptr: i32,
         service_len: i32,
         name_ptr: i32,
         name_len: i32,
         method_ptr: i32,
         method_len: i32,
         md_ptr: i32,
         md_len: i32,
         ret_token: i32| {
            let target = Target {
                cluster: (service_ptr, service_len),
                service: (name_ptr, name_len),
                method: (method_ptr, method_len),
                metadata: (md_ptr, md_len),
            };
            status(start(&mut c, target, None, None, ret_token))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_grpc_send",
        |mut c: Caller<'_, HostState>, token: i32, ptr: i32, len: i32, end: i32| {
            status(send(&mut c, token as u32, ptr, len, end != 0))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_grpc_cancel",
        |mut c: Caller<'_, HostState>, token: i32| {
            let state = c.data_mut();
            match state.grpc_calls.remove(&(token as u32)) {
                Some(call) => {
                    if let Some(h) = call.handle {
                        h.cancel();
                    }
                    Status::Ok.code()
                }
                None => Status::NotFound.code(),
            }
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_grpc_close",
        |mut c: Caller<'_, HostState>, token: i32| {
            let state = c.data_mut();
            match state.grpc_calls.get(&(token as u32)) {
                Some(call) => {
                    if let Some(h) = &call.handle {
                        h.close();
                    }
                    Status::Ok.code()
                }
                None => Status::NotFound.code(),
            }
        },
    )?;
    Ok(())
}

/// Guest ranges naming a gRPC method and its metadata.
struct Target {
    cluster: (i32, i32),
    service: (i32, i32),
    method: (i32, i32),
    metadata: (i32, i32),
}

fn text(data: &[u8], range: (i32, i32)) -> Result<String, Status> {
    let bytes = memory::slice(data, range.0, range.1)?;
    std::str::from_utf8(bytes)
        .map(str::to_string)
        .map_err(|_| Status::BadArgument)
}

fn start(
    caller: &mut Caller<'_, HostState>,
    target: Target,
    message: Option<(i32, i32)>,
    timeout_ms: Option<u32>,
    ret_token: i32,
) -> HostResult {
    let (cluster, service, method, metadata, message) = {
        let (data, _) = memory::split(caller)?;
        let message = match message {
            Some((ptr, len)) => Some(Bytes::copy_from_slice(memory::slice(data, ptr, len)?)),
            None => None,
        };
        (
            text(data, target.cluster)?,
            text(data, target.service)?,
            text(data, target.method)?,
            owned_pairs(memory::slice(data, target.metadata.0, target.metadata.1)?)?,
            message,
        )
    };
    if service.is_empty() || method.is_empty() {
        return Err(Status::BadArgument.into());
    }
    let (token, context) = begin_callout(caller, &cluster, ret_token)?;
    let state = caller.data_mut();
    let handle = if state.spawn {
        let (tx, rx) = mpsc::unbounded_channel::<GrpcEvent>();
        let task = spawn_delivery(state.vm.clone(), rx, move |vm, event| {
            vm.deliver_grpc(token, event);
        });
        if task.is_none() {
            return Err(Status::InternalFailure.into());
        }
        let timeout = timeout_ms
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(u64::from(ms)));
        let handle = crate::callout::grpc_start(
            state.plugin.upstreams.clone(),
            cluster,
            service,
            method,
            metadata,
            timeout,
            tx,
        );
        if let Some(message) = message {
            // A send failure surfaces as a close event on the stream.
            let _ = handle.send(message, true);
        }
        Some(handle)
    } else {
        None
    };
    state.grpc_calls.insert(token, GrpcCall { context, handle });
    memory::write_u32(caller, ret_token, token)?;
    Ok(())
}

fn send(
    caller: &mut Caller<'_, HostState>,
    token: u32,
    ptr: i32,
    len: i32,
    end_of_stream: bool,
) -> HostResult {
    let (data, state) = memory::split(caller)?;
    let message = Bytes::copy_from_slice(memory::slice(data, ptr, len)?);
    let call = state.grpc_calls.get(&token).ok_or(Status::NotFound)?;
    match &call.handle {
        Some(h) => h
            .send(message, end_of_stream)
            .map_err(|_| Status::BadArgument.into()),
        None => Ok(()),
    }
}
