//! Safe wrappers over the imports in [`crate::raw`]: every one returns a
//! [`Result`], none panics.

use core::cell::{Cell, RefCell};

use lacewing_abi::{BufferType, LogLevel, MapType, MetricType, StreamType, pairs};

use crate::error::{Result, check, optional};
use crate::raw;

/// The size of the buffer lent to the host for values read at once.
const LENT_CAPACITY: usize = 1024;

thread_local! {
    /// A buffer the module lends the host for the value of one hostcall that
    /// is read and dropped at once (a property, a header, a header map):
    /// `proxy_on_memory_allocate` then costs no `malloc` and no `free` in the
    /// module (about 1k instructions a value). Borrowed while a value in it is read.
    static LENT: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
    /// Set for the span of one hostcall whose value may go in [`LENT`].
    /// A Lacewing host reads and clears it in this module's memory (see
    /// [`lend_to_host`]).
    static OFFERED: Cell<bool> = const { Cell::new(false) };
    /// Whether [`lend_to_host`] ran.
    static LENT_TO_HOST: Cell<bool> = const { Cell::new(false) };
}

/// Tells a Lacewing host, once, where [`LENT`] and [`OFFERED`] are
/// (`RETURN_BUFFER_FUNCTION`): it then writes a value that fits straight
/// into the buffer when the flag is set, instead of calling
/// `proxy_on_memory_allocate` for it (about 300 instructions a value).
/// Another host answers `NotFound`, and values keep coming through
/// [`lend`].
fn lend_to_host() {
    if LENT_TO_HOST.with(|done| done.replace(true)) {
        return;
    }
    let Some(buf) = LENT.with(|lent| {
        let mut buf = lent.try_borrow_mut().ok()?;
        if buf.capacity() < LENT_CAPACITY {
            buf.reserve_exact(LENT_CAPACITY);
        }
        // The buffer is never grown again: its address stays valid.
        Some(buf.as_mut_ptr() as usize)
    }) else {
        return;
    };
    let flag = OFFERED.with(|offered| offered.as_ptr() as usize);
    let mut args = [0u8; 12];
    for (at, word) in [flag, buf, LENT_CAPACITY].into_iter().enumerate() {
        args[at * 4..at * 4 + 4].copy_from_slice(&(word as u32).to_le_bytes());
    }
    // Any error (another host) leaves values coming through `lend`.
    let _ = call_foreign_function(lacewing_abi::names::RETURN_BUFFER_FUNCTION, &args);
}

/// For `proxy_on_memory_allocate`: the lent buffer, when a hostcall offered
/// it, nothing reads it and `size` fits; `None` means allocate as usual.
pub(crate) fn lend(size: usize) -> Option<*mut u8> {
    if !OFFERED.with(|offered| offered.replace(false)) || size > LENT_CAPACITY {
        return None;
    }
    LENT.with(|lent| {
        let mut buf = lent.try_borrow_mut().ok()?;
        if buf.capacity() < LENT_CAPACITY {
            buf.reserve_exact(LENT_CAPACITY);
        }
        Some(buf.as_mut_ptr())
    })
}

