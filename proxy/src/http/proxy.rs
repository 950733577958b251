//! Forwarding one request, the one path for every route: proxy header
//! semantics, routing, the route's filter chain (empty for most routes: then
//! it costs nothing), the upstream exchange or a local reply, metrics and the
//! access log. An upstream response is recorded once its body is through, with
//! `UPE` when the upstream broke the body's framing.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use lacewing_core::body::BoxBody;
use lacewing_core::stream::{HttpStream, LocalReply, StreamInfo};
use lacewing_core::timer::RequestDeadlines;
use lacewing_core::{ProxyError, ResponseFlag};

use super::body::{BodyEnd, DownstreamBody, OnBodyEnd, ProxyBody, RequestBodyState, UpstreamBody};
use super::headers::{
    X_FORWARDED_PROTO, append_forwarded_for, ensure_request_id, one_authority, strip_hop_by_hop,
};
use super::local_reply::{self, Answer};
use super::progress::{self, ConnProgress};
use crate::access_log::{Entry, epoch_seconds};
use crate::chain::{ChainLimits, HttpChain, Stop, http::ResponseBody};
use crate::snapshot::{HttpListenerState, HttpSlot, RouteState, Target};

/// The downstream connection a request arrived on.
#[derive(Debug)]
pub struct ConnContext {
    pub id: u64,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub slot: HttpSlot,
    /// What the connection's timers and fair-share limit look at.
    pub progress: ConnProgress,
    /// What the TLS handshake established, for a TLS connection.
    pub tls: Option<Arc<lacewing_core::stream::TlsFacts>>,
    /// The route timeouts of the connection's HTTP/1 requests, which come
    /// one at a time: one timer kept armed across them.
    pub deadlines: RequestDeadlines,
}

/// The stream was reset by a filter: hyper closes the connection (HTTP/1) or resets the stream (HTTP/2).
#[derive(Debug, thiserror::Error)]
#[error("stream reset by filter")]
pub struct StreamReset;

static HTTP: HeaderValue = HeaderValue::from_static("http");
static UPGRADE: HeaderValue = HeaderValue::from_static("upgrade");

/// What the access log and metrics need to know about a finished exchange.
pub struct Outcome<'a> {
    pub status: u16,
    pub flag: Option<ResponseFlag>,
    pub route: Option<&'a RouteState>,
    pub target: Option<&'a Target>,
    pub upstream: Option<SocketAddr>,
    pub attempts: u32,
}

/// Everything [`record`] needs from the request.
pub struct RequestFacts {
    pub start: Instant,
    pub start_time: SystemTime,
    pub method: http::Method,
    pub uri: http::Uri,
    pub version: http::Version,
    pub request_id: HeaderValue,
    pub user_agent: Option<HeaderValue>,
    /// `:authority` or Host, as the client sent it.
    pub authority: Option<HeaderValue>,
}

