//! Direct calls of proxy-wasm imports that report the raw status to the caller.
//!
//! The official SDK's wrappers abort the module on statuses they do not expect
//! (for example `InvalidMemoryAccess`), so the cases that check failure
//! statuses call the imports themselves. Statuses are plain `u32` here because
//! the SDK's `Status` enum has no variant for some values a host may return.

use proxy_wasm::types::LogLevel;
use std::ptr::null_mut;

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_get_property(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_header_map_pairs(
        map_type: u32,
        return_map_data: *mut *mut u8,
        return_map_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_log(level: u32, message_data: *const u8, message_size: usize) -> u32;
    fn proxy_get_header_map_size(map_type: u32, return_size: *mut usize) -> u32;
    fn proxy_get_buffer_status(
        buffer_type: u32,
        return_buffered_size: *mut usize,
        return_flags: *mut u32,
    ) -> u32;
    fn proxy_done() -> u32;
}

/// A guest address far past the end of any linear memory this module grows to.
pub const OUT_OF_BOUNDS: usize = 0xFFFF_FF00;

/// Name of a `proxy_status_t` value, as the tests expect to read it.
pub fn status_name(status: u32) -> String {
    match status {
        0 => "Ok".into(),
        1 => "NotFound".into(),
        2 => "BadArgument".into(),
        3 => "SerializationFailure".into(),
        4 => "ParseFailure".into(),
        6 => "InvalidMemoryAccess".into(),
        7 => "Empty".into(),
        8 => "CasMismatch".into(),
        10 => "InternalFailure".into(),
        12 => "Unimplemented".into(),
        other => format!("Status{other}"),
    }
}

/// Takes ownership of bytes the host allocated through `proxy_on_memory_allocate`.
fn take_host_bytes(data: *mut u8, size: usize) -> Vec<u8> {
    if data.is_null() || size == 0 {
        return Vec::new();
    }
    // SAFETY: the host allocated exactly `size` bytes at `data` by calling the
    // SDK's `proxy_on_memory_allocate`, which hands out a boxed slice of that
    // length; ownership passes to the module, as the ABI specifies.
    unsafe { Vec::from_raw_parts(data, size, size) }
}

/// Property path on the wire: segments separated by NUL.
fn property_path(path: &[&str]) -> Vec<u8> {
    path.join("\0").into_bytes()
}

/// `proxy_get_property`: the status and, when `Ok`, the value.
pub fn get_property(path: &[&str]) -> (u32, Vec<u8>) {
    let path = property_path(path);
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: the path slice and both out-params live across the call.
    let status = unsafe { proxy_get_property(path.as_ptr(), path.len(), &mut data, &mut size) };
    if status == 0 {
        (status, take_host_bytes(data, size))
    } else {
        (status, Vec::new())
    }
}

/// `proxy_set_property`: the status.
pub fn set_property(path: &[&str], value: &[u8]) -> u32 {
    let path = property_path(path);
    // SAFETY: both slices live across the call.
    unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) }
}

/// `proxy_get_header_map_value` with a key pointer outside linear memory.
pub fn header_value_with_out_of_bounds_key() -> u32 {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: the key pointer is deliberately invalid; the host must check it
    // before reading and answer with a status. The out-params are valid.
    unsafe { proxy_get_header_map_value(0, OUT_OF_BOUNDS as *const u8, 64, &mut data, &mut size) }
}

/// `proxy_get_header_map_value` whose result pointers lie outside linear memory.
pub fn header_value_with_out_of_bounds_return(key: &str) -> u32 {
    // SAFETY: the out-param pointers are deliberately invalid; the host must
    // check them before writing. The key slice is valid.
    unsafe {
        proxy_get_header_map_value(
            0,
            key.as_ptr(),
            key.len(),
            OUT_OF_BOUNDS as *mut *mut u8,
            (OUT_OF_BOUNDS + 8) as *mut usize,
        )
    }
}

/// `proxy_log` with a message pointer outside linear memory.
pub fn log_with_out_of_bounds_message() -> u32 {
    // SAFETY: the message pointer is deliberately invalid; the host must check it.
    unsafe { proxy_log(2, OUT_OF_BOUNDS as *const u8, 1024) }
}

/// `proxy_log` with any bytes, valid UTF-8 or not (the SDK takes `&str`).
pub fn log_bytes(level: LogLevel, message: &[u8]) -> u32 {
    // SAFETY: the message lives across the call.
    unsafe { proxy_log(level as u32, message.as_ptr(), message.len()) }
}

/// `proxy_get_header_map_pairs` on a map type the ABI does not define.
pub fn pairs_of_unknown_map(map_type: u32) -> u32 {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: the out-params live across the call.
    let status = unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) };
    drop(take_host_bytes(data, size));
    status
}

/// `proxy_get_buffer_bytes` on a buffer type the ABI does not define.
pub fn bytes_of_unknown_buffer(buffer_type: u32) -> u32 {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: the out-params live across the call.
    let status = unsafe { proxy_get_buffer_bytes(buffer_type, 0, 16, &mut data, &mut size) };
    drop(take_host_bytes(data, size));
    status
}

/// `proxy_get_header_map_size`: the status and the serialized size of the map.
pub fn header_map_size(map_type: u32) -> (u32, usize) {
    let mut size = 0;
    // SAFETY: the out-param lives across the call.
    let status = unsafe { proxy_get_header_map_size(map_type, &mut size) };
    (status, size)
}

/// `proxy_get_header_map_pairs`: the status and the length of the serialized pairs.
pub fn header_map_pairs_len(map_type: u32) -> (u32, usize) {
    let mut data = null_mut();
    let mut size = 0;
    // SAFETY: the out-params live across the call.
    let status = unsafe { proxy_get_header_map_pairs(map_type, &mut data, &mut size) };
    let pairs = take_host_bytes(data, size);
    (status, pairs.len())
}

/// `proxy_get_buffer_status`: the status and the buffered size.
pub fn buffer_status(buffer_type: u32) -> (u32, usize) {
    let mut size = 0;
    let mut flags = 0;
    // SAFETY: both out-params live across the call.
    let status = unsafe { proxy_get_buffer_status(buffer_type, &mut size, &mut flags) };
    (status, size)
}

/// `proxy_done`: the status.
pub fn done() -> u32 {
    // SAFETY: no arguments.
    unsafe { proxy_done() }
}