/// Runs a hostcall that returns a buffer, then `read` on the bytes it
/// returned. The host writes them into the lent buffer when it is free (not
/// being read by an outer call) and they fit; else into an allocation that
/// is freed after `read`.
fn with_returned<R>(
    call: impl FnOnce(&mut *mut u8, &mut usize) -> Result<()>,
    read: impl FnOnce(&[u8]) -> R,
) -> Result<R> {
    let (mut ptr, mut len) = (core::ptr::null_mut(), 0usize);
    lend_to_host();
    LENT.with(|lent| {
        let free = lent.try_borrow_mut().is_ok();
        OFFERED.with(|offered| offered.set(free));
        let result = call(&mut ptr, &mut len);
        OFFERED.with(|offered| offered.set(false));
        result?;
        if let Ok(buf) = lent.try_borrow()
            && !ptr.is_null()
            && core::ptr::eq(ptr, buf.as_ptr())
        {
            if len > buf.capacity() {
                return Err(crate::HostError {
                    call: "proxy_on_memory_allocate",
                    status: lacewing_abi::Status::SerializationFailure,
                });
            }
            // SAFETY: `ptr` is the lent buffer, which `lend` or
            // `lend_to_host` gave the host with at least `len` bytes of
            // capacity (checked above); the host wrote `len` bytes there.
            // The borrow held across `read` keeps the buffer from being
            // lent again (or moved) while it is read.
            let bytes = unsafe { core::slice::from_raw_parts(ptr, len) };
            return Ok(read(bytes));
        }
        Ok(read(&owned(ptr, len)))
    })
}

/// Takes ownership of a buffer the host allocated through `proxy_on_memory_allocate`.
fn owned(ptr: *mut u8, len: usize) -> Vec<u8> {
    if ptr.is_null() || len == 0 {
        return Vec::new();
    }
    // SAFETY: the host filled `len` bytes at `ptr`, which came from
    // `proxy_on_memory_allocate(len)`, a `Vec<u8>` of capacity `len` given up
    // with `mem::forget`; ownership comes back here exactly once.
    unsafe { Vec::from_raw_parts(ptr, len, len) }
}

/// Logs a message at `level`.
pub fn log(level: LogLevel, message: &str) -> Result<()> {
    // SAFETY: pointer and length describe `message`, alive for the call.
    check("proxy_log", unsafe {
        raw::proxy_log(level as u32, message.as_ptr(), message.len())
    })
}

/// The host's log level: messages below it are dropped.
pub fn log_level() -> Result<LogLevel> {
    let mut level = 0u32;
    // SAFETY: `level` is a valid u32 out-pointer.
    check("proxy_get_log_level", unsafe {
        raw::proxy_get_log_level(&mut level)
    })?;
    Ok(LogLevel::try_from(level).unwrap_or(LogLevel::Trace))
}

/// The host's wall clock, nanoseconds since the Unix epoch.
pub fn now_nanos() -> Result<u64> {
    let mut t = 0u64;
    // SAFETY: `t` is a valid u64 out-pointer.
    check("proxy_get_current_time_nanoseconds", unsafe {
        raw::proxy_get_current_time_nanoseconds(&mut t)
    })?;
    Ok(t)
}

/// Asks for `on_tick` every `millis` milliseconds (0 stops it).
pub fn set_tick_period(millis: u32) -> Result<()> {
    // SAFETY: no pointers.
    check("proxy_set_tick_period_milliseconds", unsafe {
        raw::proxy_set_tick_period_milliseconds(millis)
    })
}

/// Calls the host function `name` beyond the ABI with `args`; its reply, or
/// `HostError` with `NotFound` on a host that has no such function.
pub fn call_foreign_function(name: &str, args: &[u8]) -> Result<Vec<u8>> {
    let (mut ptr, mut len) = (core::ptr::null_mut(), 0usize);
    // SAFETY: name and args describe live slices; both out-pointers are valid locals.
    check("proxy_call_foreign_function", unsafe {
        raw::proxy_call_foreign_function(
            name.as_ptr(),
            name.len(),
            args.as_ptr(),
            args.len(),
            &mut ptr,
            &mut len,
        )
    })?;
    Ok(owned(ptr, len))
}

/// Bytes `start..start+max` of a buffer; `Ok(None)` when the buffer is absent.
pub fn buffer(kind: BufferType, start: usize, max: usize) -> Result<Option<Vec<u8>>> {
    let (mut ptr, mut len) = (core::ptr::null_mut(), 0usize);
    // SAFETY: both out-pointers are valid locals.
    let r = check("proxy_get_buffer_bytes", unsafe {
        raw::proxy_get_buffer_bytes(kind as u32, start, max, &mut ptr, &mut len)
    });
    optional(r.map(|()| owned(ptr, len)))
}

