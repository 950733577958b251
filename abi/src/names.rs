//! Names of every host import and module export, per ABI version.
//!
//! The host links every name in [`ALL_IMPORTS`]; a module importing anything else
//! from `env` is rejected at load, naming the import.

/// Module name of proxy-wasm host imports.
pub const ENV_MODULE: &str = "env";
/// Module name of WASI preview 1 imports.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";
/// The legacy module name of the same WASI functions (modules built with the
/// AssemblyScript SDK import `wasi_unstable.proc_exit`); linked alike.
pub const LEGACY_WASI_MODULE: &str = "wasi_unstable";
/// Every module name [`WASI_IMPORTS`] are linked under.
pub const WASI_MODULES: &[&str] = &[WASI_MODULE, LEGACY_WASI_MODULE];

/// The foreign function (`proxy_call_foreign_function`) through which a
/// module tells a Lacewing host which stream callbacks it does nothing in:
/// its arguments are export names (`proxy_on_response_body`, `proxy_on_log`,
/// `proxy_on_done`, ...) separated by `\n`. The host then skips those
/// callbacks for the plugin's streams, as if they had answered `Continue`
/// (`true` for `proxy_on_done`). Another host answers `NotFound` and calls
/// every callback, which changes nothing for such a module.
pub const UNUSED_CALLBACKS_FUNCTION: &str = "lacewing_unused_callbacks";

/// The foreign function through which a module lends a Lacewing host a
/// buffer for the values hostcalls return (a property, a header, a map), so
/// that a value costs no call to `proxy_on_memory_allocate`. Its arguments
/// are three little-endian `u32`s: the address of a one-byte flag, the
/// buffer's address and its capacity. Before a hostcall whose value it can
/// read from the buffer, the module sets the flag to 1; when the value fits,
/// the host clears the flag, writes the value there and returns the buffer's
/// address. Otherwise (the flag clear, the value too large) the host calls
/// `proxy_on_memory_allocate` as usual. Another host answers `NotFound`.
pub const RETURN_BUFFER_FUNCTION: &str = "lacewing_return_buffer";

/// The largest buffer a module may lend through [`RETURN_BUFFER_FUNCTION`].
pub const RETURN_BUFFER_MAX: u32 = 64 * 1024;

/// The stream callbacks a module may name to [`UNUSED_CALLBACKS_FUNCTION`],
/// by export name; the host ignores any other name.
pub const SKIPPABLE_CALLBACKS: [&str; 8] = [
    "proxy_on_request_headers",
    "proxy_on_request_body",
    "proxy_on_request_trailers",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_response_trailers",
    "proxy_on_log",
    "proxy_on_done",
];

/// Bit set of ABI versions a host import belongs to.
type Versions = u8;
const V0_1_0: Versions = 1;
const V0_2_0: Versions = 1 << 1;
const V0_2_1: Versions = 1 << 2;
const FROM_0_2_0: Versions = V0_2_0 | V0_2_1;
const EVERY: Versions = V0_1_0 | FROM_0_2_0;

/// Every `env` import with the ABI versions that have it, in link order.
const IMPORT_TABLE: &[(&str, Versions)] = &[
    ("proxy_log", EVERY),
    ("proxy_get_log_level", V0_2_1),
    ("proxy_get_current_time_nanoseconds", EVERY),
    ("proxy_set_tick_period_milliseconds", EVERY),
    ("proxy_get_configuration", V0_1_0),
    ("proxy_get_buffer_bytes", EVERY),
    ("proxy_set_buffer_bytes", EVERY),
    ("proxy_get_buffer_status", EVERY),
    ("proxy_get_header_map_pairs", EVERY),
    ("proxy_set_header_map_pairs", EVERY),
    ("proxy_get_header_map_size", EVERY),
    ("proxy_get_header_map_value", EVERY),
    ("proxy_add_header_map_value", EVERY),
    ("proxy_replace_header_map_value", EVERY),
    ("proxy_remove_header_map_value", EVERY),
    ("proxy_get_shared_data", EVERY),
    ("proxy_set_shared_data", EVERY),
    ("proxy_register_shared_queue", EVERY),
    ("proxy_resolve_shared_queue", EVERY),
    ("proxy_dequeue_shared_queue", EVERY),
    ("proxy_enqueue_shared_queue", EVERY),
    ("proxy_continue_request", V0_1_0),
    ("proxy_continue_response", V0_1_0),
    ("proxy_continue_stream", FROM_0_2_0),
    ("proxy_close_stream", FROM_0_2_0),
    ("proxy_clear_route_cache", V0_1_0),
    ("proxy_send_local_response", EVERY),
    ("proxy_http_call", EVERY),
    ("proxy_grpc_call", EVERY),
    ("proxy_grpc_stream", EVERY),
    ("proxy_grpc_send", EVERY),
    ("proxy_grpc_cancel", EVERY),
    ("proxy_grpc_close", EVERY),
    ("proxy_get_status", EVERY),
    ("proxy_set_effective_context", EVERY),
    ("proxy_done", EVERY),
    ("proxy_get_property", EVERY),
    ("proxy_set_property", EVERY),
    ("proxy_define_metric", EVERY),
    ("proxy_increment_metric", EVERY),
    ("proxy_record_metric", EVERY),
    ("proxy_get_metric", EVERY),
    ("proxy_call_foreign_function", EVERY),
];

