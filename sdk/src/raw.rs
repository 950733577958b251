//! The proxy-wasm imports, declared once. On wasm32 they are the host's
//! functions; compiled for any other target (so unit tests run on the build
//! machine) every import answers `Unimplemented`, which the safe wrappers turn
//! into [`crate::HostError`]s.

macro_rules! imports {
    ($(fn $name:ident($($arg:ident: $ty:ty),*);)*) => {
        #[cfg(target_arch = "wasm32")]
        #[link(wasm_import_module = "env")]
        unsafe extern "C" {
            $(pub(crate) fn $name($($arg: $ty),*) -> u32;)*
        }

        $(
            #[cfg(not(target_arch = "wasm32"))]
            #[allow(clippy::too_many_arguments)]
            /// # Safety
            /// Answers `Unimplemented` without touching its arguments.
            pub(crate) unsafe fn $name($(_: $ty),*) -> u32 {
                lacewing_abi::Status::Unimplemented as u32
            }
        )*
    };
}

imports! {
    fn proxy_log(level: u32, ptr: *const u8, len: usize);
    fn proxy_get_log_level(ret: *mut u32);
    fn proxy_get_current_time_nanoseconds(ret: *mut u64);
    fn proxy_set_tick_period_milliseconds(period: u32);
    fn proxy_set_effective_context(context_id: u32);
    fn proxy_get_buffer_bytes(kind: u32, start: usize, max: usize, ret_ptr: *mut *mut u8, ret_len: *mut usize);
    fn proxy_set_buffer_bytes(kind: u32, start: usize, size: usize, ptr: *const u8, len: usize);
    fn proxy_get_header_map_pairs(kind: u32, ret_ptr: *mut *mut u8, ret_len: *mut usize);
    fn proxy_set_header_map_pairs(kind: u32, ptr: *const u8, len: usize);
    fn proxy_get_header_map_value(kind: u32, key: *const u8, key_len: usize, ret_ptr: *mut *mut u8, ret_len: *mut usize);
    fn proxy_add_header_map_value(kind: u32, key: *const u8, key_len: usize, value: *const u8, value_len: usize);
    fn proxy_replace_header_map_value(kind: u32, key: *const u8, key_len: usize, value: *const u8, value_len: usize);
    fn proxy_remove_header_map_value(kind: u32, key: *const u8, key_len: usize);
    fn proxy_get_property(path: *const u8, path_len: usize, ret_ptr: *mut *mut u8, ret_len: *mut usize);
    fn proxy_set_property(path: *const u8, path_len: usize, value: *const u8, value_len: usize);
    fn proxy_get_shared_data(key: *const u8, key_len: usize, ret_ptr: *mut *mut u8, ret_len: *mut usize, ret_cas: *mut u32);
    fn proxy_set_shared_data(key: *const u8, key_len: usize, value: *const u8, value_len: usize, cas: u32);
    fn proxy_continue_stream(kind: u32);
    fn proxy_close_stream(kind: u32);
    fn proxy_send_local_response(status: u32, details: *const u8, details_len: usize, body: *const u8, body_len: usize, headers: *const u8, headers_len: usize, grpc_status: i32);
    fn proxy_http_call(upstream: *const u8, upstream_len: usize, headers: *const u8, headers_len: usize, body: *const u8, body_len: usize, trailers: *const u8, trailers_len: usize, timeout_ms: u32, ret_token: *mut u32);
    fn proxy_grpc_call(upstream: *const u8, upstream_len: usize, service: *const u8, service_len: usize, method: *const u8, method_len: usize, metadata: *const u8, metadata_len: usize, message: *const u8, message_len: usize, timeout_ms: u32, ret_token: *mut u32);
    fn proxy_define_metric(kind: u32, name: *const u8, name_len: usize, ret_id: *mut u32);
    fn proxy_increment_metric(id: u32, delta: i64);
    fn proxy_record_metric(id: u32, value: u64);
    fn proxy_get_metric(id: u32, ret: *mut u64);
    fn proxy_call_foreign_function(name: *const u8, name_len: usize, args: *const u8, args_len: usize, ret_ptr: *mut *mut u8, ret_len: *mut usize);
}
