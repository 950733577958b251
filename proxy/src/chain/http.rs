//! The HTTP filter chain of one stream.
//!
//! ```text
//! request headers ─▶ request body* ─▶ request trailers ─▶ (upstream or local reply)
//!   ─▶ response headers ─▶ response body* ─▶ response trailers ─▶ log
//! ```
//! Request phases walk the filters in order, response phases in reverse. A
//! stop holds what its phase carries until the filter resumes the stream
//! (see `lacewing_core::filter` for what each stop holds); a stream paused
//! longer than the route timeout ends with [`ProxyError::FilterTimeout`].
//! A local reply, whoever makes it, runs the response phases of the filters
//! that saw the request headers, the replying one included, as Envoy does.

use std::cell::{Cell, RefCell};
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::FutureExt;
use http::HeaderMap;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use lacewing_core::ProxyError;
use lacewing_core::body::BoxError;
use lacewing_core::filter::{FilterStatus, HttpFilter, HttpFilterFactory};
use lacewing_core::stream::{HttpStream, LocalReply, SharedStream};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;

use super::Direction;
use super::body::{Holds, Passage};

/// Why a stream stopped before its exchange completed.
#[derive(Debug)]
pub enum Stop {
    /// A filter answered (or failed closed): this reply goes downstream.
    Reply(Box<LocalReply>),
    /// A filter reset the stream.
    Reset,
    /// The proxy gives up on the stream (limit, pause timeout).
    Error(ProxyError),
}

/// Limits of one stream's chain.
#[derive(Debug, Clone, Copy)]
pub struct ChainLimits {
    /// Most body bytes a filter may hold (`max_buffered_body`).
    pub max_buffered: usize,
    /// How long a filter may keep the stream paused (the route timeout).
    pub pause_limit: Duration,
}

/// One filter of the chain and the factory that made it (for its name).
struct Slot {
    factory: Arc<dyn HttpFilterFactory>,
    filter: Box<dyn HttpFilter>,
}

struct Inner {
    stream: SharedStream,
    slots: RefCell<Vec<Slot>>,
    limits: ChainLimits,
    started: Instant,
    /// How many filters, in request order, saw the request headers.
    entered: Cell<usize>,
    wants_request_body: bool,
    wants_response_body: bool,
    /// A stop found while the request body was pumped.
    request_stop: RefCell<Option<Stop>>,
    request_stopped: Notify,
    finished: Cell<bool>,
}

/// The filters of one HTTP stream.
pub struct HttpChain {
    inner: Option<Rc<Inner>>,
}

type FrameResult = Result<Frame<Bytes>, BoxError>;

/// A body fed by a chain's pump task.
pub struct PumpedBody {
    rx: mpsc::Receiver<FrameResult>,
}

impl Body for PumpedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult>> {
        self.rx.poll_recv(cx)
    }
}

/// Runs `on_log` on every filter and ends their lives when dropped.
struct Finish(Rc<Inner>);

impl Drop for Finish {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// A response body after a non-empty chain: the filters' lives end when it
/// is done or dropped.
pub struct FilteredBody<B> {
    source: Source<B>,
    finish: Option<Finish>,
}

enum Source<B> {
    /// No filter wants the body: it passes untouched.
    Untouched(B),
    /// The filters see each chunk inside this body's poll, while none of
    /// them holds bytes: no pump future and no channel per response (they
    /// cost about 2k instructions a request). The first stop or trailers
    /// hand the rest to a pump.
    Direct {
        body: B,
        inner: Rc<Inner>,
        /// The source and the filters are through with the body.
        done: bool,
    },
    /// Between `Direct` and `Pumped`, for the moment of the move.
    Moving,
    /// The filters shape it in a pump that this body drives.
    Pumped {
        /// Reads the source and runs the filters; `None` once it has ended.
        pump: Option<LocalPump>,
        /// What the pump let through.
        out: PumpedBody,
    },
}

/// A pump future, driven by the body it feeds.
type LocalPump = Pin<Box<dyn Future<Output = ()>>>;

impl<B> Body for FilteredBody<B>
where
    B: Body<Data = Bytes> + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult>> {
        let this = self.get_mut();
        if let Source::Direct { .. } = this.source
            && let Some(polled) = this.poll_direct(cx)
        {
            if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
                this.finish.take();
            }
            return polled;
        }
        let polled = match &mut this.source {
            // `poll_direct` answered for a `Direct` source, or moved it to
            // a pump; `Moving` lasts only inside `move_to_pump`.
            Source::Direct { .. } | Source::Moving => Poll::Ready(None),
            Source::Untouched(body) => {
                let polled = Pin::new(body)
                    .poll_frame(cx)
                    .map(|f| f.map(|r| r.map_err(Into::into)));
                if let (Poll::Ready(Some(Ok(frame))), Some(finish)) = (&polled, &this.finish)
                    && let Some(data) = frame.data_ref()
                {
                    count_bytes(&finish.0, Direction::Response, data.len());
                }
                polled
            }
            Source::Pumped { pump, out } => {
                // The pump runs inside this poll rather than in a task of its
                // own: the first chunk is then ready at the server's first
                // poll, so head and body leave in one write, and no task is
                // spawned per response.
                if let Some(running) = pump
                    && running.as_mut().poll(cx).is_ready()
                {
                    *pump = None;
                }
                Pin::new(out).poll_frame(cx)
            }
        };
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            // The exchange is over: the filters log and end now.
            this.finish.take();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.source {
            Source::Untouched(body) => body.is_end_stream(),
            Source::Direct { done, .. } => *done,
            Source::Moving => true,
            Source::Pumped { out, .. } => out.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match &self.source {
            Source::Untouched(body) => body.size_hint(),
            Source::Direct { .. } | Source::Moving | Source::Pumped { .. } => {
                http_body::SizeHint::default()
            }
        }
    }
}

