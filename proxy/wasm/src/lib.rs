//! The Lacewing proxy-wasm host: runs proxy-wasm modules on wasmtime as data-plane filters.

pub mod callout;
pub mod plugin_metrics;
pub mod queues;
pub mod shared_data;
