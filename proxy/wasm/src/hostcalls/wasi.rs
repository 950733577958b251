//! The WASI preview 1 subset proxy-wasm modules import: stdout/stderr go to the
//! log with the plugin name, clocks, randomness, the configured environment,
//! no arguments, no files. `proc_exit` stops the module (a plugin failure).
//! The same functions are linked under the legacy name `wasi_unstable`: none
//! of them differs between the two snapshots in what this host does.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lacewing_abi::LogLevel;
use lacewing_abi::names::{LEGACY_WASI_MODULE, WASI_MODULE};
use rand::RngCore;
use wasmtime::{Caller, Linker};

use crate::memory;
use crate::vm::HostState;

const SUCCESS: i32 = 0;
const BADF: i32 = 8;
const FAULT: i32 = 21;
const INVAL: i32 = 28;
const NOTSUP: i32 = 58;
const SPIPE: i32 = 70;

const CLOCK_REALTIME: i32 = 0;
const CLOCK_MONOTONIC: i32 = 1;
/// Most bytes `random_get` fills per call.
const MAX_RANDOM_BYTES: usize = 64 * 1024;

/// Why a module stopped itself.
#[derive(Debug)]
pub(crate) struct ProcExit(pub i32);

impl std::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "module called proc_exit({})", self.0)
    }
}

impl std::error::Error for ProcExit {}

