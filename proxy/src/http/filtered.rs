//! The filtered request path: runs a route's filter chain around the upstream
//! exchange, phase by phase.
//!
//! ```text
//! request headers ─▶ request body* ─▶ request trailers ─▶ upstream ─▶ response headers ─▶ response body* ─▶ trailers ─▶ log
//! ```
//! A filter that stops on headers pauses the request until it resumes the
//! stream (bounded by the route timeout). Body chunks pass through the filters
//! in order; a filter that stops on a body chunk makes the proxy buffer, up to
//! the listener's `max_buffered_body` (413 on requests; a reset on responses).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use lacewing_core::body::BoxError;
use lacewing_core::filter::{FilterStatus, HttpFilter};
use lacewing_core::stream::{HttpStream, LocalReply, SharedStream, StreamInfo};
use lacewing_core::{ProxyError, ResponseFlag};
use tokio::sync::mpsc;

use super::body::ProxyBody;
use super::headers::strip_hop_by_hop;
use super::local_reply;
use super::proxy::{ConnContext, Outcome, RequestFacts, StreamReset, record, tunnel};
use crate::snapshot::{HttpListenerState, RouteState};

/// How a phase ended.
enum Verdict {
    Continue,
    Local(Box<LocalReply>),
    Reset,
}

/// Which way a phase walks the chain: requests in configured order,
/// responses in reverse (the filter nearest the upstream sees it first), as in Envoy.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

impl Direction {
    /// The filter index of the `step`-th filter in this direction.
    fn index(self, step: usize, count: usize) -> usize {
        match self {
            Self::Request => step,
            Self::Response => count - 1 - step,
        }
    }
}

/// The filters of one stream and the stream they act on.
struct Chain {
    stream: SharedStream,
    filters: RefCell<Vec<Box<dyn HttpFilter>>>,
    max_buffered: usize,
    pause_limit: std::time::Duration,
    wants_request_body: bool,
    wants_response_body: bool,
}

impl Chain {
    /// A local reply or reset a filter asked for, if any.
    fn stop_requested(&self) -> Option<Verdict> {
        let mut s = self.stream.borrow_mut();
        if s.reset {
            return Some(Verdict::Reset);
        }
        s.local_reply.take().map(|r| Verdict::Local(Box::new(r)))
    }

    /// Runs a headers-like phase over every filter, pausing where a filter stops.
    async fn headers_phase(
        &self,
        direction: Direction,
        call: impl Fn(&mut dyn HttpFilter, &SharedStream) -> FilterStatus,
    ) -> Verdict {
        let count = self.filters.borrow().len();
        for step in 0..count {
            let status = {
                let mut filters = self.filters.borrow_mut();
                let Some(filter) = filters.get_mut(direction.index(step, count)) else {
                    break;
                };
                call(filter.as_mut(), &self.stream)
            };
            if let Some(v) = self.stop_requested() {
                return v;
            }
            if status != FilterStatus::Continue {
                let resumed = self.stream.borrow().resumed();
                if tokio::time::timeout(self.pause_limit, resumed.notified())
                    .await
                    .is_err()
                {
                    return Verdict::Local(Box::new(LocalReply::new(
                        StatusCode::GATEWAY_TIMEOUT,
                        "504 Gateway Timeout: a filter paused the request and did not resume it\n",
                        ResponseFlag::UpstreamRequestTimeout,
                    )));
                }
                if let Some(v) = self.stop_requested() {
                    return v;
                }
            }
        }
        Verdict::Continue
    }

    /// Runs a body chunk through the filters starting at `*from`; returns
    /// whether the buffered bytes may be forwarded. A stopping filter becomes
    /// the new start so it sees the growing buffer next time.
    fn body_phase(
        &self,
        direction: Direction,
        from: &mut usize,
        end_of_stream: bool,
        call: impl Fn(&mut dyn HttpFilter, &SharedStream, bool) -> FilterStatus,
    ) -> Result<bool, Verdict> {
        let count = self.filters.borrow().len();
        for step in *from..count {
            let status = {
                let mut filters = self.filters.borrow_mut();
                let Some(filter) = filters.get_mut(direction.index(step, count)) else {
                    break;
                };
                call(filter.as_mut(), &self.stream, end_of_stream)
            };
            if let Some(v) = self.stop_requested() {
                return Err(v);
            }
            if status != FilterStatus::Continue && !end_of_stream {
                *from = step;
                return Ok(false);
            }
        }
        *from = 0;
        Ok(true)
    }

    /// Runs `on_log` on every filter and ends their lives.
    fn finish(&self) {
        let mut filters = std::mem::take(&mut *self.filters.borrow_mut());
        for f in filters.iter_mut() {
            f.on_log(&self.stream);
        }
        drop(filters);
    }
}

