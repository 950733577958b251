//! Tests of the host with small WAT modules: loading, ABI detection, hostcalls,
//! the sandbox (deadline, memory cap, traps) and the filter adapters.

use std::net::SocketAddr;
use std::sync::Arc;

use lacewing_config::{ClusterConfig, PluginConfig};
use lacewing_core::filter::{HttpFilter, HttpFilterFactory};
use lacewing_core::metrics::Metrics;
use lacewing_core::stream::{HttpStream, SharedStream, StreamInfo};

use crate::{HostOptions, LogLevel, WasmError, WasmHost, WasmPlugin};

mod calls;
mod coverage;
mod hostcalls;
mod load;
mod sandbox;

#[test]
fn host_and_plugin_are_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<WasmHost>();
    assert_send_sync::<WasmPlugin>();
    assert_send_sync::<HostOptions>();
}

/// A host with its own registry and no disk cache.
pub(crate) fn host() -> (Arc<WasmHost>, Metrics) {
    let metrics = Metrics::new();
    let host = WasmHost::new(HostOptions {
        cache_dir: None,
        metrics: metrics.clone(),
        log_level: LogLevel::Trace,
    })
    .unwrap();
    (host, metrics)
}

/// Real upstream clusters built from `clusters`.
pub(crate) fn upstreams(
    clusters: &[ClusterConfig],
    metrics: &Metrics,
) -> Arc<dyn lacewing_core::callout::Upstreams> {
    lacewing_upstream::Upstreams::new(clusters, metrics).unwrap()
}

/// A plugin config from JSON fields added to `{name, module}`.
pub(crate) fn config(extra: serde_json::Value) -> PluginConfig {
    let mut v = serde_json::json!({ "name": "test", "module": "inline.wasm" });
    if let (Some(obj), Some(extra)) = (v.as_object_mut(), extra.as_object()) {
        for (k, val) in extra {
            obj.insert(k.clone(), val.clone());
        }
    }
    serde_json::from_value(v).unwrap()
}

/// Imports every test module has, with short names.
pub(crate) const STD_IMPORTS: &str = r#"
  (import "env" "proxy_set_shared_data" (func $set_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $get_shared (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $get_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set_pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_value (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove_value (param i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $set_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_property" (func $set_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $set_effective (param i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue_stream (param i32) (result i32)))
  (import "env" "proxy_close_stream" (func $close_stream (param i32) (result i32)))
  (import "env" "proxy_done" (func $done (result i32)))
  (import "env" "proxy_get_status" (func $get_status (param i32 i32 i32) (result i32)))
  (import "env" "proxy_call_foreign_function" (func $foreign (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_define_metric" (func $define_metric (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $increment_metric (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $get_metric (param i32 i32) (result i32)))
  (import "env" "proxy_get_log_level" (func $get_log_level (param i32) (result i32)))
  (import "env" "proxy_set_tick_period_milliseconds" (func $set_tick (param i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $register_queue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $dequeue (param i32 i32 i32) (result i32)))
  (import "env" "proxy_http_call" (func $http_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_call" (func $grpc_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_cancel" (func $grpc_cancel (param i32) (result i32)))
  (import "env" "proxy_grpc_stream" (func $grpc_stream (param i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_send" (func $grpc_send (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_grpc_close" (func $grpc_close (param i32) (result i32)))
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
"#;

/// Bytes as a WAT string literal body (`\xx` escapes).
pub(crate) fn wat_bytes(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:02x}")).collect()
}

/// The common part of every test module: memory, a bump allocator, the 0.2.1
/// marker (unless `marker` says otherwise) and `$record(key_ptr, key_len, value)`,
/// which stores an i32 under a shared-data key so tests can read what the module saw.
pub(crate) fn module_with_marker(marker: &str, imports: &str, body: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  {STD_IMPORTS}
  {imports}
  (memory (export "memory") 4)
  (global $bump (mut i32) (i32.const 16384))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    global.get $bump
    local.set $p
    global.get $bump
    local.get $n
    i32.add
    i32.const 7
    i32.add
    i32.const -8
    i32.and
    global.set $bump
    local.get $p)
  (func $record (param $key i32) (param $key_len i32) (param $value i32)
    i32.const 1024
    local.get $value
    i32.store
    local.get $key
    local.get $key_len
    i32.const 1024
    i32.const 4
    i32.const 0
    call $set_shared
    drop)
  {marker}
  {body}
)"#
    );
    wat::parse_str(&text).unwrap_or_else(|e| panic!("bad test module: {e}\n{text}"))
}

/// [`module_with_marker`] with the 0.2.1 marker.
pub(crate) fn module(imports: &str, body: &str) -> Vec<u8> {
    module_with_marker(
        r#"(func (export "proxy_abi_version_0_2_1"))"#,
        imports,
        body,
    )
}

pub(crate) fn load(
    host: &Arc<WasmHost>,
    cfg: &PluginConfig,
    bytes: &[u8],
) -> Result<Arc<WasmPlugin>, WasmError> {
    let metrics = Metrics::new();
    host.load_plugin_bytes(cfg, bytes, upstreams(&[], &metrics))
}

/// The i32 a module recorded under `key`.
pub(crate) fn recorded(host: &WasmHost, key: &str) -> Option<i32> {
    let (value, _) = host.shared_data().get(key.as_bytes())?;
    Some(i32::from_le_bytes(value.as_ref().try_into().ok()?))
}

/// A GET stream for `path` with a host and a request id.
pub(crate) fn stream(path: &str) -> SharedStream {
    let (parts, ()) = http::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "example.com")
        .header("x-request-id", "req-1")
        .body(())
        .unwrap()
        .into_parts();
    let remote: SocketAddr = "127.0.0.1:50000".parse().unwrap();
    let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
    HttpStream::new(StreamInfo::new(7, remote, local, Arc::from("main")), parts).shared()
}

/// A filter of `plugin` for `stream`.
pub(crate) fn filter(plugin: &WasmPlugin, stream: &SharedStream) -> Box<dyn HttpFilter> {
    HttpFilterFactory::create(plugin, stream).expect("the plugin takes part")
}

/// The value of a metric sample line in the exposition, if present.
pub(crate) fn metric(metrics: &Metrics, line_prefix: &str) -> Option<f64> {
    metrics
        .render()
        .lines()
        .find(|l| l.starts_with(line_prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
