//! Names of every host import and module export, per ABI version.
//!
//! The host links every name in [`ALL_IMPORTS`]; a module importing anything else
//! from `env` is rejected at load, naming the import.

/// Module name of proxy-wasm host imports.
pub const ENV_MODULE: &str = "env";
/// Module name of WASI preview 1 imports.
pub const WASI_MODULE: &str = "wasi_snapshot_preview1";

/// Host imports of ABI 0.1.0.
pub const IMPORTS_0_1_0: &[&str] = &[
    "proxy_log",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_configuration",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_size",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_clear_route_cache",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_call_foreign_function",
];

/// Host imports of ABI 0.2.0.
pub const IMPORTS_0_2_0: &[&str] = &[
    "proxy_log",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_size",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_call_foreign_function",
];

/// Host imports of ABI 0.2.1 (0.2.0 plus `proxy_get_log_level`).
pub const IMPORTS_0_2_1: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_size",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_call_foreign_function",
];

/// Every `env` import of every supported version (what the host links).
pub const ALL_IMPORTS: &[&str] = &[
    "proxy_log",
    "proxy_get_log_level",
    "proxy_get_current_time_nanoseconds",
    "proxy_set_tick_period_milliseconds",
    "proxy_get_configuration",
    "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes",
    "proxy_get_buffer_status",
    "proxy_get_header_map_pairs",
    "proxy_set_header_map_pairs",
    "proxy_get_header_map_size",
    "proxy_get_header_map_value",
    "proxy_add_header_map_value",
    "proxy_replace_header_map_value",
    "proxy_remove_header_map_value",
    "proxy_get_shared_data",
    "proxy_set_shared_data",
    "proxy_register_shared_queue",
    "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue",
    "proxy_enqueue_shared_queue",
    "proxy_continue_request",
    "proxy_continue_response",
    "proxy_continue_stream",
    "proxy_close_stream",
    "proxy_clear_route_cache",
    "proxy_send_local_response",
    "proxy_http_call",
    "proxy_grpc_call",
    "proxy_grpc_stream",
    "proxy_grpc_send",
    "proxy_grpc_cancel",
    "proxy_grpc_close",
    "proxy_get_status",
    "proxy_set_effective_context",
    "proxy_done",
    "proxy_get_property",
    "proxy_set_property",
    "proxy_define_metric",
    "proxy_increment_metric",
    "proxy_record_metric",
    "proxy_get_metric",
    "proxy_call_foreign_function",
];

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
pub const EXPORTS_0_2_X: &[&str] = &[
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
    "proxy_on_foreign_function",
];

#[cfg(test)]
mod tests {
    use super::*;

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
