//! Shared vocabulary of the Lacewing data plane.
//!
//! Everything in `proxy/` speaks these types: typed errors that know where they
//! came from, the drain signal, the per-request stream state that filters read
//! and write, and the filter traits that mirror the proxy-wasm phases. This
//! crate knows nothing of sockets or of wasmtime.

pub mod body;
pub mod callout;
pub mod drain;
pub mod error;
pub mod filter;
pub mod line_queue;
pub mod metrics;
pub mod stream;
pub mod timer;

pub use error::{ErrorOrigin, ProxyError, ResponseFlag};
