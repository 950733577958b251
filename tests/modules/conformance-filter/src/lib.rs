//! conformance-filter: a proxy-wasm test module that exercises every host
//! function and callback of ABI 0.2.1 that the official `proxy-wasm` crate exposes.
//!
//! Built with the official SDK, unmodified, so the same module runs in Lacewing
//! and in Envoy. What it does on a request is chosen by the `x-test` request
//! header (a comma-separated list of cases, see [`http`]); what it found out is
//! reported in response headers (`x-prop-path: /foo`,
//! `x-status-unknown-property: NotFound`, ...), so tests assert exactly what a
//! client sees.
//!
//! Plugin configuration: whitespace-, comma- or semicolon-separated words:
//! `tag=<name>` (records its place in the filter chain), `tick_ms=<n>` (arms the
//! tick timer), `fail_configure` (on_configure returns false), `trap_configure`
//! (on_configure traps), `pause=<mode>` (a pausing behaviour of [`pause`]
//! instead of the `x-test` cases).

mod http;
// One import is called directly, to see the host's status without the SDK
// aborting on it; the block states what makes it sound.
#[allow(unsafe_code)]
mod pause;
// Calling a wasm import directly is an FFI call, so `unsafe` is unavoidable
// here; each block in the module states what makes it sound.
#[allow(unsafe_code)]
mod raw;
mod root;

use proxy_wasm::traits::RootContext;
use proxy_wasm::types::LogLevel;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Trace);
    proxy_wasm::set_root_context(|_context_id| -> Box<dyn RootContext> {
        Box::new(root::ConformanceRoot::default())
    });
}}
