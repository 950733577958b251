//! The body type the proxy hands to hyper for responses: no boxing for the
//! common cases (upstream passthrough, short local replies). An upstream body
//! reports how it ended, so an exchange is recorded only once its body is
//! through and a truncated body is never logged as a clean response.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use lacewing_core::body::{BoxBody, BoxError};

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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// Every byte its framing announced arrived.
    Complete,
    /// The upstream broke it: closed early, bad chunking, a reset stream.
    Failed,
    /// Dropped before its end: the client went away.
    Abandoned,
}

/// Called once with how an upstream body ended.
pub type OnBodyEnd = Box<dyn FnOnce(BodyEnd)>;

/// An upstream response body on its way downstream. Its error goes on to
/// hyper, which then closes the HTTP/1 connection before the body's end
/// (no last chunk, fewer bytes than `Content-Length`) or resets the h2
/// stream: a broken body never reaches the client as a complete one.
pub struct UpstreamBody {
    inner: Incoming,
    on_end: Option<OnBodyEnd>,
}

impl UpstreamBody {
    /// Wraps `inner`; `on_end` (if any) learns how it ended.
    pub fn new(inner: Incoming, on_end: Option<OnBodyEnd>) -> Self {
        Self { inner, on_end }
    }

    /// Sets what learns how the body ended.
    pub fn on_end(&mut self, on_end: OnBodyEnd) {
        self.on_end = Some(on_end);
    }

    fn end(&mut self, how: BodyEnd) {
        if let Some(on_end) = self.on_end.take() {
            on_end(how);
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.end(BodyEnd::Complete),
            Poll::Ready(Some(Err(_))) => this.end(BodyEnd::Failed),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => {
                this.end(BodyEnd::Complete);
            }
            _ => {}
        }
        polled.map(|f| f.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for UpstreamBody {
    fn drop(&mut self) {
        let how = if self.inner.is_end_stream() {
            BodyEnd::Complete
        } else {
            BodyEnd::Abandoned
        };
        self.end(how);
    }
}

/// The client's request body on its way upstream, remembering whether the
/// client broke it (bad chunk framing, early close) so the failure is blamed
/// on the right side.
pub struct DownstreamBody {
    inner: Incoming,
    failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl DownstreamBody {
    /// Wraps a body; `failed` turns true if reading it from the client fails.
    pub fn new(inner: Incoming, failed: std::sync::Arc<std::sync::atomic::AtomicBool>) -> Self {
        Self { inner, failed }
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
            Poll::Ready(Some(Err(e))) => {
                this.failed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Poll::Ready(Some(Err(e.into())))
            }
            other => other.map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
