//! Typed access to the stream a filter runs on: header maps, bodies (chunk by
//! chunk or buffered whole), trailers, and local replies.

use lacewing_abi::{BufferType, MapType};

use crate::error::Result;
use crate::hostcalls;

/// A header map of the current stream: request or response headers or trailers.
#[derive(Debug, Clone, Copy)]
pub struct Headers(MapType);

impl Headers {
    /// The request headers (`:method`, `:path`, `:authority` included).
    pub const REQUEST: Headers = Headers(MapType::HttpRequestHeaders);
    /// The response headers (`:status` included).
    pub const RESPONSE: Headers = Headers(MapType::HttpResponseHeaders);
    /// The request trailers.
    pub const REQUEST_TRAILERS: Headers = Headers(MapType::HttpRequestTrailers);
    /// The response trailers.
    pub const RESPONSE_TRAILERS: Headers = Headers(MapType::HttpResponseTrailers);

    /// One header's value (names are case-insensitive); `Ok(None)` when absent.
    pub fn get(&self, name: &str) -> Result<Option<String>> {
        hostcalls::header(self.0, name)
    }

    /// One header's value borrowed for the time of `read`; `Ok(None)` when
    /// absent. Cheaper than [`Headers::get`] when the value is not kept: it is
    /// never copied into a `String` of its own.
    ///
    /// ```no_run
    /// # use lacewing_sdk::http::Headers;
    /// # fn f(headers: &Headers) -> lacewing_sdk::Result<()> {
    /// let json = headers.with_value("content-type", |v| v.starts_with("application/json"))?;
    /// # Ok(()) }
    /// ```
    pub fn with_value<R>(&self, name: &str, read: impl FnOnce(&str) -> R) -> Result<Option<R>> {
        hostcalls::with_header(self.0, name, read)
    }

    /// Every header, in order.
    pub fn all(&self) -> Result<Vec<(String, String)>> {
        hostcalls::header_pairs(self.0)
    }

    /// Every header, in order, borrowed for the time of `f`: cheaper than
    /// [`Headers::all`], which copies each name and value into a `String`.
    ///
    /// ```no_run
    /// # use lacewing_sdk::http::Headers;
    /// # fn f(headers: &Headers) -> lacewing_sdk::Result<()> {
    /// let has_auth = headers.with_all(|pairs| pairs.iter().any(|(k, _)| *k == "authorization"))?;
    /// # Ok(()) }
    /// ```
    pub fn with_all<R>(&self, f: impl FnOnce(&[(&str, &str)]) -> R) -> Result<R> {
        hostcalls::with_header_pairs(self.0, f)
    }

    /// Sets a header to one value, replacing any others.
    pub fn set(&self, name: &str, value: &str) -> Result<()> {
        hostcalls::set_header(self.0, name, value)
    }

    /// Adds a value, keeping existing ones.
    pub fn add(&self, name: &str, value: &str) -> Result<()> {
        hostcalls::add_header(self.0, name, value)
    }

    /// Removes every value of a header.
    pub fn remove(&self, name: &str) -> Result<()> {
        hostcalls::remove_header(self.0, name)
    }

    /// Replaces the whole map.
    pub fn replace_all(&self, headers: &[(&str, &str)]) -> Result<()> {
        hostcalls::set_header_pairs(self.0, headers)
    }
}

/// A body as the current callback sees it: the bytes buffered so far.
///
/// A body callback that returns [`crate::Action::Pause`] asks the host to keep
/// buffering; the next callback then sees the whole body so far, and the one
/// with `end_of_stream` sees all of it. Returning `Continue` passes the bytes
/// on (chunked processing).
#[derive(Debug, Clone, Copy)]
pub struct Body {
    kind: BufferType,
    size: usize,
}

impl Body {
    pub(crate) fn request(size: usize) -> Self {
        Self {
            kind: BufferType::HttpRequestBody,
            size,
        }
    }

    pub(crate) fn response(size: usize) -> Self {
        Self {
            kind: BufferType::HttpResponseBody,
            size,
        }
    }

    /// Bytes buffered for this callback.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Whether no bytes are buffered.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// The buffered bytes.
    pub fn read(&self) -> Result<Vec<u8>> {
        Ok(hostcalls::buffer(self.kind, 0, self.size)?.unwrap_or_default())
    }

    /// Replaces the buffered bytes with `data`.
    pub fn replace(&self, data: &[u8]) -> Result<()> {
        hostcalls::set_buffer(self.kind, 0, self.size, data)
    }
}

/// Answers the request locally with `status`, `headers` and `body`; the
/// upstream is not called (or its response is dropped). `details` is recorded
/// as the reply's reason (`response.code_details`).
///
/// ```no_run
/// lacewing_sdk::http::send_response(403, &[("x-denied-by", "authz")], b"denied\n", "authz_denied")?;
/// # Ok::<(), lacewing_sdk::HostError>(())
/// ```
pub fn send_response(
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
    details: &str,
) -> Result<()> {
    hostcalls::send_response(status, headers, body, details)
}