fn errno<T>(r: Result<T, lacewing_abi::Status>) -> i32 {
    match r {
        Ok(_) => SUCCESS,
        Err(_) => FAULT,
    }
}

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    let m = WASI_MODULE;
    linker.func_wrap(
        m,
        "fd_write",
        |mut c: Caller<'_, HostState>, fd: i32, iovs: i32, iovs_len: i32, ret_written: i32| {
            fd_write(&mut c, fd, iovs, iovs_len, ret_written)
        },
    )?;
    linker.func_wrap(
        m,
        "fd_read",
        |mut c: Caller<'_, HostState>, fd: i32, _iovs: i32, _iovs_len: i32, ret_read: i32| {
            if fd == 0 {
                // stdin is always at its end.
                errno(memory::write_u32(&mut c, ret_read, 0))
            } else {
                BADF
            }
        },
    )?;
    linker.func_wrap(m, "fd_close", |_: Caller<'_, HostState>, fd: i32| {
        if (0..=2).contains(&fd) { SUCCESS } else { BADF }
    })?;
    linker.func_wrap(
        m,
        "fd_seek",
        |_: Caller<'_, HostState>, fd: i32, _offset: i64, _whence: i32, _ret: i32| {
            if (0..=2).contains(&fd) { SPIPE } else { BADF }
        },
    )?;
    linker.func_wrap(
        m,
        "fd_fdstat_get",
        |mut c: Caller<'_, HostState>, fd: i32, ret: i32| {
            if !(0..=2).contains(&fd) {
                return BADF;
            }
            // filetype CHARACTER_DEVICE (2), no flags, no rights.
            let mut stat = [0u8; 24];
            stat[0] = 2;
            match memory::split(&mut c) {
                Ok((data, _)) => errno(memory::write(data, ret, &stat)),
                Err(_) => FAULT,
            }
        },
    )?;
    // No preopened directories: BADF ends the module's preopen scan.
    linker.func_wrap(
        m,
        "fd_prestat_get",
        |_: Caller<'_, HostState>, _fd: i32, _ret: i32| BADF,
    )?;
    linker.func_wrap(
        m,
        "fd_prestat_dir_name",
        |_: Caller<'_, HostState>, _fd: i32, _ptr: i32, _len: i32| BADF,
    )?;
    linker.func_wrap(
        m,
        "clock_time_get",
        |mut c: Caller<'_, HostState>, id: i32, _precision: i64, ret: i32| {
            let now = match id {
                CLOCK_REALTIME => SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or(Duration::ZERO),
                CLOCK_MONOTONIC => c.data().plugin.host.started.elapsed(),
                _ => return INVAL,
            };
            errno(memory::write_u64(&mut c, ret, now.as_nanos() as u64))
        },
    )?;
    linker.func_wrap(
        m,
        "clock_res_get",
        |mut c: Caller<'_, HostState>, id: i32, ret: i32| match id {
            CLOCK_REALTIME | CLOCK_MONOTONIC => errno(memory::write_u64(&mut c, ret, 1_000)),
            _ => INVAL,
        },
    )?;
    linker.func_wrap(
        m,
        "random_get",
        |mut c: Caller<'_, HostState>, ptr: i32, len: i32| {
            if len as u32 as usize > MAX_RANDOM_BYTES {
                return INVAL;
            }
            let Ok((data, _)) = memory::split(&mut c) else {
                return FAULT;
            };
            match memory::range(ptr, len, data.len()) {
                Ok(r) => {
                    rand::rng().fill_bytes(&mut data[r]);
                    SUCCESS
                }
                Err(_) => FAULT,
            }
        },
    )?;
    linker.func_wrap(
        m,
        "environ_sizes_get",
        |mut c: Caller<'_, HostState>, ret_count: i32, ret_size: i32| {
            let env = &c.data().env;
            let (count, size) = (
                env.len() as u32,
                env.iter().map(|e| e.len() + 1).sum::<usize>() as u32,
            );
            errno(
                memory::write_u32(&mut c, ret_count, count)
                    .and_then(|_| memory::write_u32(&mut c, ret_size, size)),
            )
        },
    )?;
    linker.func_wrap(
        m,
        "environ_get",
        |mut c: Caller<'_, HostState>, ptrs: i32, buf: i32| {
            let Ok((data, state)) = memory::split(&mut c) else {
                return FAULT;
            };
            let mut at = buf as u32;
            for (i, entry) in state.env.iter().enumerate() {
                let slot = ptrs.wrapping_add((i * 4) as i32);
                if memory::write(data, slot, &at.to_le_bytes()).is_err() {
                    return FAULT;
                }
                let mut bytes = entry.as_bytes().to_vec();
                bytes.push(0);
                if memory::write(data, at as i32, &bytes).is_err() {
                    return FAULT;
                }
                at = at.wrapping_add(bytes.len() as u32);
            }
            SUCCESS
        },
    )?;
    linker.func_wrap(
        m,
        "args_sizes_get",
        |mut c: Caller<'_, HostState>, ret_count: i32, ret_size: i32| {
            errno(
                memory::write_u32(&mut c, ret_count, 0)
                    .and_then(|_| memory::write_u32(&mut c, ret_size, 0)),
            )
        },
    )?;
    linker.func_wrap(
        m,
        "args_get",
        |_: Caller<'_, HostState>, _ptrs: i32, _buf: i32| SUCCESS,
    )?;
    linker.func_wrap(
        m,
        "proc_exit",
        |mut c: Caller<'_, HostState>, code: i32| -> wasmtime::Result<()> {
            c.data_mut().failure_note = Some(ProcExit(code).to_string());
            Err(wasmtime::Error::new(ProcExit(code)))
        },
    )?;
    linker.func_wrap(m, "sched_yield", |_: Caller<'_, HostState>| SUCCESS)?;
    linker.func_wrap(
        m,
        "poll_oneoff",
        |_: Caller<'_, HostState>, _in: i32, _out: i32, _n: i32, _ret: i32| NOTSUP,
    )?;
    linker.alias_module(WASI_MODULE, LEGACY_WASI_MODULE)?;
    Ok(())
}

fn fd_write(
    caller: &mut Caller<'_, HostState>,
    fd: i32,
    iovs: i32,
    iovs_len: i32,
    ret_written: i32,
) -> i32 {
    let level = match fd {
        1 => LogLevel::Info,
        2 => LogLevel::Error,
        _ => return BADF,
    };
    if !(0..=1024).contains(&iovs_len) {
        return INVAL;
    }
    let Ok((data, state)) = memory::split(caller) else {
        return FAULT;
    };
    let Ok(iov_range) = memory::range(iovs, iovs_len * 8, data.len()) else {
        return FAULT;
    };
    let mut text = Vec::new();
    for iov in data[iov_range].chunks_exact(8) {
        let ptr = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
        let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
        match memory::slice(data, ptr, len) {
            Ok(bytes) => text.extend_from_slice(bytes),
            Err(_) => return FAULT,
        }
    }
    let written = text.len() as u32;
    let message = String::from_utf8_lossy(&text);
    for line in message.lines().filter(|l| !l.is_empty()) {
        crate::plugin_log::emit(&state.plugin.name, level, line.as_bytes());
    }
    errno(memory::write(data, ret_written, &written.to_le_bytes()))
}
