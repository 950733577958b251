//! How filters reach upstream clusters on their own (proxy-wasm HTTP and gRPC callouts).

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use crate::body::BoxBody;
use crate::error::ProxyError;

/// A future that runs on the worker thread.
pub type LocalFuture<T> = Pin<Box<dyn Future<Output = T>>>;

/// The clusters of the live configuration, as filters may call them.
pub trait Upstreams: Send + Sync {
    /// Whether a cluster of that name exists.
    fn has_cluster(&self, name: &str) -> bool;

    /// Sends a request to a cluster through its load balancer and pool. The
    /// request URI's path is used; scheme and authority are the cluster's.
    /// `timeout` bounds the wait for the response head.
    fn send(
        &self,
        cluster: &str,
        request: http::Request<BoxBody>,
        timeout: Duration,
    ) -> LocalFuture<Result<http::Response<BoxBody>, ProxyError>>;
}