/// Replaces `size` bytes at `start` of a buffer with `data`.
pub fn set_buffer(kind: BufferType, start: usize, size: usize, data: &[u8]) -> Result<()> {
    // SAFETY: pointer and length describe `data`.
    check("proxy_set_buffer_bytes", unsafe {
        raw::proxy_set_buffer_bytes(kind as u32, start, size, data.as_ptr(), data.len())
    })
}

/// Runs `read` on the serialized pairs of a map, as the host wrote them.
fn with_header_map_bytes<R>(map: MapType, read: impl FnOnce(&[u8]) -> R) -> Result<R> {
    with_returned(
        |ptr, len| {
            // SAFETY: both out-pointers are valid.
            check("proxy_get_header_map_pairs", unsafe {
                raw::proxy_get_header_map_pairs(map as u32, ptr, len)
            })
        },
        read,
    )
}

/// The pairs in `bytes` (none when empty), borrowed.
fn decode_pairs(bytes: &[u8]) -> Result<Vec<(&[u8], &[u8])>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    pairs::decode(bytes).map_err(|_| crate::HostError {
        call: "proxy_get_header_map_pairs",
        status: lacewing_abi::Status::SerializationFailure,
    })
}

/// Pairs as text, invalid UTF-8 replaced.
fn lossy_pairs(decoded: &[(&[u8], &[u8])]) -> Vec<(String, String)> {
    decoded
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8_lossy(k).into_owned(),
                String::from_utf8_lossy(v).into_owned(),
            )
        })
        .collect()
}

/// Every header of a map, in order.
pub fn header_pairs(map: MapType) -> Result<Vec<(String, String)>> {
    with_header_map_bytes(map, |bytes| Ok(lossy_pairs(&decode_pairs(bytes)?)))?
}

/// Every pair of a map, borrowed from the one buffer the host filled: `f`
/// sees them in order without an allocation per header (what
/// [`header_pairs`] makes). Should a name or value not be UTF-8, `f` sees the
/// same lossy text as [`header_pairs`] gives.
pub fn with_header_pairs<R>(map: MapType, f: impl FnOnce(&[(&str, &str)]) -> R) -> Result<R> {
    with_header_map_bytes(map, |bytes| {
        let decoded = decode_pairs(bytes)?;
        if let Some(pairs) = str_pairs(bytes, &decoded) {
            return Ok(f(&pairs));
        }
        let owned = lossy_pairs(&decoded);
        let pairs: Vec<(&str, &str)> = owned
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        Ok(f(&pairs))
    })?
}

/// The pairs as text when they all are. The names and values follow the
/// pairs' lengths in `bytes`, each ended by a NUL: when that whole region is
/// UTF-8, one check covers them all and each is cut from it (a check per
/// name and value cost about 150 instructions each).
fn str_pairs<'a>(
    bytes: &'a [u8],
    decoded: &[(&'a [u8], &'a [u8])],
) -> Option<Vec<(&'a str, &'a str)>> {
    if decoded.is_empty() {
        return Some(Vec::new());
    }
    let start = 4 + 8 * decoded.len();
    let text = crate::text::from_utf8(bytes.get(start..)?).ok()?;
    let base = text.as_ptr() as usize;
    // Where a slice of `bytes` starts in `text` (decode_pairs only returns
    // slices of `bytes`, past the lengths).
    let cut = |part: &[u8]| {
        let at = (part.as_ptr() as usize).checked_sub(base)?;
        text.get(at..at + part.len())
    };
    decoded
        .iter()
        .map(|(k, v)| Some((cut(k)?, cut(v)?)))
        .collect()
}