impl<B> FilteredBody<B>
where
    B: Body<Data = Bytes> + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    /// Polls a `Direct` source: each chunk goes through the response body
    /// phase here, as the pump would run it. `None` when the source moved to
    /// a pump (a filter held bytes, or trailers came), which the caller then polls.
    fn poll_direct(&mut self, cx: &mut Context<'_>) -> Option<Poll<Option<FrameResult>>> {
        let Source::Direct { body, inner, done } = &mut self.source else {
            return None;
        };
        if *done {
            return Some(Poll::Ready(None));
        }
        let direction = Direction::Response;
        let mut holds = Holds::default();
        loop {
            let frame = match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending => return Some(Poll::Pending),
                Poll::Ready(frame) => frame,
            };
            let (data, end) = match frame {
                None => (BytesMut::new(), true),
                Some(Err(e)) => {
                    *done = true;
                    return Some(Poll::Ready(Some(Err(e.into()))));
                }
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => (take_chunk(inner, direction, data), body.is_end_stream()),
                    Err(frame) => {
                        // Trailers: the pump runs their phase, with this frame first.
                        self.move_to_pump(Some(frame), holds, false);
                        return None;
                    }
                },
            };
            match inner.body_phase(direction, &mut holds, 0, data, end) {
                Ok(Passage::Through { data }) => {
                    *done = end;
                    if !data.is_empty() {
                        return Some(Poll::Ready(Some(Ok(Frame::data(data.freeze())))));
                    }
                    if end {
                        return Some(Poll::Ready(None));
                    }
                }
                Ok(Passage::Held) => {
                    self.move_to_pump(None, holds, end);
                    return None;
                }
                Err(_stop) => {
                    *done = true;
                    return Some(Poll::Ready(Some(Err(stopped_by_chain(direction)))));
                }
            }
        }
    }

    /// Hands a `Direct` source to a pump that starts with `holds`, fed
    /// `first` before the rest of the source.
    fn move_to_pump(&mut self, first: Option<Frame<Bytes>>, holds: Holds, source_done: bool) {
        let Source::Direct { body, inner, .. } =
            std::mem::replace(&mut self.source, Source::Moving)
        else {
            return;
        };
        let (tx, rx) = mpsc::channel(4);
        let body = Prefixed { first, rest: body };
        self.source = Source::Pumped {
            pump: Some(Box::pin(pump_from(
                inner,
                Direction::Response,
                body,
                tx,
                holds,
                source_done,
            ))),
            out: PumpedBody { rx },
        };
    }
}

/// A body that yields `first` (if any) before the frames of `rest`.
struct Prefixed<B> {
    first: Option<Frame<Bytes>>,
    rest: B,
}

impl<B> Body for Prefixed<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        if let Some(frame) = self.first.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

/// The error a body ends with when a filter stopped it.
fn stopped_by_chain(direction: Direction) -> BoxError {
    format!("{direction:?} stopped by the filter chain").into()
}

/// A response body after the chain.
pub enum ResponseBody<B> {
    /// The chain is empty: the body as it came.
    Plain(B),
    /// The chain has filters.
    Filtered(FilteredBody<B>),
}

