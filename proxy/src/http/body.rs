//! The body type the proxy hands to hyper for responses: no boxing for the
//! common cases (upstream passthrough, short local replies). An upstream
//! body carries its progress timer and its place in the connection's share,
//! and reports how it ended, so an exchange is recorded once its body is
//! through and a truncated or cut body is never logged as a clean response.

use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use lacewing_core::body::{BoxBody, BoxError};
use lacewing_core::{ProxyError, ResponseFlag};
use lacewing_upstream::H1Connection;
use tokio::time::{Instant, Sleep};

use super::progress::{self, HeldShare, OpenExchange, StreamWatch};
use super::proxy::ConnContext;

/// A response body: an upstream's, a local one, or a filtered stream.
pub enum ProxyBody {
    /// Nothing.
    Empty,
    /// One chunk (local replies).
    Full(Option<Bytes>),
    /// Straight from the upstream connection.
    Upstream(UpstreamBody),
    /// Any sendable body.
    Boxed(BoxBody),
    /// A body that lives on the worker thread (filtered streams).
    Local(Pin<Box<dyn Body<Data = Bytes, Error = BoxError>>>),
}

impl ProxyBody {
    /// A body of one chunk.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Self::Empty
        } else {
            Self::Full(Some(bytes))
        }
    }
}

impl std::fmt::Debug for ProxyBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Empty => "ProxyBody::Empty",
            Self::Full(_) => "ProxyBody::Full",
            Self::Upstream(_) => "ProxyBody::Upstream",
            Self::Boxed(_) => "ProxyBody::Boxed",
            Self::Local(_) => "ProxyBody::Local",
        })
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Self::Empty => Poll::Ready(None),
            Self::Full(chunk) => Poll::Ready(chunk.take().map(|b| Ok(Frame::data(b)))),
            Self::Upstream(body) => Pin::new(body).poll_frame(cx),
            Self::Boxed(body) => Pin::new(body).poll_frame(cx),
            Self::Local(body) => body.as_mut().poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::Full(chunk) => chunk.is_none(),
            Self::Upstream(body) => body.is_end_stream(),
            Self::Boxed(body) => body.is_end_stream(),
            Self::Local(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::Full(chunk) => SizeHint::with_exact(chunk.as_ref().map_or(0, |b| b.len() as u64)),
            Self::Upstream(body) => body.size_hint(),
            Self::Boxed(body) => body.size_hint(),
            Self::Local(body) => body.size_hint(),
        }
    }
}

/// How an upstream response body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BodyEnd {
    /// Every byte its framing announced arrived.
    Complete,
    /// It did not arrive whole; the flag says why: `UPE` the upstream broke
    /// it (closed early, bad chunking, a reset stream), `DC` the client left
    /// first, `UT` or `SI` a timer cut it. `details` says it in words.
    Cut { flag: ResponseFlag, details: String },
}

/// Called once with how an upstream body ended.
pub type OnBodyEnd = Box<dyn FnOnce(BodyEnd)>;

/// What the proxy learns of a request body as it streams: whether the
/// client broke it, and how many frames came (what the stream idle timer
/// looks at). Atomics because the body may travel to an upstream connection
/// task; only one thread touches them, so they stay uncontended.
#[derive(Debug, Default)]
pub struct RequestBodyState {
    failed: AtomicBool,
    frames: AtomicU64,
}

impl RequestBodyState {
    /// Whether reading the body from the client failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Frames read from the client so far.
    pub fn frames(&self) -> u64 {
        self.frames.load(Ordering::Relaxed)
    }
}

/// The client's request body on its way upstream, remembering whether the
/// client broke it (bad chunk framing, early close) so the failure is blamed
/// on the right side, and counting its frames as progress of the exchange.
pub struct DownstreamBody {
    inner: Incoming,
    state: Arc<RequestBodyState>,
}

impl DownstreamBody {
    /// Wraps a body whose progress and failure `state` records.
    pub fn new(inner: Incoming, state: Arc<RequestBodyState>) -> Self {
        Self { inner, state }
    }
}

