//! HTTP and gRPC callouts (`proxy_http_call`, `proxy_grpc_call`,
//! `proxy_grpc_stream`) sent through the proxy's clusters; none of it needs
//! wasmtime.
//!
//! [`http_call`] (in `http`) turns the module's header pairs, body and
//! trailers into a request and collects the whole response under a size
//! limit. [`grpc_start`] (in `grpc_stream`) opens a gRPC stream whose
//! messages are framed and parsed by `grpc_frame`; everything the module
//! must hear about comes back as [`GrpcEvent`]s, ending with exactly one
//! [`GrpcEvent::Close`] unless the module cancelled the stream.

mod body;
mod grpc_frame;
mod grpc_stream;
mod http;
#[cfg(test)]
mod test_support;

use ::http::{HeaderMap, HeaderName, HeaderValue};
use bytes::Bytes;
use lacewing_core::ProxyError;

pub use grpc_stream::{GrpcEvent, GrpcStreamHandle, grpc_start};
pub use http::{HttpCallResponse, http_call};

/// Largest HTTP callout response body collected for a module.
pub const MAX_HTTP_CALL_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Largest gRPC message sent or received.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// gRPC status codes the host reports itself.
pub mod grpc_status {
    /// Success.
    pub const OK: u32 = 0;
    /// The caller cancelled the call.
    pub const CANCELLED: u32 = 1;
    /// An error without a better code (e.g. no or an unreadable `grpc-status`).
    pub const UNKNOWN: u32 = 2;
    /// The deadline passed before the call ended.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// The caller may not call this.
    pub const PERMISSION_DENIED: u32 = 7;
    /// A message exceeded the size limit.
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// The server does not implement the method.
    pub const UNIMPLEMENTED: u32 = 12;
    /// The call broke a protocol rule (bad frame, bad request).
    pub const INTERNAL: u32 = 13;
    /// The server could not be reached or the connection failed.
    pub const UNAVAILABLE: u32 = 14;
    /// The caller is not authenticated.
    pub const UNAUTHENTICATED: u32 = 16;
}

/// Why an HTTP callout (or a gRPC send) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalloutError {
    /// The configuration has no cluster of that name.
    #[error("unknown cluster `{0}`")]
    UnknownCluster(String),
    /// The module's request is malformed.
    #[error("bad callout request: {0}")]
    BadRequest(String),
    /// No complete response within the callout's timeout.
    #[error("callout timed out")]
    Timeout,
    /// The upstream could not be reached or failed mid-response.
    #[error("callout failed: {0}")]
    Upstream(String),
    /// The response body (or a gRPC message) exceeds its size limit.
    #[error("callout body exceeds its size limit")]
    BodyTooLarge,
}

impl From<ProxyError> for CalloutError {
    fn from(error: ProxyError) -> Self {
        match error {
            ProxyError::UpstreamTimeout(_) => Self::Timeout,
            other => Self::Upstream(other.to_string()),
        }
    }
}
fn header_name(name: &str) -> Result<HeaderName, CalloutError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| CalloutError::BadRequest(format!("invalid header name {name:?}")))
}

fn header_value(name: &str, value: &[u8]) -> Result<HeaderValue, CalloutError> {
    HeaderValue::from_bytes(value)
        .map_err(|_| CalloutError::BadRequest(format!("invalid value for header {name:?}")))
}

/// Header pairs as modules see them.
fn pairs(map: &HeaderMap) -> Vec<(String, Bytes)> {
    map.iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}