impl HttpChain {
    /// A chain with no filters.
    pub fn empty() -> Self {
        Self { inner: None }
    }

    /// The filters `factories` make for `stream` (a factory may decline it).
    pub fn new(
        factories: &[Arc<dyn HttpFilterFactory>],
        stream: SharedStream,
        limits: ChainLimits,
    ) -> Self {
        let slots: Vec<Slot> = factories
            .iter()
            .filter_map(|factory| {
                factory.create(&stream).map(|filter| Slot {
                    factory: factory.clone(),
                    filter,
                })
            })
            .collect();
        let started = Instant::from_std(stream.borrow().info.start_instant);
        Self {
            inner: Some(Rc::new(Inner {
                wants_request_body: slots.iter().any(|s| s.filter.wants_request_body()),
                wants_response_body: slots.iter().any(|s| s.filter.wants_response_body()),
                stream,
                slots: RefCell::new(slots),
                limits,
                started,
                entered: Cell::new(0),
                request_stop: RefCell::new(None),
                request_stopped: Notify::new(),
                finished: Cell::new(false),
            })),
        }
    }

    /// Whether the chain has no filters.
    pub fn is_empty(&self) -> bool {
        self.inner.is_none()
    }

    /// The stream the filters act on (`None` for an empty chain).
    pub fn stream(&self) -> Option<&SharedStream> {
        self.inner.as_ref().map(|i| &i.stream)
    }

    /// The request head as the filters left it, for the upstream (`None` for
    /// an empty chain). The request's extensions (the upgrade handle) move with it.
    pub fn request_head(&self) -> Option<http::request::Parts> {
        let inner = self.inner.as_ref()?;
        let mut s = inner.stream.borrow_mut();
        let (mut head, ()) = http::Request::new(()).into_parts();
        head.method = s.request.method.clone();
        head.uri = s.request.uri.clone();
        head.version = s.request.version;
        head.headers = s.request.headers.clone();
        head.extensions = std::mem::take(&mut s.request.extensions);
        Some(head)
    }

    /// Runs the request headers phase; the request headers stay in the
    /// stream, writable, until it returns.
    pub async fn request_headers(&self, end_of_stream: bool) -> Result<(), Stop> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        inner
            .headers_phase(Direction::Request, |f, s| {
                f.on_request_headers(s, end_of_stream)
            })
            .await
    }

    /// Runs the response headers phase over the filters that saw the request
    /// (all of them after an upstream exchange) on the response in the stream.
    pub async fn response_headers(&self, end_of_stream: bool) -> Result<(), Stop> {
        let Some(inner) = &self.inner else {
            return Ok(());
        };
        inner
            .headers_phase(Direction::Response, |f, s| {
                f.on_response_headers(s, end_of_stream)
            })
            .await
    }

    /// The request body through the filters: the body itself when no filter
    /// wants it, otherwise a body fed by a pump task on this worker.
    pub fn request_body<B>(&self, body: B) -> Result<B, PumpedBody>
    where
        B: Body<Data = Bytes> + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        match &self.inner {
            Some(inner) if inner.wants_request_body && !body.is_end_stream() => {
                let (tx, rx) = mpsc::channel(4);
                tokio::task::spawn_local(pump(inner.clone(), Direction::Request, body, tx));
                Err(PumpedBody { rx })
            }
            _ => Ok(body),
        }
    }

    /// Waits until the request body pump stops the stream (never, for a chain
    /// without request body filters).
    pub async fn request_stopped(&self) -> Stop {
        let Some(inner) = &self.inner else {
            return std::future::pending().await;
        };
        loop {
            if let Some(stop) = inner.request_stop.borrow_mut().take() {
                return stop;
            }
            inner.request_stopped.notified().await;
        }
    }

    /// A stop the request body pump found, or a reply or reset a filter asked
    /// for since the last phase, if any.
    pub fn take_request_stop(&self) -> Option<Stop> {
        let inner = self.inner.as_ref()?;
        let found = inner.request_stop.borrow_mut().take();
        found.or_else(|| inner.stop_requested())
    }

    /// The response body through the filters that saw the request. The
    /// filters' lives end when that body is done or dropped.
    pub fn response_body<B>(mut self, body: B) -> ResponseBody<B>
    where
        B: Body<Data = Bytes> + Unpin + 'static,
        B::Error: Into<BoxError>,
    {
        let Some(inner) = self.inner.take() else {
            return ResponseBody::Plain(body);
        };
        let source = if inner.wants_response_body && !body.is_end_stream() {
            Source::Direct {
                body,
                inner: inner.clone(),
                done: false,
            }
        } else {
            Source::Untouched(body)
        };
        ResponseBody::Filtered(FilteredBody {
            source,
            finish: Some(Finish(inner)),
        })
    }
}