/// Handles one request end to end.
pub async fn handle(
    req: Request<Incoming>,
    conn: Rc<ConnContext>,
) -> Result<Response<ProxyBody>, StreamReset> {
    let start = Instant::now();
    let open = progress::exchange_started(&conn);
    let listener = conn.slot.load_full();
    let (mut parts, body) = req.into_parts();
    // hyper counts HTTP/1.1 header lines; HTTP/2 header fields are counted
    // here, before the proxy adds any (one length read per request).
    let max_headers = listener.config.limits.max_header_count;
    let too_many_headers =
        parts.version == http::Version::HTTP_2 && parts.headers.len() > max_headers;
    // Ambiguous framing is how requests get smuggled: refuse it outright.
    let ambiguous = parts.headers.contains_key(header::TRANSFER_ENCODING)
        && parts.headers.contains_key(header::CONTENT_LENGTH);
    // Routed on and forwarded with the same authority; refused when there is no single one.
    let bad_authority = one_authority(&mut parts).err();
    let hop = strip_hop_by_hop(&mut parts.headers);
    let request_id = ensure_request_id(&mut parts.headers);
    append_forwarded_for(&mut parts.headers, conn.remote.ip());
    if !parts.headers.contains_key(&X_FORWARDED_PROTO) {
        parts
            .headers
            .insert(X_FORWARDED_PROTO.clone(), HTTP.clone());
    }
    let facts = RequestFacts {
        start,
        start_time: SystemTime::now(),
        method: parts.method.clone(),
        uri: parts.uri.clone(),
        version: parts.version,
        request_id,
        user_agent: parts.headers.get(header::USER_AGENT).cloned(),
        authority: parts.headers.get(header::HOST).cloned(),
    };
    let unrouted = Exchange {
        listener: &listener,
        conn: &conn,
        facts,
        route: None,
        target: None,
    };
    if ambiguous {
        let reply = local_reply::from_error(&ProxyError::AmbiguousFraming);
        return unrouted.reply(HttpChain::empty(), reply).await;
    }
    if too_many_headers {
        let reply = local_reply::from_error(&ProxyError::TooManyHeaders(max_headers));
        return unrouted.reply(HttpChain::empty(), reply).await;
    }
    if let Some(err) = bad_authority {
        let reply = local_reply::from_error(&ProxyError::InvalidAuthority(err.to_string()));
        return unrouted.reply(HttpChain::empty(), reply).await;
    }
    let Some(route) = listener.routes.find(&parts).cloned() else {
        if parts.method == http::Method::CONNECT {
            let err = ProxyError::MethodNotAllowed(parts.method.to_string());
            return unrouted
                .reply(HttpChain::empty(), local_reply::from_error(&err))
                .await;
        }
        let err = ProxyError::NoRoute {
            authority: crate::router::request_host(&parts)
                .unwrap_or_default()
                .to_string(),
            path: parts.uri.path().to_string(),
        };
        return unrouted
            .reply(HttpChain::empty(), local_reply::from_error(&err))
            .await;
    };
    if let Some(upgrade) = &hop.upgrade {
        parts.headers.insert(header::CONNECTION, UPGRADE.clone());
        parts.headers.insert(header::UPGRADE, upgrade.clone());
    }
    let target = route.pick();
    let exchange = Exchange {
        route: Some(&route),
        target: Some(target),
        ..unrouted
    };

    // The filters see the request in a shared stream; without filters the
    // head stays here and nothing is allocated for them.
    let (chain, plain_head) = if route.filters.is_empty() {
        (HttpChain::empty(), Some(parts))
    } else {
        let stream = new_stream(parts, &conn, &listener, &route, target, &exchange.facts);
        let limits = ChainLimits {
            max_buffered: listener.config.limits.max_buffered_body.as_usize(),
            pause_limit: route.policy.timeout,
        };
        (HttpChain::new(&route.filters, stream, limits), None)
    };
    if let Err(stop) = chain.request_headers(body.is_end_stream()).await {
        return exchange.stopped(chain, stop).await;
    }
    let Some(head) = plain_head.or_else(|| chain.request_head()) else {
        return Err(StreamReset);
    };
    // Counted as it comes from the client, before the filters see it.
    let (body, request_body) = downstream_body(body);
    let body = match chain.request_body(body) {
        Ok(body) => body,
        Err(pumped) => pumped.boxed_unsync(),
    };
    let mut req = Request::from_parts(head, body);
    // A CONNECT reaches here only through a route that names it: it becomes a tunnel.
    let connect = req.method() == http::Method::CONNECT;
    let downstream_upgrade =
        (hop.upgrade.is_some() || connect).then(|| hyper::upgrade::on(&mut req));
    let limits = &listener.config.limits;
    // One connection may hold only its share of the cluster, until the
    // response body ends.
    let Some(share) = progress::hold(&conn, &target.cluster, limits.max_upstream_share) else {
        let reply = local_reply::from_error(&target.cluster.share_overflow());
        return exchange.reply(chain, reply).await;
    };
    // Pinned where it is built: awaiting it moves a pointer, not the future.
    // HTTP/1 requests come one at a time: their route timeouts share the
    // connection's timer (HTTP/2 streams, each its own task, get their own).
    // A filtered request's head stays in the filters' stream, where a retry
    // takes it from instead of a copy made for every request.
    let stream = chain.stream().cloned();
    let resend = stream.as_ref().map(|stream| move || resend_request(stream));
    let deadlines = (exchange.facts.version != http::Version::HTTP_2).then_some(&conn.deadlines);
    let send = std::pin::pin!(target.cluster.send_with(
        req,
        &route.policy,
        deadlines,
        resend.as_ref()
    ));
    // The stream idle timer runs until the response head only when it can
    // fire before the route's timeout (not with the defaults).
    let idle = limits.stream_idle_timeout.0;
    let timeout = route.policy.timeout;
    let idle_timer = !idle.is_zero() && (timeout.is_zero() || idle < timeout);
    let result = if chain.is_empty() && !idle_timer {
        send.await
    } else {
        tokio::select! {
            result = send => result,
            stop = chain.request_stopped(), if !chain.is_empty() => {
                return exchange.stopped(chain, stop).await;
            }
            () = stream_idle(idle, request_body.as_deref()), if idle_timer => {
                let reply = local_reply::from_error(&ProxyError::StreamIdle(idle));
                return exchange.reply(chain, reply).await;
            }
        }
    };
    // The request body pump may have answered (400, 413, a filter's reply)
    // or a filter reset the stream while the request was on its way.
    if let Some(stop) = chain.take_request_stop() {
        return exchange.stopped(chain, stop).await;
    }
    let up = match result {
        Ok(up) => up,
        Err(_) if request_body.as_ref().is_some_and(|b| b.failed()) => {
            let reply = local_reply::from_error(&ProxyError::DownstreamBody);
            return exchange.reply(chain, reply).await;
        }
        Err(err) => return exchange.reply(chain, local_reply::from_error(&err)).await,
    };
    let mut resp = up.response;
    // RFC 9112 §6.3: Transfer-Encoding overrides Content-Length, and such a
    // response may be an attempt at response splitting: refused, never
    // forwarded with a length that does not describe its body.
    if resp.headers().contains_key(header::TRANSFER_ENCODING)
        && resp.headers().contains_key(header::CONTENT_LENGTH)
    {
        let err = ProxyError::UpstreamFraming("both Content-Length and Transfer-Encoding");
        return exchange.reply(chain, local_reply::from_error(&err)).await;
    }
    let tunnels =
        resp.status() == StatusCode::SWITCHING_PROTOCOLS || (connect && resp.status().is_success());
    if tunnels && let Some(downstream) = downstream_upgrade {
        let upstream = hyper::upgrade::on(&mut resp);
        tokio::task::spawn_local(tunnel(downstream, upstream));
    } else {
        strip_hop_by_hop(resp.headers_mut());
    }
    let (head, body) = resp.into_parts();
    let upstream = Upstream {
        endpoint: up.endpoint,
        attempts: up.attempts,
    };
    // What `upstream.*` properties read from the response phase on.
    if let Some(stream) = chain.stream() {
        stream.borrow_mut().info.upstream_connection = Some(up.connection);
    }
    let mut body = UpstreamBody::new(
        body,
        conn.clone(),
        limits.upstream_body_timeout.0,
        Some(share),
        open,
    )
    .with_stream_idle(idle, request_body)
    .with_connection(up.h1);
    if let Some(max) = limits.max_stream_duration {
        body = body.with_deadline(max.0, (exchange.facts.start + max.0).into());
    }
    exchange
        .respond(chain, head, ProxyBody::Upstream(body), None, Some(upstream))
        .await
}

