//! Builders for end-to-end tests: upstream servers, proxies and clients on 127.0.0.1:0.
//!
//! A test starts one or more [`servers`], writes a proxy config naming their
//! addresses, starts the proxy in-process with [`proxy::start`], and talks to it
//! through [`client`]. Conditions that become true after a while are polled
//! with [`eventually`] rather than waited for with sleeps.

pub mod access_log;
pub mod body;
pub mod client;
pub mod envoy;
pub mod generations;
pub mod grpc;
pub mod process;
pub mod proxy;
pub mod servers;
pub mod wasm;

mod eventually;

pub use eventually::{eventually, eventually_with};
