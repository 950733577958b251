//! The Lacewing proxy-wasm host: runs proxy-wasm modules on wasmtime as data-plane filters.
//!
//! [`WasmHost`] (one per process) owns the engine, the linked hostcalls, shared
//! data, queues and plugin metrics; [`WasmHost::load_plugin`] compiles, links and
//! validates a module and returns a [`WasmPlugin`], which the data plane uses as
//! an HTTP or network filter factory. Each worker thread runs its own VMs.
//! Layout mirrors the proxy-wasm SDK split: `engine`, `plugin`, `vm`, `memory`,
//! `hostcalls/` (one file per ABI area) and `filter`.

pub mod callout;
mod engine;
mod error;
mod exports;
mod failure;
mod filter;
mod host;
mod host_metrics;
mod hostcalls;
mod memory;
mod plugin;
pub mod plugin_log;
pub mod plugin_metrics;
pub mod queues;
pub mod shared_data;
mod state;
mod vm;
mod workers;

#[cfg(test)]
mod tests;

pub use error::WasmError;
pub use host::{HostOptions, WasmHost};
pub use lacewing_abi::{AbiVersion, LogLevel};
pub use plugin::WasmPlugin;