impl Body for DownstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.state.frames.fetch_add(1, Ordering::Relaxed);
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.state.failed.store(true, Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The per-stream idle timer's view of an exchange whose response head has
/// come: the timeout and the request body still streaming, if any.
struct StreamIdle {
    limit: Duration,
    request: Option<Arc<RequestBodyState>>,
    /// Request body frames at the last look.
    seen: u64,
}

impl StreamIdle {
    /// Whether the request body moved since the last look (and looks again).
    fn request_moved(&mut self) -> bool {
        let frames = self.request.as_ref().map_or(0, |r| r.frames());
        std::mem::replace(&mut self.seen, frames) != frames
    }
}

/// An upstream response body on its way to the client, with the timer that
/// cuts it when the upstream stalls (`upstream_body_timeout`), and what the
/// connection's write timer needs to tell a client that does not read.
///
/// Costs: nothing for a body that is complete when first polled; the timer
/// is allocated on the first wait for the upstream and re-armed (one clock
/// read) only on a wait that follows progress, never per frame.
pub struct UpstreamBody {
    /// `None` once the body ended or was cut: dropping it releases the
    /// upstream connection.
    inner: Option<Incoming>,
    conn: Rc<ConnContext>,
    limit: Duration,
    timer: Option<Pin<Box<Sleep>>>,
    /// `max_stream_duration`, when set: allocated with the body, only then.
    deadline: Option<(Duration, Pin<Box<Sleep>>)>,
    /// `stream_idle_timeout`, when it is shorter than `limit`: then the
    /// timer waits for it instead, and a request body that still streams
    /// counts as progress.
    idle: Option<StreamIdle>,
    /// A frame went out since the timer was last armed.
    progressed: bool,
    /// Counted in the connection's bodies waiting on the client.
    waiting_on_client: bool,
    /// The HTTP/2 stream it goes out on, which the connection's write timer
    /// watches (`None` on HTTP/1.1).
    stream: Option<Rc<StreamWatch>>,
    /// The HTTP/1 connection the body comes from, asked at the body's end
    /// whether bytes came beyond it.
    connection: Option<H1Connection>,
    /// Held until the body ends.
    share: Option<HeldShare>,
    /// The exchange is open until the body ends.
    open: Option<OpenExchange>,
    /// Learns how the body ended (records the exchange).
    on_end: Option<OnBodyEnd>,
}

impl UpstreamBody {
    /// Wraps an upstream body that must make progress within `limit`.
    pub fn new(
        inner: Incoming,
        conn: Rc<ConnContext>,
        limit: Duration,
        share: Option<HeldShare>,
        open: OpenExchange,
    ) -> Self {
        let mut body = Self {
            inner: None,
            conn,
            limit,
            timer: None,
            deadline: None,
            idle: None,
            progressed: false,
            waiting_on_client: false,
            stream: progress::current_stream(),
            connection: None,
            share,
            open: Some(open),
            on_end: None,
        };
        if !inner.is_end_stream() {
            body.inner = Some(inner);
            // Until the client asks for data, the data waits on the client.
            body.set_waiting_on_client(true);
        }
        body
    }

    /// Cuts the body at `at` (the request's start plus `max_stream_duration`),
    /// checked whenever the body is polled: a client that takes nothing is
    /// cut by the write timer instead.
    pub fn with_deadline(mut self, max: Duration, at: Instant) -> Self {
        if self.inner.is_some() {
            self.deadline = Some((max, Box::pin(tokio::time::sleep_until(at))));
        }
        self
    }

    /// Ends the exchange with flag `SI` when neither the upstream body nor
    /// the `request` body moves for `limit` (`0` is off). Only a limit
    /// shorter than the upstream body timeout changes anything: the longer
    /// timer could never fire first.
    pub fn with_stream_idle(
        mut self,
        limit: Duration,
        request: Option<Arc<RequestBodyState>>,
    ) -> Self {
        if !limit.is_zero() && limit < self.limit && self.inner.is_some() {
            let seen = request.as_ref().map_or(0, |r| r.frames());
            self.idle = Some(StreamIdle {
                limit,
                request,
                seen,
            });
        }
        self
    }

    /// Checks at the body's end that `connection` (the HTTP/1 connection it
    /// comes from) received no bytes beyond it: a body followed by more than
    /// its framing announced is cut (its last frame withheld) and flagged
    /// `UPE`, like one that ends short.
    pub fn with_connection(mut self, connection: Option<H1Connection>) -> Self {
        if self.inner.is_some() {
            self.connection = connection;
        }
        self
    }

    /// Whether the upstream sent bytes beyond the body (known by its end).
    fn overran(&self) -> bool {
        self.connection.as_ref().is_some_and(H1Connection::overran)
    }

    /// Sets what learns how the body ended.
    pub fn on_end(&mut self, on_end: OnBodyEnd) {
        self.on_end = Some(on_end);
    }

    fn set_waiting_on_client(&mut self, waiting: bool) {
        if self.waiting_on_client != waiting {
            self.waiting_on_client = waiting;
            self.conn.progress.set_waiting_on_client(waiting);
            if let Some(stream) = &self.stream {
                stream.set_waiting_on_client(waiting);
            }
        }
    }

    /// The body is over: the upstream connection and the share go back,
    /// and the exchange is recorded with how it ended.
    fn finish(&mut self, how: BodyEnd) {
        self.inner = None;
        self.deadline = None;
        self.idle = None;
        self.share = None;
        self.open = None;
        self.set_waiting_on_client(false);
        if let Some(on_end) = self.on_end.take() {
            on_end(how);
        }
    }

    fn cut_by(&mut self, flag: ResponseFlag, details: String) {
        self.finish(BodyEnd::Cut { flag, details });
    }

    /// Cuts the body for `err`, which goes on to hyper.
    fn cut(&mut self, err: ProxyError) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.cut_by(err.flag(), err.to_string());
        Poll::Ready(Some(Err(err.into())))
    }
}