/// The request as the filters left it, without its body, to be sent again:
/// its head no longer changes once the request headers phase is over.
fn resend_request(stream: &lacewing_core::stream::SharedStream) -> Request<BoxBody> {
    let s = stream.borrow();
    let mut request = Request::new(lacewing_core::body::empty());
    *request.method_mut() = s.request.method.clone();
    *request.uri_mut() = s.request.uri.clone();
    *request.version_mut() = s.request.version;
    *request.headers_mut() = s.request.headers.clone();
    request
}

/// The stream the filters of a route act on.
fn new_stream(
    parts: http::request::Parts,
    conn: &ConnContext,
    listener: &HttpListenerState,
    route: &RouteState,
    target: &Target,
    facts: &RequestFacts,
) -> lacewing_core::stream::SharedStream {
    let mut info = StreamInfo::started(
        conn.id,
        conn.remote,
        conn.local,
        listener.stats.name.clone(),
        (facts.start_time, facts.start),
    );
    info.protocol = parts.version;
    info.route_name = Some(route.name.clone());
    info.cluster_name = Some(target.cluster_name.clone());
    info.tls = conn.tls.clone();
    HttpStream::new(info, parts).shared()
}

/// The upstream side of a completed exchange.
#[derive(Debug, Clone, Copy)]
struct Upstream {
    endpoint: SocketAddr,
    attempts: u32,
}

/// One request's place: where it came from and, once routed, where it goes.
/// It owns the request's facts, so recording the exchange when its body ends
/// moves them instead of copying them.
struct Exchange<'a> {
    listener: &'a Arc<HttpListenerState>,
    conn: &'a Rc<ConnContext>,
    facts: RequestFacts,
    route: Option<&'a Arc<RouteState>>,
    target: Option<&'a Target>,
}

