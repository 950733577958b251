//! `proxy_log` and `proxy_get_log_level`: module logs go to the process log
//! with the plugin name (see [`crate::plugin_log`]).

use lacewing_abi::{LogLevel, Status};
use wasmtime::{Caller, Linker};

use super::ENV;
use crate::memory::{self, HostResult, status};
use crate::vm::HostState;

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_log",
        |mut c: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| {
            status(log(&mut c, level, ptr, len))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_log_level",
        |mut c: Caller<'_, HostState>, ret: i32| {
            let level = c.data().plugin.host.log_level as u32;
            status(memory::write_u32(&mut c, ret, level).map_err(Into::into))
        },
    )?;
    Ok(())
}

/// How much of a module's last error line is kept for a refusal's reason.
const MAX_KEPT_ERROR: usize = 512;

fn log(caller: &mut Caller<'_, HostState>, level: i32, ptr: i32, len: i32) -> HostResult {
    let level = LogLevel::try_from(level as u32).map_err(|_| Status::BadArgument)?;
    let (data, state) = memory::split(caller)?;
    let message = memory::slice(data, ptr, len)?;
    if level as u32 >= LogLevel::Error as u32 {
        let mut line = String::from_utf8_lossy(message).into_owned();
        if line.len() > MAX_KEPT_ERROR {
            let mut end = MAX_KEPT_ERROR;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            line.truncate(end);
            line.push('…');
        }
        state.last_error_log = Some(line);
    }
    if (level as u32) < (state.plugin.host.log_level as u32) {
        return Ok(());
    }
    crate::plugin_log::emit(&state.plugin.name, level, message);
    Ok(())
}
