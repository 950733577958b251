//! End-to-end tests of the data plane: a real proxy, started in this process,
//! between real clients and real upstream servers on loopback.
//!
//! One test binary keeps link time down; each concern lives in its own module.

mod access_log;
mod admin;
mod bad_input;
mod config_errors;
mod drain;
mod edge;
mod edge_descriptors;
mod edge_flags;
mod edge_framing;
mod edge_streams;
mod edge_timers;
mod forwarding;
mod grpc;
mod mesh_control;
mod mesh_demo;
mod mesh_join;
mod mesh_operator_tls;
mod mesh_policy;
mod mesh_rotate;
mod mesh_sidecars;
mod mesh_store;
mod mesh_support;
mod mesh_tcp;
mod mesh_tls;
mod mesh_tls_bad_input;
mod plugin_logs;
mod reload;
mod resilience;
mod routing;
mod standalone_tls;
mod tcp;
mod tls_files;
mod upstream_properties;
mod wasm_conformance;
mod wasm_hostile;
mod wasm_pausing;
mod wasm_profiling;
mod wasm_sdks;
mod wasm_skipping;
