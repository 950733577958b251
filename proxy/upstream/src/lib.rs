//! Lacewing upstream clusters: endpoints, load balancing, connection pools,
//! timeouts, retries, outlier ejection and circuit breaking.
//!
//! [`Upstreams`] is built once per configuration generation from the cluster
//! configs, carrying unchanged clusters over; a cluster's endpoint set can
//! change in place; host names are resolved by a [`Resolver`] thread; the data plane and the wasm host send requests through a
//! [`Cluster`]. A cluster with `tls` opens mutual TLS connections with the
//! proxy's live mesh identity. Counters that several workers must agree on (active requests,
//! circuit-breaker limits, ejections) are shared atomics; connection pools are
//! per worker thread, so the request path takes no lock.

mod breaker;
mod clock;
mod cluster;
mod dns;
mod endpoint;
mod error;
mod lb;
mod outlier;
mod pool;
mod tls;
mod upstreams;

pub use cluster::{Cluster, RequestPolicy, UpstreamResponse};
pub use dns::Resolver;
pub use error::UpstreamError;
pub use pool::H1Connection;
pub use tls::Conn;
pub use upstreams::Upstreams;
