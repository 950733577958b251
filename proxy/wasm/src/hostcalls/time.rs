//! Time and the root context's tick timer.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lacewing_abi::Status;
use wasmtime::{Caller, Linker};

use super::{ENV, live_vm};
use crate::memory::{self, HostResult, status};
use crate::vm::HostState;

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, HostState>, ret: i32| {
            status(memory::write_u64(&mut c, ret, now_nanos()).map_err(Into::into))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_tick_period_milliseconds",
        |mut c: Caller<'_, HostState>, period: i32| status(set_tick_period(&mut c, period as u32)),
    )?;
    Ok(())
}

/// Wall-clock nanoseconds since the Unix epoch.
pub(crate) fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Arms (or with 0 disarms) the tick timer of the effective context's root on this worker.
fn set_tick_period(caller: &mut Caller<'_, HostState>, period_ms: u32) -> HostResult {
    let state = caller.data_mut();
    let root = state.effective_root();
    let spawn = state.spawn;
    let vm = state.vm.clone();
    let ctx = state.contexts.get_mut(&root).ok_or(Status::BadArgument)?;
    if let Some(old) = ctx.tick.take() {
        old.abort();
    }
    if period_ms == 0 || !spawn {
        // The load-time validation instance never ticks.
        return Ok(());
    }
    let period = Duration::from_millis(u64::from(period_ms));
    let task = crate::vm::spawn_local(async move {
        let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            interval.tick().await;
            let Some(vm) = live_vm(&vm) else { return };
            vm.deliver_tick(root);
        }
    });
    let task = task.ok_or(Status::InternalFailure)?;
    ctx.tick = Some(task.abort_handle());
    Ok(())
}