/// How many imports of [`IMPORT_TABLE`] belong to any of `versions`.
const fn import_count(versions: Versions) -> usize {
    let mut count = 0;
    let mut i = 0;
    while i < IMPORT_TABLE.len() {
        if IMPORT_TABLE[i].1 & versions != 0 {
            count += 1;
        }
        i += 1;
    }
    count
}

/// The imports of [`IMPORT_TABLE`] that belong to any of `versions`, in table order.
const fn imports_of<const N: usize>(versions: Versions) -> [&'static str; N] {
    let mut names = [""; N];
    let mut next = 0;
    let mut i = 0;
    while i < IMPORT_TABLE.len() {
        if IMPORT_TABLE[i].1 & versions != 0 {
            names[next] = IMPORT_TABLE[i].0;
            next += 1;
        }
        i += 1;
    }
    names
}

/// Host imports of ABI 0.1.0.
pub const IMPORTS_0_1_0: &[&str] = &imports_of::<{ import_count(V0_1_0) }>(V0_1_0);

/// Host imports of ABI 0.2.0.
pub const IMPORTS_0_2_0: &[&str] = &imports_of::<{ import_count(V0_2_0) }>(V0_2_0);

/// Host imports of ABI 0.2.1 (0.2.0 plus `proxy_get_log_level`).
pub const IMPORTS_0_2_1: &[&str] = &imports_of::<{ import_count(V0_2_1) }>(V0_2_1);

/// Every `env` import of every supported version (what the host links).
pub const ALL_IMPORTS: &[&str] = &imports_of::<{ IMPORT_TABLE.len() }>(EVERY);

/// WASI preview 1 functions the host links.
pub const WASI_IMPORTS: &[&str] = &[
    "fd_write",
    "fd_read",
    "fd_close",
    "fd_seek",
    "fd_fdstat_get",
    "fd_prestat_get",
    "fd_prestat_dir_name",
    "clock_time_get",
    "clock_res_get",
    "random_get",
    "environ_sizes_get",
    "environ_get",
    "args_sizes_get",
    "args_get",
    "proc_exit",
    "sched_yield",
    "poll_oneoff",
];

/// Module exports the host calls, ABI 0.1.0 (no `proxy_on_foreign_function`).
pub const EXPORTS_0_1_0: &[&str] = &[
    "_initialize",
    "_start",
    "main",
    "proxy_on_memory_allocate",
    "malloc",
    "proxy_on_context_create",
    "proxy_on_done",
    "proxy_on_log",
    "proxy_on_delete",
    "proxy_on_vm_start",
    "proxy_on_configure",
    "proxy_on_tick",
    "proxy_on_new_connection",
    "proxy_on_downstream_data",
    "proxy_on_downstream_connection_close",
    "proxy_on_upstream_data",
    "proxy_on_upstream_connection_close",
    "proxy_on_request_headers",
    "proxy_on_request_body",
    "proxy_on_request_trailers",
    "proxy_on_response_headers",
    "proxy_on_response_body",
    "proxy_on_response_trailers",
    "proxy_on_http_call_response",
    "proxy_on_grpc_receive_initial_metadata",
    "proxy_on_grpc_receive",
    "proxy_on_grpc_receive_trailing_metadata",
    "proxy_on_grpc_close",
    "proxy_on_queue_ready",
];