/// Ends the filters' lives when the response body is done or dropped.
struct FinishGuard(Rc<Chain>);

impl Drop for FinishGuard {
    fn drop(&mut self) {
        self.0.finish();
    }
}

/// Handles a request whose route has filters.
pub async fn handle(
    parts: http::request::Parts,
    body: Incoming,
    route: Arc<RouteState>,
    conn: Rc<ConnContext>,
    listener: Arc<HttpListenerState>,
    facts: RequestFacts,
) -> Result<Response<ProxyBody>, StreamReset> {
    let target = route.pick();
    let mut info = StreamInfo::new(
        conn.id,
        conn.remote,
        conn.local,
        listener.stats.name.clone(),
    );
    info.protocol = parts.version;
    info.start_time = facts.start_time;
    info.start_instant = facts.start;
    info.route_name = Some(route.name.clone());
    info.cluster_name = Some(target.cluster_name.clone());
    let stream = HttpStream::new(info, parts).shared();
    let filters: Vec<Box<dyn HttpFilter>> = route
        .filters
        .iter()
        .filter_map(|f| f.create(&stream))
        .collect();
    let chain = Rc::new(Chain {
        wants_request_body: filters.iter().any(|f| f.wants_request_body()),
        wants_response_body: filters.iter().any(|f| f.wants_response_body()),
        stream: stream.clone(),
        filters: RefCell::new(filters),
        max_buffered: listener.config.limits.max_buffered_body.as_usize(),
        pause_limit: route.policy.timeout,
    });
    let guard = FinishGuard(chain.clone());

    let request_eos = body.is_end_stream();
    let verdict = chain
        .headers_phase(Direction::Request, |f, s| {
            f.on_request_headers(s, request_eos)
        })
        .await;
    if let Some(answer) = settle(verdict, &chain, &listener, &conn, &facts) {
        return answer;
    }

    // Build the upstream request from what the filters left.
    let (mut req, downstream_upgrade) = {
        let mut s = stream.borrow_mut();
        let upgrade = s.request.extensions.remove::<hyper::upgrade::OnUpgrade>();
        let mut req = Request::new(lacewing_core::body::empty());
        *req.method_mut() = s.request.method.clone();
        *req.uri_mut() = s.request.uri.clone();
        *req.version_mut() = s.request.version;
        *req.headers_mut() = s.request.headers.clone();
        (req, upgrade)
    };
    let mut body_failed = None;
    if !request_eos {
        *req.body_mut() = if chain.wants_request_body {
            let (tx, rx) = mpsc::channel(4);
            tokio::task::spawn_local(pump_request_body(chain.clone(), body, tx));
            ChannelBody { rx }.boxed_unsync()
        } else {
            let (body, failed) = super::proxy::downstream_body(body);
            body_failed = failed;
            body
        };
    }
    let result = target.cluster.send(req, &route.policy).await;
    if result.is_err() && body_failed.is_some_and(|f| f.load(std::sync::atomic::Ordering::Relaxed))
    {
        listener.stats.local_reply("DC");
        return Ok(local_reply::bad_request(
            "malformed or truncated request body",
        ));
    }
    // The request body pump may have answered (400, 413) or a filter reset the stream.
    if let Some(verdict) = chain.stop_requested()
        && let Some(answer) = settle(verdict, &chain, &listener, &conn, &facts)
    {
        return answer;
    }
    let (attempts, endpoint, mut resp) = match result {
        Ok(up) => (
            up.attempts,
            Some(up.endpoint),
            up.response.map(ProxyBody::Upstream),
        ),
        Err(err) => {
            let flag = err.flag();
            listener.stats.local_reply(flag.code());
            stream.borrow_mut().info.response_flag = Some(flag);
            (0, None, local_reply::from_error(&err))
        }
    };
    let upgraded = resp.status() == StatusCode::SWITCHING_PROTOCOLS && downstream_upgrade.is_some();
    if upgraded {
        if let (Some(down), ProxyBody::Upstream(_)) = (downstream_upgrade, resp.body()) {
            let up = hyper::upgrade::on(&mut resp);
            tokio::task::spawn_local(tunnel(down, up));
        }
    } else {
        strip_hop_by_hop(resp.headers_mut());
    }
    let (rparts, rbody) = resp.into_parts();
    {
        let mut s = stream.borrow_mut();
        s.info.upstream_address = endpoint;
        s.info.attempt_count = attempts;
        s.info.response_code = Some(rparts.status.as_u16());
        s.response = Some(rparts);
    }
    let response_eos = rbody.is_end_stream();
    let verdict = chain
        .headers_phase(Direction::Response, |f, s| {
            f.on_response_headers(s, response_eos)
        })
        .await;
    if let Some(answer) = settle(verdict, &chain, &listener, &conn, &facts) {
        return answer;
    }
    let head = {
        let s = stream.borrow();
        let Some(r) = s.response.as_ref() else {
            return Err(StreamReset);
        };
        let mut head = Response::new(());
        *head.status_mut() = r.status;
        *head.version_mut() = facts.version;
        *head.headers_mut() = r.headers.clone();
        head
    };
    let status = head.status().as_u16();
    stream.borrow_mut().info.response_code = Some(status);
    record(
        &listener,
        &conn,
        &facts,
        &Outcome {
            status,
            flag: stream.borrow().info.response_flag,
            route: Some(&route),
            target: Some(target),
            upstream: endpoint,
            attempts,
        },
    );
    let body = FilteredResponse {
        inner: rbody,
        filter: chain.wants_response_body,
        from: 0,
        pending: VecDeque::new(),
        done: false,
        guard: Some(guard),
    };
    Ok(head.map(|()| ProxyBody::Local(Box::pin(body))))
}