/// Why a body followed by more bytes than its framing announced is cut.
const BEYOND_LENGTH: &str = "bytes beyond the response body's framing";

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some((max, deadline)) = this.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            let max = *max;
            return this.cut(ProxyError::StreamDuration(max));
        }
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        match Pin::new(inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.progressed = true;
                this.conn.progress.frame_sent();
                if let Some(stream) = &this.stream {
                    stream.frame_sent();
                }
                this.set_waiting_on_client(true);
                if this.inner.as_ref().is_some_and(Incoming::is_end_stream) {
                    if this.overran() {
                        return this.cut(ProxyError::UpstreamFraming(BEYOND_LENGTH));
                    }
                    this.finish(BodyEnd::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                // The error goes on to hyper, which closes the HTTP/1
                // connection before the body's end (no last chunk, fewer
                // bytes than Content-Length) or resets the h2 stream: a
                // broken body never reaches the client as a complete one.
                let details = format!("upstream response body: {e}");
                this.cut_by(ResponseFlag::UpstreamProtocolError, details);
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                if this.overran() {
                    return this.cut(ProxyError::UpstreamFraming(BEYOND_LENGTH));
                }
                this.finish(BodyEnd::Complete);
                Poll::Ready(None)
            }
            Poll::Pending => {
                this.set_waiting_on_client(false);
                let limit = this.idle.as_ref().map_or(this.limit, |i| i.limit);
                let timer = this
                    .timer
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
                if std::mem::take(&mut this.progressed) {
                    timer.as_mut().reset(Instant::now() + limit);
                }
                loop {
                    if timer.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    match this.idle.as_mut().map(StreamIdle::request_moved) {
                        // The client still sends its body: not idle.
                        Some(true) => timer.as_mut().reset(Instant::now() + limit),
                        Some(false) => return this.cut(ProxyError::StreamIdle(limit)),
                        None => return this.cut(ProxyError::UpstreamBodyTimeout(limit)),
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(|b| b.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), |b| b.size_hint())
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        if self.inner.is_some() {
            // Not finished: a stream or connection closed by one of its
            // timers records the cut on each exchange it ends; otherwise the
            // client left.
            let stream_cut = self.stream.as_ref().is_some_and(|s| s.is_cut());
            let (flag, details) = match self.conn.progress.cut_flag() {
                _ if stream_cut => (
                    ResponseFlag::StreamIdleTimeout,
                    "the client took none of this stream's response data within write_timeout",
                ),
                Some(flag) => (flag, "the connection was closed by its write_timeout"),
                None => (
                    ResponseFlag::DownstreamConnectionTermination,
                    "the client left before the response body's end",
                ),
            };
            self.cut_by(flag, details.to_string());
        }
    }
}