/// Replaces a whole map.
pub fn set_header_pairs(map: MapType, headers: &[(&str, &str)]) -> Result<()> {
    let bytes = pairs::encode(headers.iter().map(|(k, v)| (k, v)));
    // SAFETY: pointer and length describe `bytes`.
    check("proxy_set_header_map_pairs", unsafe {
        raw::proxy_set_header_map_pairs(map as u32, bytes.as_ptr(), bytes.len())
    })
}

/// One header's value; `Ok(None)` when absent.
pub fn header(map: MapType, name: &str) -> Result<Option<String>> {
    with_header(map, name, str::to_owned)
}

/// One header's value (invalid UTF-8 replaced), borrowed for the time of
/// `read`; `Ok(None)` when absent. Cheaper than [`header`] when the value is
/// not kept: it is never copied into an allocation of its own.
pub fn with_header<R>(map: MapType, name: &str, read: impl FnOnce(&str) -> R) -> Result<Option<R>> {
    optional(with_returned(
        |ptr, len| {
            // SAFETY: `name` is alive for the call; out-pointers are valid.
            check("proxy_get_header_map_value", unsafe {
                raw::proxy_get_header_map_value(map as u32, name.as_ptr(), name.len(), ptr, len)
            })
        },
        // Checked with `text::from_utf8` first: the lossy conversion's own
        // check goes a byte at a time (about 10 instructions a byte in wasm).
        |bytes| match crate::text::from_utf8(bytes) {
            Ok(text) => read(text),
            Err(_) => read(&String::from_utf8_lossy(bytes)),
        },
    ))
}

