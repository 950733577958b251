//! Errors building the upstream clusters from configuration.

/// Why a set of clusters could not be built.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// An endpoint is not `host:port` or its host name did not resolve.
    #[error("cluster `{cluster}`: endpoint `{endpoint}`: {reason}")]
    Endpoint {
        cluster: String,
        endpoint: String,
        reason: String,
    },
    /// A cluster's TLS cannot be set up.
    #[error("cluster `{cluster}`: tls: {reason}")]
    Tls { cluster: String, reason: String },
    /// Two clusters share a name.
    #[error("cluster `{0}` is defined more than once")]
    DuplicateCluster(String),
}
