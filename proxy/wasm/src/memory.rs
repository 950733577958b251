//! Bounds-checked access to guest memory, and allocation inside the guest.
//!
//! Every pointer and length a module passes is checked here; a bad one becomes
//! `InvalidMemoryAccess` for the module, never a host panic.

use lacewing_abi::Status;
use wasmtime::Caller;

use crate::vm::HostState;

/// A hostcall's outcome: a status for the module, or a trap that stops it.
pub(crate) enum HostError {
    Status(Status),
    Trap(wasmtime::Error),
}

impl From<Status> for HostError {
    fn from(s: Status) -> Self {
        Self::Status(s)
    }
}

pub(crate) type HostResult<T = ()> = Result<T, HostError>;

/// Turns a hostcall outcome into what the module receives.
pub(crate) fn status(result: HostResult) -> wasmtime::Result<i32> {
    match result {
        Ok(()) => Ok(Status::Ok.code()),
        Err(HostError::Status(s)) => Ok(s.code()),
        Err(HostError::Trap(e)) => Err(e),
    }
}

/// The guest range `ptr..ptr+len` as a `usize` range, if it fits in `size`.
pub(crate) fn range(ptr: i32, len: i32, size: usize) -> Result<std::ops::Range<usize>, Status> {
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    if end > size {
        return Err(Status::InvalidMemoryAccess);
    }
    Ok(start..end)
}

/// The guest's memory bytes and the host state, borrowed together.
pub(crate) fn split<'a>(
    caller: &'a mut Caller<'_, HostState>,
) -> Result<(&'a mut [u8], &'a mut HostState), Status> {
    let memory = caller.data().memory.ok_or(Status::InvalidMemoryAccess)?;
    Ok(memory.data_and_store_mut(caller))
}

/// A guest slice.
pub(crate) fn slice(data: &[u8], ptr: i32, len: i32) -> Result<&[u8], Status> {
    Ok(&data[range(ptr, len, data.len())?])
}

/// A copy of a guest slice.
pub(crate) fn read(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
) -> Result<Vec<u8>, Status> {
    let (data, _) = split(caller)?;
    slice(data, ptr, len).map(<[u8]>::to_vec)
}

/// A guest slice as UTF-8 text.
pub(crate) fn read_string(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    len: i32,
) -> Result<String, Status> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| Status::BadArgument)
}

/// Writes bytes at a guest address.
pub(crate) fn write(data: &mut [u8], ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let r = range(ptr, bytes.len() as i32, data.len())?;
    data[r].copy_from_slice(bytes);
    Ok(())
}

/// Writes a little-endian `u32` at a guest address.
pub(crate) fn write_u32(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    value: u32,
) -> Result<(), Status> {
    let (data, _) = split(caller)?;
    write(data, ptr, &value.to_le_bytes())
}

/// Writes a little-endian `u64` at a guest address.
pub(crate) fn write_u64(
    caller: &mut Caller<'_, HostState>,
    ptr: i32,
    value: u64,
) -> Result<(), Status> {
    let (data, _) = split(caller)?;
    write(data, ptr, &value.to_le_bytes())
}

/// Writes `bytes` into the buffer the guest lent for returned values, when
/// it offered it for this call (its flag byte is 1, which this clears) and
/// they fit: the buffer's address, or `None` to allocate instead. Saves a
/// call into the guest per returned value (about 300 instructions).
fn into_return_buffer(
    caller: &mut Caller<'_, HostState>,
    bytes: &[u8],
) -> Result<Option<i32>, Status> {
    let (data, state) = split(caller)?;
    let Some(lent) = state.return_buffer else {
        return Ok(None);
    };
    if bytes.len() > lent.cap as usize {
        return Ok(None);
    }
    match data.get_mut(lent.flag as usize) {
        Some(flag) if *flag == 1 => *flag = 0,
        _ => return Ok(None),
    }
    write(data, lent.buf as i32, bytes)?;
    Ok(Some(lent.buf as i32))
}

/// Copies `bytes` into the buffer the guest lent for them or into memory it
/// allocates (its `proxy_on_memory_allocate` or `malloc`) and writes the
/// address and length to `ret_ptr` / `ret_len`.
/// Empty data is returned as address 0, length 0 without allocating.
pub(crate) fn give(
    caller: &mut Caller<'_, HostState>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_len: i32,
) -> HostResult {
    {
        // Check the out-params before allocating, so a bad pointer costs nothing.
        let (data, _) = split(caller)?;
        range(ret_ptr, 4, data.len())?;
        range(ret_len, 4, data.len())?;
    }
    let addr = if bytes.is_empty() {
        0
    } else if let Some(addr) = into_return_buffer(caller, bytes)? {
        addr
    } else {
        let len = i32::try_from(bytes.len()).map_err(|_| Status::InvalidMemoryAccess)?;
        let allocate = caller
            .data()
            .allocate
            .clone()
            .ok_or(Status::InvalidMemoryAccess)?;
        let addr = allocate.call(&mut *caller, len).map_err(HostError::Trap)?;
        if addr == 0 {
            return Err(Status::InvalidMemoryAccess.into());
        }
        let (data, _) = split(caller)?;
        write(data, addr, bytes)?;
        addr
    };
    let (data, _) = split(caller)?;
    write(data, ret_ptr, &(addr as u32).to_le_bytes())?;
    write(data, ret_len, &(bytes.len() as u32).to_le_bytes())?;
    Ok(())
}
