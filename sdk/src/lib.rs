//! Lacewing's Rust SDK for proxy-wasm filters.
//!
//! A filter is a [`Plugin`] (built once per configuration, which serde parses
//! and [`Plugin::configure`] validates) and a [`Filter`] per HTTP stream.
//! [`register!`] exports the proxy-wasm callbacks for them. Every host call
//! returns a [`Result`]: the SDK never panics on a host error.
//!
//! ```no_run
//! use std::rc::Rc;
//! use lacewing_sdk::{Action, Filter, Plugin, http::Headers};
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Config { greeting: String }
//!
//! struct Hello { greeting: String }
//! struct HelloFilter { plugin: Rc<Hello> }
//!
//! impl Plugin for Hello {
//!     type Config = Config;
//!     type Filter = HelloFilter;
//!     fn configure(c: Config) -> Result<Self, String> {
//!         if c.greeting.is_empty() { return Err("greeting must not be empty".into()); }
//!         Ok(Hello { greeting: c.greeting })
//!     }
//!     fn new_filter(self: &Rc<Self>) -> HelloFilter { HelloFilter { plugin: self.clone() } }
//! }
//!
//! impl Filter for HelloFilter {
//!     fn on_response_headers(&mut self, headers: &Headers, _eos: bool) -> Action {
//!         if let Err(e) = headers.set("x-hello", &self.plugin.greeting) {
//!             lacewing_sdk::warn!("cannot set x-hello: {e}");
//!         }
//!         Action::Continue
//!     }
//! }
//!
//! lacewing_sdk::register!(Hello);
//! ```
//!
//! Compiled for a target other than wasm32, every host call returns
//! `Err(HostError { status: Unimplemented, .. })`, so filter crates build and
//! unit-test their pure logic on the build machine. To run a filter in the
//! real host from `cargo test`, use the `lacewing-filter-test` crate.

pub mod callout;
#[doc(hidden)]
pub mod dispatch;
mod error;
// The imports of the proxy-wasm ABI are foreign functions: calling them is
// unsafe by nature; every block there says what makes the call sound.
#[allow(unsafe_code)]
pub mod hostcalls;
pub mod http;
pub mod keys;
pub mod log;
pub mod metrics;
mod plugin;
#[allow(unsafe_code)]
mod raw;
pub mod text;

pub use error::{HostError, Result};
pub use lacewing_abi::{Action, LogLevel, Status};
pub use plugin::{Filter, NoConfig, Plugin};
#[doc(hidden)]
pub use serde_json;

/// Reads a property as text: `property("source.principal")`. `Ok(None)` when
/// the host has no such property for this stream.
pub fn property(path: &str) -> Result<Option<String>> {
    hostcalls::property_string(path)
}

/// Exports the proxy-wasm callbacks for a [`Plugin`] type. Use it once, at
/// the crate root of a `cdylib`.
#[macro_export]
macro_rules! register {
    ($plugin:ty) => {
        const _: () = {
            use $crate::dispatch as __d;
            ::std::thread_local! {
                static __LACEWING_DISPATCH: ::core::cell::RefCell<__d::Dispatcher<$plugin>> =
                    ::core::cell::RefCell::new(__d::Dispatcher::default());
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn _initialize() {
                __d::initialize()
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_abi_version_0_2_1() {}
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_memory_allocate(size: usize) -> *mut u8 {
                __d::allocate(size)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_vm_start(_root: u32, _size: usize) -> u32 {
                1
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_context_create(ctx: u32, parent: u32) {
                __d::context_create(&__LACEWING_DISPATCH, ctx, parent)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_configure(root: u32, size: usize) -> u32 {
                u32::from(__d::configure(&__LACEWING_DISPATCH, root, size))
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_tick(root: u32) {
                __d::tick(&__LACEWING_DISPATCH, root)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_request_headers(ctx: u32, n: usize, eos: u32) -> u32 {
                __d::stream(
                    &__LACEWING_DISPATCH,
                    ctx,
                    __d::Phase::RequestHeaders,
                    n,
                    eos != 0,
                )
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_request_body(ctx: u32, n: usize, eos: u32) -> u32 {
                __d::stream(
                    &__LACEWING_DISPATCH,
                    ctx,
                    __d::Phase::RequestBody,
                    n,
                    eos != 0,
                )
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_request_trailers(ctx: u32, n: usize) -> u32 {
                __d::stream(
                    &__LACEWING_DISPATCH,
                    ctx,
                    __d::Phase::RequestTrailers,
                    n,
                    true,
                )
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_response_headers(ctx: u32, n: usize, eos: u32) -> u32 {
                __d::stream(
                    &__LACEWING_DISPATCH,
                    ctx,
                    __d::Phase::ResponseHeaders,
                    n,
                    eos != 0,
                )
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_response_body(ctx: u32, n: usize, eos: u32) -> u32 {
                __d::stream(
                    &__LACEWING_DISPATCH,
                    ctx,
                    __d::Phase::ResponseBody,
                    n,
                    eos != 0,
                )
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_response_trailers(ctx: u32, n: usize) -> u32 {
                __d::stream(
                    &__LACEWING_DISPATCH,
                    ctx,
                    __d::Phase::ResponseTrailers,
                    n,
                    true,
                )
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_log(ctx: u32) {
                __d::log(&__LACEWING_DISPATCH, ctx)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_done(_ctx: u32) -> u32 {
                1
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_delete(ctx: u32) {
                __d::delete(&__LACEWING_DISPATCH, ctx)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_http_call_response(
                _ctx: u32,
                token: u32,
                headers: usize,
                body: usize,
                _trailers: usize,
            ) {
                __d::http_call_response(&__LACEWING_DISPATCH, token, headers, body)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_grpc_receive_initial_metadata(_c: u32, _t: u32, _n: usize) {}
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_grpc_receive(_ctx: u32, token: u32, size: usize) {
                __d::grpc_receive(token, size)
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_grpc_receive_trailing_metadata(_c: u32, _t: u32, _n: usize) {
            }
            #[unsafe(no_mangle)]
            pub extern "C" fn proxy_on_grpc_close(_ctx: u32, token: u32, status: u32) {
                __d::grpc_close(&__LACEWING_DISPATCH, token, status)
            }
        };
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct Cfg {
        #[serde(default)]
        name: String,
    }

    #[test]
    fn blank_configuration_reads_as_empty_object() {
        let c: Cfg = dispatch::parse_config(b"  ").unwrap();
        assert_eq!(
            c,
            Cfg {
                name: String::new()
            }
        );
    }

    #[test]
    fn bad_configuration_carries_serdes_message() {
        let e = dispatch::parse_config::<Cfg>(br#"{"nmae": "x"}"#).unwrap_err();
        assert!(e.contains("unknown field `nmae`"), "{e}");
    }

    #[test]
    fn host_calls_off_wasm_are_errors_not_panics() {
        let e = property("source.principal").unwrap_err();
        assert_eq!(e.status, Status::Unimplemented);
        assert!(metrics::Counter::define("x").is_err());
    }
}
