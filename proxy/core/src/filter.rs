//! Filter traits: the phases of a request and of a connection, as proxy-wasm defines them.
//!
//! ```text
//! request:  headers ─▶ body* ─▶ trailers ─▶ (upstream) ─▶ response headers ─▶ body* ─▶ trailers ─▶ log ─▶ done
//! tcp:      new connection ─▶ downstream data* / upstream data* ─▶ close events ─▶ log ─▶ done
//! ```
//!
//! Callbacks are synchronous and run on the worker thread. A filter that needs
//! to wait (for a callout, a tick, a queue item) returns a stop status and
//! later calls [`crate::stream::HttpStream::resume`] from whichever callback
//! learns the answer; a filter that answers locally sets
//! [`crate::stream::HttpStream::local_reply`]. Every method has a default, so
//! a filter implements only the phases it cares about.
//!
//! What a stop holds, phase by phase (as Envoy's filter manager does):
//! - headers: `StopIteration` holds the headers and the body behind them; the
//!   filter sees no body callback until it resumes, and the request headers
//!   stay writable until then.
//! - body: `StopAndBuffer` keeps the chunk and calls the filter again with the
//!   growing buffer on each new chunk (up to the listener's
//!   `max_buffered_body`: 413 on requests, a reset on responses);
//!   `StopNoBuffer` (and `StopIteration`) takes the chunk out of the stream,
//!   so it is not forwarded. A resume passes what the filter holds on.
//! - trailers: `StopIteration` holds the trailers (and the body held before them).
//! - connection data: `StopIteration` holds the bytes; later bytes are added
//!   and the filter is called again with all of them, until it continues or
//!   resumes.

use crate::stream::{SharedConnection, SharedStream};

/// What a filter callback asks the data plane to do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterStatus {
    /// Go on to the next filter (or upstream).
    Continue,
    /// Stop here until the filter resumes the stream. In a body phase the
    /// chunk is taken, as with [`FilterStatus::StopNoBuffer`].
    StopIteration,
    /// Body phases: keep the chunk, calling the filter with the growing
    /// buffer, until it returns `Continue`, resumes the stream, or the buffer
    /// limit is hit (413 on requests).
    StopAndBuffer,
    /// Body phases: stop, and neither forward nor keep the chunk (the filter
    /// took it); later chunks still reach the filter.
    StopNoBuffer,
}

impl FilterStatus {
    /// Whether iteration goes on to the next filter.
    pub fn is_continue(self) -> bool {
        self == Self::Continue
    }
}

/// Which peer closed a TCP connection (proxy-wasm `PeerType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerType {
    Unknown = 0,
    Local = 1,
    Remote = 2,
}

/// A filter on one HTTP stream. Dropping it ends its life (proxy-wasm on_done/on_delete).
pub trait HttpFilter {
    /// The request head arrived; the headers are in `stream.request`.
    fn on_request_headers(&mut self, _stream: &SharedStream, _end_of_stream: bool) -> FilterStatus {
        FilterStatus::Continue
    }
    /// A request body chunk arrived; the buffered bytes are in `stream.request_body`.
    fn on_request_body(&mut self, _stream: &SharedStream, _end_of_stream: bool) -> FilterStatus {
        FilterStatus::Continue
    }
    /// Request trailers arrived in `stream.request_trailers`.
    fn on_request_trailers(&mut self, _stream: &SharedStream) -> FilterStatus {
        FilterStatus::Continue
    }
    /// The response head is in `stream.response`.
    fn on_response_headers(
        &mut self,
        _stream: &SharedStream,
        _end_of_stream: bool,
    ) -> FilterStatus {
        FilterStatus::Continue
    }
    /// A response body chunk is in `stream.response_body`.
    fn on_response_body(&mut self, _stream: &SharedStream, _end_of_stream: bool) -> FilterStatus {
        FilterStatus::Continue
    }
    /// Response trailers are in `stream.response_trailers`.
    fn on_response_trailers(&mut self, _stream: &SharedStream) -> FilterStatus {
        FilterStatus::Continue
    }
    /// The exchange is over (completed, reset or answered locally); read-only.
    fn on_log(&mut self, _stream: &SharedStream) {}
    /// Whether the filter wants body callbacks; when false the data plane
    /// streams bodies without copying them into the stream buffers.
    fn wants_request_body(&self) -> bool {
        true
    }
    /// See [`HttpFilter::wants_request_body`].
    fn wants_response_body(&self) -> bool {
        true
    }
}

/// Makes the per-request filter of one plugin. Shared by all workers.
pub trait HttpFilterFactory: Send + Sync {
    /// Plugin name, for logs and metrics.
    fn name(&self) -> &str;
    /// A filter for a new stream, on the current worker thread. `None` means
    /// the plugin takes no part in this stream (for example a fail-open plugin
    /// whose VM cannot start).
    fn create(&self, stream: &SharedStream) -> Option<Box<dyn HttpFilter>>;
}

/// A filter on one TCP connection. Dropping it ends its life.
pub trait NetworkFilter {
    /// The connection was accepted.
    fn on_new_connection(&mut self, _conn: &SharedConnection) -> FilterStatus {
        FilterStatus::Continue
    }
    /// Bytes from downstream are in `conn.downstream_data`.
    fn on_downstream_data(
        &mut self,
        _conn: &SharedConnection,
        _end_of_stream: bool,
    ) -> FilterStatus {
        FilterStatus::Continue
    }
    /// Bytes from upstream are in `conn.upstream_data`.
    fn on_upstream_data(&mut self, _conn: &SharedConnection, _end_of_stream: bool) -> FilterStatus {
        FilterStatus::Continue
    }
    /// The downstream side closed.
    fn on_downstream_close(&mut self, _conn: &SharedConnection, _peer: PeerType) {}
    /// The upstream side closed.
    fn on_upstream_close(&mut self, _conn: &SharedConnection, _peer: PeerType) {}
    /// The connection is over.
    fn on_log(&mut self, _conn: &SharedConnection) {}
}

/// Makes the per-connection filter of one plugin. Shared by all workers.
pub trait NetworkFilterFactory: Send + Sync {
    /// Plugin name, for logs and metrics.
    fn name(&self) -> &str;
    /// A filter for a new connection on the current worker thread.
    fn create(&self, conn: &SharedConnection) -> Option<Box<dyn NetworkFilter>>;
}
