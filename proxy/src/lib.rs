//! The Lacewing data plane: listeners, routing, the HTTP and TCP proxy paths,
//! the admin endpoint and the worker runtimes that carry them.
//!
//! [`Proxy::start`] turns a [`lacewing_config::ProxyConfig`] into running
//! workers; [`ProxyHandle::publish`] (or a [`Publisher`]) swaps in a new
//! configuration generation while they run. See `docs/architecture.md` for
//! the request phases and the generations.

pub mod accept;
pub mod access_log;
pub mod admin;
pub mod app;
pub mod chain;
pub mod http;
pub mod listener;
pub mod publish;
pub mod router;
pub mod snapshot;
pub mod tcp;
pub mod worker;

pub use app::{Proxy, ProxyHandle, StartError, StartOptions, default_cache_dir};
pub use publish::{Generation, PublishError, Publisher};
