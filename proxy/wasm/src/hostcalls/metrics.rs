//! Plugin-defined metrics, exported on the proxy's `/metrics` labelled with the plugin.

use lacewing_abi::{MetricType, Status};
use wasmtime::{Caller, Linker};

use super::ENV;
use crate::memory::{self, HostResult, status};
use crate::plugin_metrics::{MetricError, metric_name};
use crate::vm::HostState;

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_define_metric",
        |mut c: Caller<'_, HostState>, kind: i32, name_ptr: i32, name_len: i32, ret_id: i32| {
            status(define(&mut c, kind, name_ptr, name_len, ret_id))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_increment_metric",
        |c: Caller<'_, HostState>, id: i32, delta: i64| {
            status(
                c.data()
                    .plugin
                    .host
                    .plugin_metrics
                    .increment(id as u32, delta)
                    .map_err(to_status),
            )
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_record_metric",
        |c: Caller<'_, HostState>, id: i32, value: i64| {
            status(
                c.data()
                    .plugin
                    .host
                    .plugin_metrics
                    .record(id as u32, value as u64)
                    .map_err(to_status),
            )
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_metric",
        |mut c: Caller<'_, HostState>, id: i32, ret: i32| {
            let value = c.data().plugin.host.plugin_metrics.get(id as u32);
            status(
                value
                    .map_err(to_status)
                    .and_then(|v| memory::write_u64(&mut c, ret, v).map_err(Into::into)),
            )
        },
    )?;
    Ok(())
}

fn to_status(e: MetricError) -> crate::memory::HostError {
    match e {
        MetricError::NotFound(_) => Status::NotFound.into(),
        MetricError::BadArgument(_) | MetricError::TooMany { .. } => Status::BadArgument.into(),
        MetricError::Unsupported(_) => Status::Unimplemented.into(),
    }
}

fn define(
    caller: &mut Caller<'_, HostState>,
    kind: i32,
    name_ptr: i32,
    name_len: i32,
    ret_id: i32,
) -> HostResult {
    let kind = MetricType::try_from(kind as u32).map_err(|_| Status::BadArgument)?;
    let id = {
        let (data, state) = memory::split(caller)?;
        let name = metric_name(memory::slice(data, name_ptr, name_len)?).map_err(to_status)?;
        state
            .plugin
            .host
            .plugin_metrics
            .define(&state.plugin.name, kind.into(), name)
            .map_err(to_status)?
    };
    memory::write_u32(caller, ret_id, id)?;
    Ok(())
}
