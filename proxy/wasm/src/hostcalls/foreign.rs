//! `proxy_call_foreign_function`: host functions beyond the ABI.
//!
//! - `sha256`: the SHA-256 digest (32 raw bytes) of the arguments.
//! - `hex_encode`: the arguments as lower-case hex.
//! - `hex_decode`: hex text back to bytes (`BadArgument` when it is not hex).
//! - `lacewing_unused_callbacks`: the module names stream callbacks it does
//!   nothing in (export names, `\n`-separated); the plugin skips them from
//!   then on (see [`UNUSED_CALLBACKS_FUNCTION`]). Unknown names are ignored.
//! - `lacewing_return_buffer`: the module lends a buffer for returned values
//!   (see [`RETURN_BUFFER_FUNCTION`]); `BadArgument` when the arguments are
//!   not three `u32`s naming a flag and a buffer inside its memory.
//!
//! Any other name is `NotFound`.

use std::sync::atomic::Ordering;

use lacewing_abi::Status;
use lacewing_abi::names::{RETURN_BUFFER_FUNCTION, RETURN_BUFFER_MAX, UNUSED_CALLBACKS_FUNCTION};
use sha2::{Digest, Sha256};
use wasmtime::{Caller, Linker};

use super::ENV;
use crate::engine::hex;
use crate::exports::Callback;
use crate::memory::{self, HostResult, status};
use crate::state::ReturnBuffer;
use crate::vm::HostState;

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_call_foreign_function",
        |mut c: Caller<'_, HostState>,
         name_ptr: i32,
         name_len: i32,
         args_ptr: i32,
         args_len: i32,
         ret_ptr: i32,
         ret_len: i32| {
            status(call(
                &mut c,
                (name_ptr, name_len),
                (args_ptr, args_len),
                ret_ptr,
                ret_len,
            ))
        },
    )?;
    Ok(())
}

/// Runs a foreign function by name.
pub(crate) fn run(name: &[u8], args: &[u8]) -> Result<Vec<u8>, Status> {
    match name {
        b"sha256" => Ok(Sha256::digest(args).to_vec()),
        b"hex_encode" => Ok(hex(args).into_bytes()),
        b"hex_decode" => unhex(args).ok_or(Status::BadArgument),
        _ => Err(Status::NotFound),
    }
}

fn unhex(text: &[u8]) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.chunks(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

/// The bits of the callbacks `args` names (see [`UNUSED_CALLBACKS_FUNCTION`]).
fn unused_callbacks(args: &[u8]) -> u32 {
    args.split(|&b| b == b'\n')
        .filter_map(|name| Callback::skippable(name.trim_ascii()))
        .fold(0, |bits, c| bits | c.bit())
}

/// The buffer `args` lends (see [`RETURN_BUFFER_FUNCTION`]), checked to lie
/// inside the module's memory of `memory_len` bytes (which never shrinks).
fn return_buffer(args: &[u8], memory_len: usize) -> Result<ReturnBuffer, Status> {
    if args.len() != 12 {
        return Err(Status::BadArgument);
    }
    // In bounds: the length is checked above.
    let word = |at: usize| u32::from_le_bytes([args[at], args[at + 1], args[at + 2], args[at + 3]]);
    let lent = ReturnBuffer {
        flag: word(0),
        buf: word(4),
        cap: word(8),
    };
    let inside = |ptr: u32, len: u32| {
        (ptr as usize)
            .checked_add(len as usize)
            .is_some_and(|end| end <= memory_len)
    };
    if lent.cap == 0
        || lent.cap > RETURN_BUFFER_MAX
        || !inside(lent.flag, 1)
        || !inside(lent.buf, lent.cap)
    {
        return Err(Status::BadArgument);
    }
    Ok(lent)
}

fn call(
    caller: &mut Caller<'_, HostState>,
    name: (i32, i32),
    args: (i32, i32),
    ret_ptr: i32,
    ret_len: i32,
) -> HostResult {
    let result = {
        let (data, state) = memory::split(caller)?;
        let name = memory::slice(data, name.0, name.1)?;
        let args = memory::slice(data, args.0, args.1)?;
        if name == UNUSED_CALLBACKS_FUNCTION.as_bytes() {
            let bits = unused_callbacks(args);
            let plugin = &state.plugin;
            let before = plugin.unused_callbacks.fetch_or(bits, Ordering::Relaxed);
            if before | bits != before {
                tracing::debug!(plugin = %plugin.name, callbacks = %String::from_utf8_lossy(args), "plugin skips the callbacks it does not use");
            }
            Vec::new()
        } else if name == RETURN_BUFFER_FUNCTION.as_bytes() {
            state.return_buffer = Some(return_buffer(args, data.len())?);
            Vec::new()
        } else {
            run(name, args)?
        }
    };
    memory::give(caller, &result, ret_ptr, ret_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins() {
        assert_eq!(
            hex(&run(b"sha256", b"abc").unwrap()),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(run(b"hex_encode", b"\x01\xab").unwrap(), b"01ab");
        assert_eq!(run(b"hex_decode", b"01AB").unwrap(), b"\x01\xab");
        assert_eq!(run(b"hex_decode", b"0g"), Err(Status::BadArgument));
        assert_eq!(run(b"nope", b""), Err(Status::NotFound));
    }

    #[test]
    fn unused_callbacks_are_read_by_export_name() {
        assert_eq!(
            unused_callbacks(b"proxy_on_response_body\nproxy_on_done"),
            Callback::ResponseBody.bit() | Callback::Done.bit()
        );
        // Callbacks a module must not skip, unknown names and noise count for nothing.
        assert_eq!(
            unused_callbacks(b"proxy_on_delete\nproxy_on_context_create\nnope\n\n"),
            0
        );
    }
}