/// The response that ends a phase early, if the verdict ends it. The filters'
/// lives end when the handler returns (the guard drops), after the reply is built.
fn settle(
    verdict: Verdict,
    chain: &Chain,
    listener: &HttpListenerState,
    conn: &ConnContext,
    facts: &RequestFacts,
) -> Option<Result<Response<ProxyBody>, StreamReset>> {
    match verdict {
        Verdict::Continue => None,
        Verdict::Local(reply) => Some(Ok(local(*reply, chain, listener, conn, facts))),
        Verdict::Reset => Some(Err(StreamReset)),
    }
}

/// Sends a filter's local reply.
fn local(
    reply: LocalReply,
    chain: &Chain,
    listener: &HttpListenerState,
    conn: &ConnContext,
    facts: &RequestFacts,
) -> Response<ProxyBody> {
    let status = reply.status.as_u16();
    let flag = reply.flag;
    {
        let mut s = chain.stream.borrow_mut();
        s.info.response_code = Some(status);
        s.info.response_flag = Some(flag);
        s.info.response_code_details = Some(reply.details.clone());
    }
    listener.stats.local_reply(flag.code());
    record(
        listener,
        conn,
        facts,
        &Outcome {
            status,
            flag: Some(flag),
            route: None,
            target: None,
            upstream: None,
            attempts: 0,
        },
    );
    local_reply::from_local(reply)
}

type FrameResult = Result<Frame<Bytes>, BoxError>;

/// Reads the downstream request body, runs it through the filters and feeds
/// the upstream request.
async fn pump_request_body(chain: Rc<Chain>, mut body: Incoming, tx: mpsc::Sender<FrameResult>) {
    let mut from = 0usize;
    loop {
        let frame = body.frame().await;
        let (end_of_stream, trailers) = match frame {
            None => (true, None),
            Some(Err(e)) => {
                // The client broke its body: answer 400, not an upstream error.
                chain.stream.borrow_mut().local_reply = Some(LocalReply::new(
                    StatusCode::BAD_REQUEST,
                    "400 Bad Request: malformed or truncated request body\n",
                    ResponseFlag::DownstreamConnectionTermination,
                ));
                let _ = tx.send(Err(e.into())).await;
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    let mut s = chain.stream.borrow_mut();
                    s.info.request_body_bytes += data.len() as u64;
                    s.request_body.extend_from_slice(&data);
                    (body.is_end_stream(), None)
                }
                Err(frame) => (false, frame.into_trailers().ok()),
            },
        };
        let over_limit = chain.stream.borrow().request_body.len() > chain.max_buffered;
        // Trailers end the body: the filters see the data as complete first.
        let eos = end_of_stream || trailers.is_some();
        let forward = match chain.body_phase(
            Direction::Request,
            &mut from,
            eos && trailers.is_none(),
            |f, s, e| f.on_request_body(s, e),
        ) {
            Ok(forward) => forward || eos,
            Err(v) => {
                abort(&chain, v, &tx).await;
                return;
            }
        };
        if !forward && over_limit {
            let limit = chain.max_buffered;
            chain.stream.borrow_mut().local_reply = Some(LocalReply::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "413 Payload Too Large: {}\n",
                    ProxyError::BodyTooLarge { limit }
                ),
                ResponseFlag::PayloadTooLarge,
            ));
            let _ = tx
                .send(Err("request body over the buffer limit".into()))
                .await;
            return;
        }
        if forward {
            let data = chain.stream.borrow_mut().request_body.split().freeze();
            if !data.is_empty() && tx.send(Ok(Frame::data(data))).await.is_err() {
                return;
            }
        }
        if let Some(t) = trailers {
            chain.stream.borrow_mut().request_trailers = Some(t);
            for filter in chain.filters.borrow_mut().iter_mut() {
                filter.on_request_trailers(&chain.stream);
            }
            if let Some(v) = chain.stop_requested() {
                abort(&chain, v, &tx).await;
                return;
            }
            let t = chain
                .stream
                .borrow_mut()
                .request_trailers
                .take()
                .unwrap_or_default();
            let _ = tx.send(Ok(Frame::trailers(t))).await;
            return;
        }
        if end_of_stream {
            return;
        }
    }
}