/// Adds a value (keeping existing ones).
pub fn add_header(map: MapType, name: &str, value: &str) -> Result<()> {
    // SAFETY: both slices are alive for the call.
    check("proxy_add_header_map_value", unsafe {
        raw::proxy_add_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Sets a header to one value.
pub fn set_header(map: MapType, name: &str, value: &str) -> Result<()> {
    // SAFETY: both slices are alive for the call.
    check("proxy_replace_header_map_value", unsafe {
        raw::proxy_replace_header_map_value(
            map as u32,
            name.as_ptr(),
            name.len(),
            value.as_ptr(),
            value.len(),
        )
    })
}

/// Removes every value of a header.
pub fn remove_header(map: MapType, name: &str) -> Result<()> {
    // SAFETY: `name` is alive for the call.
    check("proxy_remove_header_map_value", unsafe {
        raw::proxy_remove_header_map_value(map as u32, name.as_ptr(), name.len())
    })
}

/// A property's raw bytes (`source.principal`, `request.path`, ...); `Ok(None)` when absent.
pub fn property(path: &str) -> Result<Option<Vec<u8>>> {
    with_property(path, <[u8]>::to_vec)
}

/// A property's value borrowed for the time of `read`; `Ok(None)` when the
/// host has no such property. Cheaper than [`property`] when the value is
/// not kept (an integer, a label copied into a buffer of the caller's).
pub fn with_property<R>(path: &str, read: impl FnOnce(&[u8]) -> R) -> Result<Option<R>> {
    with_encoded_path(path, |encoded| {
        optional(with_returned(
            |ptr, len| {
                // SAFETY: `encoded` is alive for the call; out-pointers are valid.
                check("proxy_get_property", unsafe {
                    raw::proxy_get_property(encoded.as_ptr(), encoded.len(), ptr, len)
                })
            },
            read,
        ))
    })
}

/// `a.b.c` as the ABI's `a\0b\0c`, on the stack when it is short (a
/// collected `Vec` cost an allocation and 15 instructions a byte).
fn with_encoded_path<R>(path: &str, f: impl FnOnce(&[u8]) -> R) -> R {
    let mut stack = [0u8; 128];
    let mut heap = Vec::new();
    let out = match stack.get_mut(..path.len()) {
        Some(out) => out,
        None => {
            heap.resize(path.len(), 0);
            &mut heap[..]
        }
    };
    for (to, &from) in out.iter_mut().zip(path.as_bytes()) {
        *to = if from == b'.' { 0 } else { from };
    }
    f(out)
}

/// A property as UTF-8 text (lossy).
pub fn property_string(path: &str) -> Result<Option<String>> {
    // Valid UTF-8, the usual case, is kept without a second copy.
    Ok(property(path)?.map(|v| {
        String::from_utf8(v).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
    }))
}

/// Sets a property for the current stream.
pub fn set_property(path: &str, value: &[u8]) -> Result<()> {
    with_encoded_path(path, |encoded| {
        // SAFETY: both slices are alive for the call.
        check("proxy_set_property", unsafe {
            raw::proxy_set_property(encoded.as_ptr(), encoded.len(), value.as_ptr(), value.len())
        })
    })
}

/// A shared-data value and its CAS version; `Ok(None)` when the key is absent.
pub fn shared_data(key: &str) -> Result<Option<(Vec<u8>, u32)>> {
    let (mut ptr, mut len, mut cas) = (core::ptr::null_mut(), 0usize, 0u32);
    // SAFETY: `key` is alive for the call; out-pointers are valid locals.
    let r = check("proxy_get_shared_data", unsafe {
        raw::proxy_get_shared_data(key.as_ptr(), key.len(), &mut ptr, &mut len, &mut cas)
    });
    optional(r.map(|()| (owned(ptr, len), cas)))
}

/// Stores a shared-data value if its version is still `cas` (0: unconditionally).
/// A lost race is `Err` with status `CasMismatch`.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> Result<()> {
    // SAFETY: both slices are alive for the call.
    check("proxy_set_shared_data", unsafe {
        raw::proxy_set_shared_data(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas)
    })
}

/// Makes `context_id` the context later hostcalls act on: callout replies
/// arrive on the root context, and their continuation acts on the stream that
/// made the call.
pub fn set_effective_context(context_id: u32) -> Result<()> {
    // SAFETY: no pointers.
    check("proxy_set_effective_context", unsafe {
        raw::proxy_set_effective_context(context_id)
    })
}

/// Resumes a paused stream.
pub fn continue_stream(kind: StreamType) -> Result<()> {
    // SAFETY: no pointers.
    check("proxy_continue_stream", unsafe {
        raw::proxy_continue_stream(kind as u32)
    })
}

/// Resets a stream.
pub fn close_stream(kind: StreamType) -> Result<()> {
    // SAFETY: no pointers.
    check("proxy_close_stream", unsafe {
        raw::proxy_close_stream(kind as u32)
    })
}

/// Answers the request locally.
pub fn send_response(
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    details: &str,
) -> Result<()> {
    let encoded = pairs::encode(headers.iter().map(|(k, v)| (k, v)));
    // SAFETY: every slice is alive for the call.
    check("proxy_send_local_response", unsafe {
        raw::proxy_send_local_response(
            u32::from(status),
            details.as_ptr(),
            details.len(),
            body.as_ptr(),
            body.len(),
            encoded.as_ptr(),
            encoded.len(),
            -1,
        )
    })
}

/// Starts an HTTP callout; returns its token.
pub fn http_call(
    cluster: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    trailers: &[(&str, &str)],
    timeout_ms: u32,
) -> Result<u32> {
    let h = pairs::encode(headers.iter().map(|(k, v)| (k, v)));
    let t = pairs::encode(trailers.iter().map(|(k, v)| (k, v)));
    let mut token = 0u32;
    // SAFETY: every slice is alive for the call; `token` is a valid out-pointer.
    check("proxy_http_call", unsafe {
        raw::proxy_http_call(
            cluster.as_ptr(),
            cluster.len(),
            h.as_ptr(),
            h.len(),
            body.as_ptr(),
            body.len(),
            t.as_ptr(),
            t.len(),
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}

/// Starts a unary gRPC callout; returns its token.
pub fn grpc_call(
    cluster: &str,
    service: &str,
    method: &str,
    metadata: &[(&str, &str)],
    message: &[u8],
    timeout_ms: u32,
) -> Result<u32> {
    let m = pairs::encode(metadata.iter().map(|(k, v)| (k, v)));
    let mut token = 0u32;
    // SAFETY: every slice is alive for the call; `token` is a valid out-pointer.
    check("proxy_grpc_call", unsafe {
        raw::proxy_grpc_call(
            cluster.as_ptr(),
            cluster.len(),
            service.as_ptr(),
            service.len(),
            method.as_ptr(),
            method.len(),
            m.as_ptr(),
            m.len(),
            message.as_ptr(),
            message.len(),
            timeout_ms,
            &mut token,
        )
    })?;
    Ok(token)
}

/// Defines (or finds) a metric; returns its id.
pub fn define_metric(kind: MetricType, name: &str) -> Result<u32> {
    let mut id = 0u32;
    // SAFETY: `name` is alive for the call; `id` is a valid out-pointer.
    check("proxy_define_metric", unsafe {
        raw::proxy_define_metric(kind as u32, name.as_ptr(), name.len(), &mut id)
    })?;
    Ok(id)
}

/// Adds `delta` to a counter or gauge.
pub fn increment_metric(id: u32, delta: i64) -> Result<()> {
    // SAFETY: no pointers.
    check("proxy_increment_metric", unsafe {
        raw::proxy_increment_metric(id, delta)
    })
}

/// Sets a gauge or records a histogram value.
pub fn record_metric(id: u32, value: u64) -> Result<()> {
    // SAFETY: no pointers.
    check("proxy_record_metric", unsafe {
        raw::proxy_record_metric(id, value)
    })
}

/// A metric's current value.
pub fn metric(id: u32) -> Result<u64> {
    let mut v = 0u64;
    // SAFETY: `v` is a valid out-pointer.
    check("proxy_get_metric", unsafe {
        raw::proxy_get_metric(id, &mut v)
    })?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::{decode_pairs, lossy_pairs, str_pairs, with_encoded_path};

    #[test]
    fn pairs_are_cut_from_one_checked_text_or_replaced_when_not_text() {
        let valid: &[(&[u8], &[u8])] = &[
            (b":method", b"GET"),
            (b":path", "/caf\u{e9}?q=1".as_bytes()),
            (b"x-empty", b""),
        ];
        let bytes = lacewing_abi::pairs::encode(valid.iter().copied());
        let decoded = decode_pairs(&bytes).unwrap();
        assert_eq!(
            str_pairs(&bytes, &decoded).unwrap(),
            [
                (":method", "GET"),
                (":path", "/caf\u{e9}?q=1"),
                ("x-empty", "")
            ]
        );
        let invalid: &[(&[u8], &[u8])] = &[(b"a", b"ok"), (b"b", b"\xff\xfe")];
        let bytes = lacewing_abi::pairs::encode(invalid.iter().copied());
        let decoded = decode_pairs(&bytes).unwrap();
        assert_eq!(str_pairs(&bytes, &decoded), None);
        assert_eq!(lossy_pairs(&decoded)[1].1, "\u{fffd}\u{fffd}");
        assert_eq!(str_pairs(&[], &[]), Some(Vec::new()));
    }

    fn encode_path(path: &str) -> Vec<u8> {
        with_encoded_path(path, <[u8]>::to_vec)
    }

    #[test]
    fn a_dotted_path_is_encoded_with_nul_separators() {
        let long = "a.".repeat(100);
        assert_eq!(encode_path(&long), long.replace('.', "\0").as_bytes());
        assert_eq!(encode_path("source.principal"), b"source\0principal");
        assert_eq!(encode_path("a..b"), b"a\0\0b");
        assert_eq!(
            encode_path("request.duration"),
            lacewing_abi::property::join_path(&["request", "duration"])
        );
    }
}
