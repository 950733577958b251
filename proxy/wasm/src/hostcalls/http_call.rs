//! `proxy_http_call`: an HTTP request to a configured cluster, answered later
//! with `proxy_on_http_call_response` on the calling context.

use std::time::Duration;

use bytes::Bytes;
use lacewing_abi::{Status, pairs};
use wasmtime::{Caller, Linker};

use super::{ENV, live_vm};
use crate::memory::{self, HostResult, status};
use crate::vm::HostState;

/// The timeout of a call made with a timeout of 0.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_http_call",
        |mut c: Caller<'_, HostState>,
         upstream_ptr: i32,
         upstream_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         body_ptr: i32,
         body_len: i32,
         trailers_ptr: i32,
         trailers_len: i32,
         timeout_ms: i32,
         ret_token: i32| {
            // Envoy reads the timeout as a signed 32-bit number of milliseconds.
            let Ok(timeout_ms) = u32::try_from(timeout_ms) else {
                return Ok(Status::BadArgument.code());
            };
            status(http_call(
                &mut c,
                (upstream_ptr, upstream_len),
                (headers_ptr, headers_len),
                (body_ptr, body_len),
                (trailers_ptr, trailers_len),
                timeout_ms,
                ret_token,
            ))
        },
    )?;
    Ok(())
}

/// Decoded pairs as owned names and values.
pub(crate) fn owned_pairs(bytes: &[u8]) -> Result<Vec<(String, Bytes)>, Status> {
    let list = pairs::decode(bytes).map_err(|_| Status::BadArgument)?;
    list.into_iter()
        .map(|(k, v)| {
            let k = std::str::from_utf8(k).map_err(|_| Status::BadArgument)?;
            Ok((k.to_string(), Bytes::copy_from_slice(v)))
        })
        .collect()
}

/// Whether the plugin may call `cluster`: allowed by its list (when it has one) and configured.
pub(crate) fn check_cluster(state: &HostState, cluster: &str) -> Result<(), Status> {
    let allowed = &state.plugin.cfg.allowed_clusters;
    if !allowed.is_empty() && !allowed.iter().any(|c| c == cluster) {
        return Err(Status::BadArgument);
    }
    if !state.plugin.upstreams.has_cluster(cluster) {
        return Err(Status::BadArgument);
    }
    Ok(())
}

/// What every callout starts with: the plugin may call `cluster`, and the token
/// out-param is writable (checked before anything starts). Returns a new token
/// and the context the callout's events go to.
pub(crate) fn begin_callout(
    caller: &mut Caller<'_, HostState>,
    cluster: &str,
    ret_token: i32,
) -> HostResult<(u32, u32)> {
    check_cluster(caller.data(), cluster)?;
    memory::write_u32(caller, ret_token, 0)?;
    let state = caller.data_mut();
    Ok((state.new_token(), state.current.effective))
}

fn http_call(
    caller: &mut Caller<'_, HostState>,
    upstream: (i32, i32),
    headers: (i32, i32),
    body: (i32, i32),
    trailers: (i32, i32),
    timeout_ms: u32,
    ret_token: i32,
) -> HostResult {
    let (cluster, headers, body, trailers) = {
        let (data, _) = memory::split(caller)?;
        let cluster = std::str::from_utf8(memory::slice(data, upstream.0, upstream.1)?)
            .map_err(|_| Status::BadArgument)?
            .to_string();
        let headers = owned_pairs(memory::slice(data, headers.0, headers.1)?)?;
        let body = Bytes::copy_from_slice(memory::slice(data, body.0, body.1)?);
        let trailers = owned_pairs(memory::slice(data, trailers.0, trailers.1)?)?;
        (cluster, headers, body, trailers)
    };
    // As in Envoy, `host` stands for a missing `:authority`.
    let present = |name: &str| headers.iter().any(|(k, v)| k == name && !v.is_empty());
    if !present(":method") || !present(":path") || !(present(":authority") || present("host")) {
        return Err(Status::BadArgument.into());
    }
    let (token, context) = begin_callout(caller, &cluster, ret_token)?;
    let state = caller.data_mut();
    if state.spawn {
        let upstreams = state.plugin.upstreams.clone();
        let vm = state.vm.clone();
        let timeout = match timeout_ms {
            0 => DEFAULT_TIMEOUT,
            ms => Duration::from_millis(u64::from(ms)),
        };
        let task = crate::vm::spawn_local(async move {
            let result =
                crate::callout::http_call(upstreams, cluster, headers, body, trailers, timeout)
                    .await;
            if let Some(vm) = live_vm(&vm) {
                vm.deliver_http_response(token, result.map_err(|e| e.to_string()));
            }
        });
        if task.is_none() {
            return Err(Status::InternalFailure.into());
        }
        state.http_calls.insert(token, context);
    }
    memory::write_u32(caller, ret_token, token)?;
    Ok(())
}