impl Drop for HttpChain {
    fn drop(&mut self) {
        // The exchange ended without a response body (reset, early answer
        // that never reached the body): the filters log and end now.
        if let Some(inner) = self.inner.take() {
            inner.finish();
        }
    }
}

impl Inner {
    /// A local reply or reset a filter asked for, if any.
    fn stop_requested(&self) -> Option<Stop> {
        let mut s = self.stream.borrow_mut();
        if s.reset {
            return Some(Stop::Reset);
        }
        s.local_reply.take().map(|r| Stop::Reply(Box::new(r)))
    }

    /// How many filters a phase in `direction` walks.
    fn count(&self, direction: Direction) -> usize {
        match direction {
            Direction::Request => self.slots.borrow().len(),
            Direction::Response => self.entered.get(),
        }
    }

    fn name(&self, index: usize) -> String {
        self.slots
            .borrow()
            .get(index)
            .map_or_else(String::new, |s| s.factory.name().to_string())
    }

    /// Drops a resume that came while the stream was not paused (as Envoy
    /// ignores a continue on a stream that is not stopped), so it cannot end
    /// the pause that starts now.
    fn forget_resumes(&self) {
        let resumed = self.stream.borrow().resumed();
        let _ = resumed.notified().now_or_never();
    }

    /// Waits for a resume until `deadline`; a timeout names the filter at `index`.
    async fn wait_resume(&self, index: usize, deadline: Instant) -> Result<(), Stop> {
        let resumed = self.stream.borrow().resumed();
        if tokio::time::timeout_at(deadline, resumed.notified())
            .await
            .is_err()
        {
            return Err(Stop::Error(ProxyError::FilterTimeout {
                filter: self.name(index),
                limit: self.limits.pause_limit,
            }));
        }
        self.stop_requested().map_or(Ok(()), Err)
    }

    /// Runs a headers phase over the filters of `direction`, pausing where one stops.
    async fn headers_phase(
        &self,
        direction: Direction,
        call: impl Fn(&mut dyn HttpFilter, &SharedStream) -> FilterStatus,
    ) -> Result<(), Stop> {
        let count = self.count(direction);
        for step in 0..count {
            let index = direction.index(step, count);
            if direction == Direction::Request {
                self.entered.set(step + 1);
            }
            let status = {
                let mut slots = self.slots.borrow_mut();
                let Some(slot) = slots.get_mut(index) else {
                    break;
                };
                call(slot.filter.as_mut(), &self.stream)
            };
            if let Some(stop) = self.stop_requested() {
                return Err(stop);
            }
            if !status.is_continue() {
                self.forget_resumes();
                let deadline = Instant::now() + self.limits.pause_limit;
                self.wait_resume(index, deadline).await?;
            }
        }
        Ok(())
    }

    /// Runs bytes (and the end, if `end`) through the body phase from `from`.
    fn body_phase(
        &self,
        direction: Direction,
        holds: &mut Holds,
        from: usize,
        mut data: BytesMut,
        end: bool,
    ) -> Result<Passage, Stop> {
        self.park(direction, holds);
        let count = self.count(direction);
        for step in from..count {
            let index = direction.index(step, count);
            let arriving = data.len();
            data = holds.prepend(step, data);
            if data.len() > arriving && data.len() > self.limits.max_buffered {
                // New bytes join a buffering filter's buffer past the limit:
                // over, whatever the filter would say (as Envoy adds them
                // before calling it).
                return Err(Stop::Error(ProxyError::BodyTooLarge {
                    limit: self.limits.max_buffered,
                }));
            }
            let status = {
                let mut slots = self.slots.borrow_mut();
                let Some(slot) = slots.get_mut(index) else {
                    break;
                };
                let wants = match direction {
                    Direction::Request => slot.filter.wants_request_body(),
                    Direction::Response => slot.filter.wants_response_body(),
                };
                if !wants {
                    continue;
                }
                *body_of(&mut self.stream.borrow_mut(), direction) = data;
                let status = match direction {
                    Direction::Request => slot.filter.on_request_body(&self.stream, end),
                    Direction::Response => slot.filter.on_response_body(&self.stream, end),
                };
                data = std::mem::take(body_of(&mut self.stream.borrow_mut(), direction));
                status
            };
            if let Some(stop) = self.stop_requested() {
                return Err(stop);
            }
            if status.is_continue() {
                continue;
            }
            if status == FilterStatus::StopAndBuffer && data.len() > self.limits.max_buffered {
                return Err(Stop::Error(ProxyError::BodyTooLarge {
                    limit: self.limits.max_buffered,
                }));
            }
            if !holds.holding() {
                self.forget_resumes();
            }
            let kept = holds.stop(step, status, data, end);
            *body_of(&mut self.stream.borrow_mut(), direction) = kept;
            return Ok(Passage::Held);
        }
        Ok(Passage::Through { data })
    }