impl Exchange<'_> {
    /// Ends the exchange the way a chain's stop says.
    async fn stopped(
        self,
        chain: HttpChain,
        stop: Stop,
    ) -> Result<Response<ProxyBody>, StreamReset> {
        match local_reply::from_stop(stop) {
            Answer::Reply(reply) => self.reply(chain, reply).await,
            Answer::Reset => Err(StreamReset),
        }
    }

    /// Sends a local reply through the response phases of the filters that
    /// saw the request.
    async fn reply(
        self,
        chain: HttpChain,
        reply: LocalReply,
    ) -> Result<Response<ProxyBody>, StreamReset> {
        let flag = reply.flag;
        if let Some(stream) = chain.stream() {
            stream.borrow_mut().info.response_code_details = Some(reply.details.clone());
        }
        let (head, body) = local_reply::into_response(reply, self.facts.version).into_parts();
        self.respond(chain, head, body, Some(flag), None).await
    }

    /// Runs the response headers phase, records the exchange and hands the
    /// response (its body through the filters) downstream.
    async fn respond(
        self,
        chain: HttpChain,
        mut head: http::response::Parts,
        body: ProxyBody,
        mut flag: Option<ResponseFlag>,
        upstream: Option<Upstream>,
    ) -> Result<Response<ProxyBody>, StreamReset> {
        // Speak the client's HTTP version, whatever the upstream spoke.
        head.version = self.facts.version;
        let mut body = body;
        if let Some(stream) = chain.stream() {
            {
                let mut s = stream.borrow_mut();
                s.info.upstream_address = upstream.map(|u| u.endpoint);
                s.info.attempt_count = upstream.map_or(0, |u| u.attempts);
                s.info.response_code = Some(head.status.as_u16());
                s.info.response_flag = flag;
                s.response = Some(head);
            }
            let phase = chain.response_headers(body.is_end_stream()).await;
            let mut s = stream.borrow_mut();
            head = match phase {
                Ok(()) => {
                    let Some(r) = s.response.as_ref() else {
                        return Err(StreamReset);
                    };
                    let mut head = Response::new(()).into_parts().0;
                    head.status = r.status;
                    head.version = self.facts.version;
                    head.headers = r.headers.clone();
                    head
                }
                Err(stop) => match local_reply::from_stop(stop) {
                    // A reply made in the response phase replaces the response as it is.
                    Answer::Reply(reply) => {
                        flag = Some(reply.flag);
                        s.info.response_code_details = Some(reply.details.clone());
                        let (h, b) =
                            local_reply::into_response(reply, self.facts.version).into_parts();
                        body = b;
                        h
                    }
                    Answer::Reset => return Err(StreamReset),
                },
            };
            s.info.response_code = Some(head.status.as_u16());
            s.info.response_flag = flag;
        }
        let status = head.status.as_u16();
        match (&mut body, upstream) {
            // An upstream body still to come is recorded once it is through.
            (ProxyBody::Upstream(up), Some(upstream)) if !up.is_end_stream() => {
                up.on_end(self.record_at_end(status, upstream, chain.stream().cloned()));
            }
            _ => record(
                self.listener,
                self.conn,
                &self.facts,
                &Outcome {
                    status,
                    flag,
                    route: self.route.map(|r| &**r),
                    target: self.target,
                    upstream: upstream.map(|u| u.endpoint),
                    attempts: upstream.map_or(0, |u| u.attempts),
                },
            ),
        }
        let body = match chain.response_body(body) {
            ResponseBody::Plain(body) => body,
            ResponseBody::Filtered(body) => ProxyBody::Local(Box::pin(body)),
        };
        Ok(Response::from_parts(head, body))
    }
}

impl Exchange<'_> {
    /// Records the exchange once its upstream body ends: clean when every
    /// byte arrived, `UPE` when the upstream broke it, `DC` when the client
    /// left first. The filters' stream, if any, learns the flag before their
    /// `on_log` runs (the body ends before the filters' lives do).
    fn record_at_end(
        self,
        status: u16,
        upstream: Upstream,
        stream: Option<lacewing_core::stream::SharedStream>,
    ) -> OnBodyEnd {
        let listener = Arc::clone(self.listener);
        let conn = Rc::clone(self.conn);
        let facts = self.facts;
        let route = self.route.cloned();
        let target = self.target.and_then(|t| {
            let route = route.as_ref()?;
            route.targets().iter().position(|x| std::ptr::eq(x, t))
        });
        Box::new(move |how| {
            let flag = match how {
                BodyEnd::Complete => None,
                BodyEnd::Cut { flag, details } => {
                    if let Some(stream) = stream {
                        let info = &mut stream.borrow_mut().info;
                        info.response_flag = Some(flag);
                        info.response_code_details = Some(details);
                    }
                    Some(flag)
                }
            };
            let route = route.as_deref();
            record(
                &listener,
                &conn,
                &facts,
                &Outcome {
                    status,
                    flag,
                    route,
                    target: target.and_then(|i| route?.targets().get(i)),
                    upstream: Some(upstream.endpoint),
                    attempts: upstream.attempts,
                },
            );
        })
    }
}

