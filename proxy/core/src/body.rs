//! The one body type that crosses module boundaries.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full, combinators::UnsyncBoxBody};

/// Error type carried inside bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed body, boxed once so every layer can pass it along.
pub type BoxBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body with no bytes.
pub fn empty() -> BoxBody {
    Empty::<Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body made of one chunk.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}