async fn abort(chain: &Chain, verdict: Verdict, tx: &mpsc::Sender<FrameResult>) {
    // Put the verdict back for the request task, which answers once the upstream send fails.
    match verdict {
        Verdict::Local(reply) => chain.stream.borrow_mut().local_reply = Some(*reply),
        Verdict::Reset => chain.stream.borrow_mut().reset = true,
        Verdict::Continue => {}
    }
    let _ = tx.send(Err("request stopped by a filter".into())).await;
}

/// A request body fed by the pump.
struct ChannelBody {
    rx: mpsc::Receiver<FrameResult>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult>> {
        self.rx.poll_recv(cx)
    }
}

/// The response body as the filters shape it.
struct FilteredResponse {
    inner: ProxyBody,
    /// Whether any filter wants body callbacks.
    filter: bool,
    from: usize,
    pending: VecDeque<FrameResult>,
    done: bool,
    guard: Option<FinishGuard>,
}

impl FilteredResponse {
    fn chain(&self) -> Option<&Rc<Chain>> {
        self.guard.as_ref().map(|g| &g.0)
    }

    /// Feeds data (or the end) through the filters; queues what may go out.
    fn on_data(&mut self, data: Option<Bytes>, end_of_stream: bool) -> Result<(), BoxError> {
        let Some(chain) = self.chain().cloned() else {
            return Ok(());
        };
        {
            let mut s = chain.stream.borrow_mut();
            if let Some(d) = &data {
                s.info.response_body_bytes += d.len() as u64;
                s.response_body.extend_from_slice(d);
            }
        }
        let forward = chain
            .body_phase(
                Direction::Response,
                &mut self.from,
                end_of_stream,
                |f, s, e| f.on_response_body(s, e),
            )
            .map_err(|_| -> BoxError { "response stopped by a filter".into() })?;
        let buffered = chain.stream.borrow().response_body.len();
        if !forward && buffered > chain.max_buffered {
            return Err("response body over the buffer limit".into());
        }
        if forward || end_of_stream {
            let out = chain.stream.borrow_mut().response_body.split().freeze();
            if !out.is_empty() {
                self.pending.push_back(Ok(Frame::data(out)));
            }
        }
        Ok(())
    }

    fn on_trailers(&mut self, trailers: HeaderMap) -> Result<(), BoxError> {
        let Some(chain) = self.chain().cloned() else {
            return Ok(());
        };
        self.on_data(None, true)?;
        chain.stream.borrow_mut().response_trailers = Some(trailers);
        for filter in chain.filters.borrow_mut().iter_mut().rev() {
            filter.on_response_trailers(&chain.stream);
        }
        if chain.stop_requested().is_some() {
            return Err("response stopped by a filter".into());
        }
        let t = chain
            .stream
            .borrow()
            .response_trailers
            .clone()
            .unwrap_or_default();
        self.pending.push_back(Ok(Frame::trailers(t)));
        Ok(())
    }
}

impl Body for FilteredResponse {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<FrameResult>> {
        let this = self.get_mut();
        loop {
            if let Some(frame) = this.pending.pop_front() {
                return Poll::Ready(Some(frame));
            }
            if this.done {
                // Ends the filters' lives as soon as the body is complete.
                this.guard.take();
                return Poll::Ready(None);
            }
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            let step = match polled {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(None) => {
                    this.done = true;
                    if this.filter {
                        this.on_data(None, true)
                    } else {
                        Ok(())
                    }
                }
                Poll::Ready(Some(Err(e))) => {
                    this.done = true;
                    Err(e)
                }
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        if this.filter {
                            let eos = this.inner.is_end_stream();
                            this.done = eos;
                            this.on_data(Some(data), eos)
                        } else {
                            if let Some(chain) = this.chain() {
                                chain.stream.borrow_mut().info.response_body_bytes +=
                                    data.len() as u64;
                            }
                            this.pending.push_back(Ok(Frame::data(data)));
                            Ok(())
                        }
                    }
                    Err(frame) => match frame.into_trailers() {
                        Ok(t) => {
                            this.done = true;
                            this.on_trailers(t)
                        }
                        Err(_) => Ok(()),
                    },
                },
            };
            if let Err(e) = step {
                this.done = true;
                this.pending.clear();
                this.pending.push_back(Err(e));
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done && self.pending.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        if self.filter {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}