    /// Parks held bytes that are in the stream's buffer.
    fn park(&self, direction: Direction, holds: &mut Holds) {
        holds.park(|| std::mem::take(body_of(&mut self.stream.borrow_mut(), direction)));
    }

    /// Takes what the first holding step holds.
    fn release(&self, direction: Direction, holds: &mut Holds) -> Option<(usize, BytesMut, bool)> {
        self.park(direction, holds);
        let step = holds.first()?;
        let (data, end) = holds.take(step);
        Some((step, data, end))
    }

    /// Runs the trailers phase of `direction` over every filter; bytes a
    /// filter held go on once its trailers do, before them.
    async fn trailers_phase(
        &self,
        direction: Direction,
        holds: &mut Holds,
        deadline: Instant,
        tx: &mpsc::Sender<FrameResult>,
    ) -> Result<(), Stop> {
        let count = self.count(direction);
        for step in 0..count {
            let index = direction.index(step, count);
            let status = {
                let mut slots = self.slots.borrow_mut();
                let Some(slot) = slots.get_mut(index) else {
                    break;
                };
                match direction {
                    Direction::Request => slot.filter.on_request_trailers(&self.stream),
                    Direction::Response => slot.filter.on_response_trailers(&self.stream),
                }
            };
            if let Some(stop) = self.stop_requested() {
                return Err(stop);
            }
            if !status.is_continue() {
                self.forget_resumes();
                self.wait_resume(index, deadline).await?;
            }
            // The bytes this filter held go on with its trailers.
            let released = if holds.first() == Some(step) {
                self.release(direction, holds)
            } else {
                None
            };
            if let Some((_, data, _)) = released
                && let Passage::Through { data } =
                    self.body_phase(direction, holds, step + 1, data, false)?
                && !data.is_empty()
            {
                let _ = tx.send(Ok(Frame::data(data.freeze()))).await;
            }
        }
        Ok(())
    }

    /// Runs `on_log` on every filter and ends their lives (once).
    fn finish(&self) {
        if self.finished.replace(true) {
            return;
        }
        let mut slots = std::mem::take(&mut *self.slots.borrow_mut());
        for slot in slots.iter_mut() {
            slot.filter.on_log(&self.stream);
        }
        drop(slots);
    }
}

fn body_of(s: &mut HttpStream, direction: Direction) -> &mut BytesMut {
    match direction {
        Direction::Request => &mut s.request_body,
        Direction::Response => &mut s.response_body,
    }
}

fn trailers_of(s: &mut HttpStream, direction: Direction) -> &mut Option<HeaderMap> {
    match direction {
        Direction::Request => &mut s.request_trailers,
        Direction::Response => &mut s.response_trailers,
    }
}

/// Why a pump ended early.
enum PumpEnd {
    /// The receiving side is gone.
    Closed,
    Stop(Stop),
    /// The source body failed.
    Source(BoxError),
}

impl From<Stop> for PumpEnd {
    fn from(stop: Stop) -> Self {
        Self::Stop(stop)
    }
}

/// Reads `body`, runs it through the filters of `direction` and feeds `tx`.
async fn pump<B>(inner: Rc<Inner>, direction: Direction, body: B, tx: mpsc::Sender<FrameResult>)
where
    B: Body<Data = Bytes> + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    pump_from(inner, direction, body, tx, Holds::default(), false).await;
}

