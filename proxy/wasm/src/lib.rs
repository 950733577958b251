//! The Lacewing proxy-wasm host: runs proxy-wasm modules on wasmtime as data-plane filters.