/// Module exports the host calls, ABI 0.2.0 and 0.2.1.
pub const EXPORTS_0_2_X: &[&str] =
    &with_last::<{ EXPORTS_0_1_0.len() + 1 }>(EXPORTS_0_1_0, "proxy_on_foreign_function");

/// `names` followed by `last`; `N` is `names.len() + 1`.
const fn with_last<const N: usize>(
    names: &[&'static str],
    last: &'static str,
) -> [&'static str; N] {
    let mut out = [last; N];
    let mut i = 0;
    while i < names.len() {
        out[i] = names[i];
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skippable_callbacks_are_exports() {
        for name in SKIPPABLE_CALLBACKS {
            assert!(EXPORTS_0_1_0.contains(&name), "{name}");
        }
    }

    #[test]
    fn all_imports_cover_every_version() {
        for list in [IMPORTS_0_1_0, IMPORTS_0_2_0, IMPORTS_0_2_1] {
            for name in list {
                assert!(ALL_IMPORTS.contains(name), "{name}");
            }
        }
        for name in ALL_IMPORTS {
            let used = [IMPORTS_0_1_0, IMPORTS_0_2_0, IMPORTS_0_2_1]
                .iter()
                .any(|l| l.contains(name));
            assert!(used, "{name}");
        }
    }

    /// FNV-1a over the names, each followed by a newline: pins order and spelling.
    fn fingerprint(names: &[&str]) -> u64 {
        let mut hash = 0xcbf2_9ce4_8422_2325_u64;
        for byte in names
            .iter()
            .flat_map(|n| n.bytes().chain(core::iter::once(b'\n')))
        {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        hash
    }

    #[test]
    fn every_list_keeps_its_exact_names_in_order() {
        let expected: [(&str, &[&str], usize, u64); 7] = [
            ("IMPORTS_0_1_0", IMPORTS_0_1_0, 40, 0xc192_1dcf_140b_e3e4),
            ("IMPORTS_0_2_0", IMPORTS_0_2_0, 38, 0x8d6b_33e5_7d31_419c),
            ("IMPORTS_0_2_1", IMPORTS_0_2_1, 39, 0xf943_11e2_bc4e_20b7),
            ("ALL_IMPORTS", ALL_IMPORTS, 43, 0x46da_5538_93e5_5c1a),
            ("WASI_IMPORTS", WASI_IMPORTS, 17, 0x5ee1_cfd0_2aec_1fa5),
            ("EXPORTS_0_1_0", EXPORTS_0_1_0, 29, 0x117b_d08b_e77c_f7b2),
            ("EXPORTS_0_2_X", EXPORTS_0_2_X, 30, 0x3f93_748d_2cb8_fefc),
        ];
        for (label, list, len, hash) in expected {
            assert_eq!(list.len(), len, "{label} length");
            assert_eq!(fingerprint(list), hash, "{label} names or order");
        }
    }

    #[test]
    fn version_lists_differ_only_where_the_abi_changed() {
        let only_0_1_0 = [
            "proxy_get_configuration",
            "proxy_continue_request",
            "proxy_continue_response",
            "proxy_clear_route_cache",
        ];
        let only_0_2_x = ["proxy_continue_stream", "proxy_close_stream"];
        for name in only_0_1_0 {
            assert!(
                IMPORTS_0_1_0.contains(&name) && !IMPORTS_0_2_0.contains(&name),
                "{name}"
            );
        }
        for name in only_0_2_x {
            assert!(
                !IMPORTS_0_1_0.contains(&name) && IMPORTS_0_2_1.contains(&name),
                "{name}"
            );
        }
        assert_eq!(IMPORTS_0_2_1.len(), IMPORTS_0_2_0.len() + 1);
        assert!(IMPORTS_0_2_1.contains(&"proxy_get_log_level"));
        assert!(!IMPORTS_0_2_0.contains(&"proxy_get_log_level"));
        assert_eq!(EXPORTS_0_2_X[..EXPORTS_0_1_0.len()], *EXPORTS_0_1_0);
        assert_eq!(EXPORTS_0_2_X.last(), Some(&"proxy_on_foreign_function"));
    }
}
