//! Buffers: request/response bodies, TCP data, the callout response body or gRPC
//! message, the VM and plugin configuration, foreign-function arguments.

use bytes::{Bytes, BytesMut};
use lacewing_abi::{BufferType, Status};
use wasmtime::{Caller, Linker};

use super::ENV;
use crate::memory::{self, HostResult, status};
use crate::vm::{CtxKind, HostState};

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, HostState>,
         kind: i32,
         start: i32,
         max: i32,
         ret_ptr: i32,
         ret_len: i32| { status(get_bytes(&mut c, kind, start, max, ret_ptr, ret_len)) },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, HostState>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| {
            status(set_bytes(&mut c, kind, start, size, ptr, len))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_buffer_status",
        |mut c: Caller<'_, HostState>, kind: i32, ret_len: i32, ret_flags: i32| {
            status(get_status(&mut c, kind, ret_len, ret_flags))
        },
    )?;
    // ABI 0.1.0: the plugin configuration.
    linker.func_wrap(
        ENV,
        "proxy_get_configuration",
        |mut c: Caller<'_, HostState>, ret_ptr: i32, ret_len: i32| {
            let config = c.data().plugin.plugin_config.clone();
            status(memory::give(&mut c, &config, ret_ptr, ret_len))
        },
    )?;
    Ok(())
}

fn buffer_type(kind: i32) -> Result<BufferType, Status> {
    BufferType::try_from(kind as u32).map_err(|_| Status::BadArgument)
}

/// A copy of the bytes `start..start+max` (clamped) of a buffer.
fn read_buffer(
    state: &HostState,
    kind: BufferType,
    start: usize,
    max: usize,
) -> Result<Bytes, Status> {
    let clamped = |len: usize| {
        let from = start.min(len);
        from..from.saturating_add(max).min(len)
    };
    let window = |b: &[u8]| Bytes::copy_from_slice(&b[clamped(b.len())]);
    let shared = |b: &Bytes| b.slice(clamped(b.len()));
    match kind {
        BufferType::HttpRequestBody | BufferType::HttpResponseBody => {
            match state.effective().map(|c| &c.kind) {
                Some(CtxKind::Http(stream)) => {
                    let s = stream.try_borrow().map_err(|_| Status::InternalFailure)?;
                    Ok(window(if kind == BufferType::HttpRequestBody {
                        &s.request_body
                    } else {
                        &s.response_body
                    }))
                }
                _ => Err(Status::NotFound),
            }
        }
        BufferType::DownstreamData | BufferType::UpstreamData => {
            match state.effective().map(|c| &c.kind) {
                Some(CtxKind::Net(conn)) => {
                    let c = conn.try_borrow().map_err(|_| Status::InternalFailure)?;
                    Ok(window(if kind == BufferType::DownstreamData {
                        &c.downstream_data
                    } else {
                        &c.upstream_data
                    }))
                }
                _ => Err(Status::NotFound),
            }
        }
        BufferType::HttpCallResponseBody | BufferType::GrpcReceiveBuffer => state
            .current
            .callout
            .as_ref()
            .map(|c| shared(&c.body))
            .ok_or(Status::NotFound),
        BufferType::VmConfiguration => Ok(shared(&state.plugin.vm_config)),
        BufferType::PluginConfiguration => Ok(shared(&state.plugin.plugin_config)),
        BufferType::ForeignFunctionArguments => state
            .current
            .foreign_args
            .as_ref()
            .map(shared)
            .ok_or(Status::NotFound),
    }
}

fn get_bytes(
    caller: &mut Caller<'_, HostState>,
    kind: i32,
    start: i32,
    max: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> HostResult {
    let kind = buffer_type(kind)?;
    let bytes = read_buffer(
        caller.data(),
        kind,
        start as u32 as usize,
        max as u32 as usize,
    )?;
    memory::give(caller, &bytes, ret_ptr, ret_len)
}

fn get_status(
    caller: &mut Caller<'_, HostState>,
    kind: i32,
    ret_len: i32,
    ret_flags: i32,
) -> HostResult {
    let kind = buffer_type(kind)?;
    let len = read_buffer(caller.data(), kind, 0, usize::MAX)?.len();
    memory::write_u32(caller, ret_len, len as u32)?;
    memory::write_u32(caller, ret_flags, 0)?;
    Ok(())
}

/// Replaces `size` bytes at `start` with `data`: `start = 0, size = 0` prepends,
/// `start >= len` appends, `start = 0, size >= len` replaces everything.
pub(crate) fn splice(buffer: &mut BytesMut, start: usize, size: usize, data: &[u8]) {
    let from = start.min(buffer.len());
    let to = from.saturating_add(size).min(buffer.len());
    if from == 0 && to == buffer.len() {
        buffer.clear();
        buffer.extend_from_slice(data);
        return;
    }
    if from == buffer.len() {
        buffer.extend_from_slice(data);
        return;
    }
    let tail = buffer.split_off(to);
    buffer.truncate(from);
    buffer.extend_from_slice(data);
    buffer.unsplit(tail);
}

fn set_bytes(
    caller: &mut Caller<'_, HostState>,
    kind: i32,
    start: i32,
    size: i32,
    ptr: i32,
    len: i32,
) -> HostResult {
    let kind = buffer_type(kind)?;
    let (data, state) = memory::split(caller)?;
    let bytes = memory::slice(data, ptr, len)?;
    let (start, size) = (start as u32 as usize, size as u32 as usize);
    match (kind, state.effective().map(|c| &c.kind)) {
        (
            BufferType::HttpRequestBody | BufferType::HttpResponseBody,
            Some(CtxKind::Http(stream)),
        ) => {
            let mut s = stream
                .try_borrow_mut()
                .map_err(|_| Status::InternalFailure)?;
            let buffer = if kind == BufferType::HttpRequestBody {
                &mut s.request_body
            } else {
                &mut s.response_body
            };
            splice(buffer, start, size, bytes);
            Ok(())
        }
        (BufferType::DownstreamData | BufferType::UpstreamData, Some(CtxKind::Net(conn))) => {
            let mut c = conn.try_borrow_mut().map_err(|_| Status::InternalFailure)?;
            let buffer = if kind == BufferType::DownstreamData {
                &mut c.downstream_data
            } else {
                &mut c.upstream_data
            };
            splice(buffer, start, size, bytes);
            Ok(())
        }
        (
            BufferType::HttpRequestBody
            | BufferType::HttpResponseBody
            | BufferType::DownstreamData
            | BufferType::UpstreamData,
            _,
        ) => Err(Status::NotFound.into()),
        // Callout bodies, configurations and arguments are read-only.
        _ => Err(Status::BadArgument.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::splice;
    use bytes::BytesMut;

    fn spliced(start: usize, size: usize, data: &str) -> String {
        let mut b = BytesMut::from("hello world");
        splice(&mut b, start, size, data.as_bytes());
        String::from_utf8(b.to_vec()).unwrap()
    }

    #[test]
    fn splice_semantics() {
        assert_eq!(spliced(0, 0, ">> "), ">> hello world");
        assert_eq!(spliced(11, 0, "!"), "hello world!");
        assert_eq!(spliced(100, 5, "!"), "hello world!");
        assert_eq!(spliced(0, 11, "bye"), "bye");
        assert_eq!(spliced(0, usize::MAX, "bye"), "bye");
        assert_eq!(spliced(6, 5, "there"), "hello there");
        assert_eq!(spliced(5, 1, ""), "helloworld");
    }
}
