//! Process-wide shared key/value data with compare-and-swap.

use bytes::Bytes;
use lacewing_abi::Status;
use wasmtime::{Caller, Linker};

use super::ENV;
use crate::memory::{self, HostResult, status};
use crate::shared_data::SharedDataError;
use crate::vm::HostState;

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_shared_data",
        |mut c: Caller<'_, HostState>,
         key_ptr: i32,
         key_len: i32,
         ret_ptr: i32,
         ret_len: i32,
         ret_cas: i32| { status(get(&mut c, key_ptr, key_len, ret_ptr, ret_len, ret_cas)) },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_shared_data",
        |mut c: Caller<'_, HostState>,
         key_ptr: i32,
         key_len: i32,
         val_ptr: i32,
         val_len: i32,
         cas: i32| { status(set(&mut c, key_ptr, key_len, val_ptr, val_len, cas as u32)) },
    )?;
    Ok(())
}

fn get(
    caller: &mut Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    ret_ptr: i32,
    ret_len: i32,
    ret_cas: i32,
) -> HostResult {
    let found = {
        let (data, state) = memory::split(caller)?;
        let key = memory::slice(data, key_ptr, key_len)?;
        state.plugin.host.shared_data.get(key)
    };
    let (value, cas) = found.ok_or(Status::NotFound)?;
    memory::write_u32(caller, ret_cas, cas)?;
    memory::give(caller, &value, ret_ptr, ret_len)
}

fn set(
    caller: &mut Caller<'_, HostState>,
    key_ptr: i32,
    key_len: i32,
    val_ptr: i32,
    val_len: i32,
    cas: u32,
) -> HostResult {
    let (data, state) = memory::split(caller)?;
    let key = memory::slice(data, key_ptr, key_len)?;
    let value = Bytes::copy_from_slice(memory::slice(data, val_ptr, val_len)?);
    match state.plugin.host.shared_data.set(key, value, cas) {
        Ok(()) => Ok(()),
        Err(SharedDataError::CasMismatch { .. }) => Err(Status::CasMismatch.into()),
        Err(_) => Err(Status::BadArgument.into()),
    }
}