/// The request body for the upstream: empty bodies cost nothing, others
/// count their progress and remember whether the client broke them.
pub fn downstream_body(body: Incoming) -> (BoxBody, Option<Arc<RequestBodyState>>) {
    if body.is_end_stream() {
        return (lacewing_core::body::empty(), None);
    }
    let state = Arc::new(RequestBodyState::default());
    (
        DownstreamBody::new(body, state.clone()).boxed_unsync(),
        Some(state),
    )
}

/// Resolves once the request body (when there is one still streaming) has
/// not moved over a whole `limit` window: so after between one and two
/// windows of no progress. The wait for the response head is the other
/// direction: this timer is dropped when the head comes.
async fn stream_idle(limit: Duration, request: Option<&RequestBodyState>) {
    let mut seen = request.map_or(0, RequestBodyState::frames);
    loop {
        tokio::time::sleep(limit).await;
        let frames = request.map_or(0, RequestBodyState::frames);
        if frames == seen {
            return;
        }
        seen = frames;
    }
}

/// Splices an upgraded downstream connection to an upgraded upstream one.
async fn tunnel(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    let (Ok(down), Ok(up)) = (downstream.await, upstream.await) else {
        tracing::debug!("upgrade did not complete on both sides");
        return;
    };
    let mut down = hyper_util::rt::TokioIo::new(down);
    let mut up = hyper_util::rt::TokioIo::new(up);
    if let Err(e) = tokio::io::copy_bidirectional(&mut down, &mut up).await {
        tracing::debug!(error = %e, "upgraded connection ended");
    }
}

/// Records metrics and the access log line of one exchange; a flagged
/// exchange is one the proxy answered itself or one whose upstream body
/// did not arrive whole.
pub fn record(
    listener: &HttpListenerState,
    conn: &ConnContext,
    facts: &RequestFacts,
    outcome: &Outcome<'_>,
) {
    let elapsed = facts.start.elapsed();
    if let Some(flag) = outcome.flag {
        listener.stats.local_reply(flag.code());
    }
    if let Some(target) = outcome.target {
        target.stats.count(outcome.status);
        target.stats.duration.observe(elapsed.as_secs_f64());
    }
    write_line(
        listener,
        conn,
        facts,
        elapsed,
        &Line {
            status: outcome.status,
            flag: outcome.flag,
            route: outcome.route.map(|r| &*r.name),
            cluster: outcome.target.map(|t| &*t.cluster_name),
            upstream: outcome.upstream,
            attempts: outcome.attempts,
        },
    );
}

/// The outcome fields of one access-log line.
struct Line<'a> {
    status: u16,
    flag: Option<ResponseFlag>,
    route: Option<&'a str>,
    cluster: Option<&'a str>,
    upstream: Option<SocketAddr>,
    attempts: u32,
}

/// Writes one access-log line, when the listener has a log.
fn write_line(
    listener: &HttpListenerState,
    conn: &ConnContext,
    facts: &RequestFacts,
    elapsed: Duration,
    line: &Line<'_>,
) {
    if let Some(log) = &listener.access_log {
        let authority = facts
            .authority
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        log.write(&Entry {
            start_time: epoch_seconds(facts.start_time),
            listener: &listener.config.name,
            downstream: conn.remote.to_string(),
            protocol: lacewing_core::stream::protocol_name(facts.version),
            method: facts.method.as_str(),
            authority,
            path: facts.uri.path_and_query().map_or("/", |p| p.as_str()),
            status: line.status,
            flag: line.flag.map_or("-", |f| f.code()),
            route: line.route.unwrap_or("-"),
            cluster: line.cluster.unwrap_or("-"),
            upstream: line.upstream.map_or_else(|| "-".into(), |a| a.to_string()),
            attempts: line.attempts,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            request_id: facts.request_id.to_str().unwrap_or("-"),
            user_agent: facts
                .user_agent
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
        });
    }
}