/// [`pump`], taking over what the filters hold (and whether the source
/// ended) from a body that ran the phase itself until then.
async fn pump_from<B>(
    inner: Rc<Inner>,
    direction: Direction,
    body: B,
    tx: mpsc::Sender<FrameResult>,
    holds: Holds,
    source_done: bool,
) where
    B: Body<Data = Bytes> + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let end = run_pump(&inner, direction, body, &tx, holds, source_done).await;
    let error: BoxError = match end {
        Ok(()) | Err(PumpEnd::Closed) => return,
        Err(PumpEnd::Source(e)) => {
            if direction == Direction::Request {
                *inner.request_stop.borrow_mut() = Some(Stop::Error(ProxyError::DownstreamBody));
                inner.request_stopped.notify_one();
            }
            e
        }
        Err(PumpEnd::Stop(stop)) => {
            if direction == Direction::Request {
                *inner.request_stop.borrow_mut() = Some(stop);
                inner.request_stopped.notify_one();
            }
            stopped_by_chain(direction)
        }
    };
    let _ = tx.send(Err(error)).await;
}

async fn run_pump<B>(
    inner: &Inner,
    direction: Direction,
    mut body: B,
    tx: &mpsc::Sender<FrameResult>,
    mut holds: Holds,
    mut source_done: bool,
) -> Result<(), PumpEnd>
where
    B: Body<Data = Bytes> + Unpin + 'static,
    B::Error: Into<BoxError>,
{
    let resumed = inner.stream.borrow().resumed();
    // A paused request must go on within the route timeout from its start;
    // a paused response within it from the end of its body.
    let mut deadline = match direction {
        Direction::Request => inner.started + inner.limits.pause_limit,
        Direction::Response => Instant::now() + inner.limits.pause_limit,
    };
    let send = |passage: Passage| async move {
        if let Passage::Through { data, .. } = passage
            && !data.is_empty()
            && tx.send(Ok(Frame::data(data.freeze()))).await.is_err()
        {
            return Err(PumpEnd::Closed);
        }
        Ok(())
    };
    loop {
        if source_done && !holds.holding() {
            return Ok(());
        }
        tokio::select! {
            biased;
            () = resumed.notified(), if holds.holding() => {
                if let Some(stop) = inner.stop_requested() {
                    return Err(stop.into());
                }
                if let Some((step, data, end)) = inner.release(direction, &mut holds)
                    && (!data.is_empty() || end)
                {
                    send(inner.body_phase(direction, &mut holds, step + 1, data, end)?).await?;
                }
            }
            frame = body.frame(), if !source_done => {
                match frame {
                    None => {
                        source_done = true;
                        if direction == Direction::Response {
                            deadline = Instant::now() + inner.limits.pause_limit;
                        }
                        send(inner.body_phase(direction, &mut holds, 0, BytesMut::new(), true)?).await?;
                    }
                    Some(Err(e)) => return Err(PumpEnd::Source(e.into())),
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(data) => {
                            let end = body.is_end_stream();
                            source_done = end;
                            let data = take_chunk(inner, direction, data);
                            send(inner.body_phase(direction, &mut holds, 0, data, end)?).await?;
                        }
                        Err(frame) => {
                            source_done = true;
                            if let Ok(trailers) = frame.into_trailers() {
                                *trailers_of(&mut inner.stream.borrow_mut(), direction) = Some(trailers);
                                if direction == Direction::Response {
                                    deadline = Instant::now() + inner.limits.pause_limit;
                                }
                                inner.trailers_phase(direction, &mut holds, deadline, tx).await?;
                                let trailers = trailers_of(&mut inner.stream.borrow_mut(), direction)
                                    .clone()
                                    .unwrap_or_default();
                                if tx.send(Ok(Frame::trailers(trailers))).await.is_err() {
                                    return Err(PumpEnd::Closed);
                                }
                                return Ok(());
                            }
                        }
                    },
                }
            }
            () = tokio::time::sleep_until(deadline), if source_done && holds.holding() => {
                let index = holds.first().map_or(0, |step| direction.index(step, inner.count(direction)));
                return Err(Stop::Error(ProxyError::FilterTimeout {
                    filter: inner.name(index),
                    limit: inner.limits.pause_limit,
                }).into());
            }
        }
    }
}

/// A source chunk, counted, as the body phase takes it: without a copy when
/// nothing else shares it.
fn take_chunk(inner: &Inner, direction: Direction, data: Bytes) -> BytesMut {
    count_bytes(inner, direction, data.len());
    data.try_into_mut()
        .unwrap_or_else(|shared| BytesMut::from(&shared[..]))
}

fn count_bytes(inner: &Inner, direction: Direction, n: usize) {
    let mut s = inner.stream.borrow_mut();
    match direction {
        Direction::Request => s.info.request_body_bytes += n as u64,
        Direction::Response => s.info.response_body_bytes += n as u64,
    }
}
