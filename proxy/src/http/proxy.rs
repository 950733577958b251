//! Forwarding one request: proxy header semantics, routing, the upstream
//! exchange, metrics and the access log. Requests whose route has filters
//! take the filtered path in [`super::filtered`].

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Instant, SystemTime};

use arc_swap::ArcSwap;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use lacewing_core::body::BoxBody;
use lacewing_core::{ProxyError, ResponseFlag};

use super::body::{DownstreamBody, ProxyBody};
use super::headers::{
    X_FORWARDED_PROTO, append_forwarded_for, ensure_request_id, strip_hop_by_hop,
};
use super::{filtered, local_reply};
use crate::access_log::{Entry, epoch_seconds};
use crate::snapshot::{HttpListenerState, RouteState, Target};

/// The downstream connection a request arrived on.
#[derive(Debug)]
pub struct ConnContext {
    pub id: u64,
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub slot: Arc<ArcSwap<HttpListenerState>>,
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
    let listener = conn.slot.load_full();
    let (mut parts, body) = req.into_parts();
    if parts.headers.contains_key(header::TRANSFER_ENCODING)
        && parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        // Ambiguous framing is how requests get smuggled: refuse it outright.
        listener.stats.local_reply("DC");
        return Ok(local_reply::bad_request(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    let hop = strip_hop_by_hop(&mut parts.headers);
    let request_id = ensure_request_id(&mut parts.headers);
    append_forwarded_for(&mut parts.headers, conn.remote.ip());
    if !parts.headers.contains_key(&X_FORWARDED_PROTO) {
        parts
            .headers
            .insert(X_FORWARDED_PROTO.clone(), HTTP.clone());
    }
    if !parts.headers.contains_key(header::HOST)
        && let Some(authority) = parts.uri.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        parts.headers.insert(header::HOST, host);
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

    let Some(route) = listener.routes.find(&parts).cloned() else {
        listener.stats.no_route.inc();
        let err = ProxyError::NoRoute {
            authority: crate::router::request_host(&parts)
                .unwrap_or_default()
                .to_string(),
            path: parts.uri.path().to_string(),
        };
        let resp = local_reply::from_error(&err);
        record(
            &listener,
            &conn,
            &facts,
            &Outcome {
                status: resp.status().as_u16(),
                flag: Some(ResponseFlag::NoRouteFound),
                route: None,
                target: None,
                upstream: None,
                attempts: 0,
            },
        );
        return Ok(resp);
    };
    if let Some(upgrade) = &hop.upgrade {
        parts.headers.insert(header::CONNECTION, UPGRADE.clone());
        parts.headers.insert(header::UPGRADE, upgrade.clone());
    }
    if !route.filters.is_empty() {
        return filtered::handle(parts, body, route, conn, listener, facts).await;
    }
    let target = route.pick();
    let (body, body_failed) = downstream_body(body);
    let mut req = Request::from_parts(parts, body);
    let downstream_upgrade = hop.upgrade.is_some().then(|| hyper::upgrade::on(&mut req));
    let result = target.cluster.send(req, &route.policy).await;
    if result.is_err() && body_failed.is_some_and(|f| f.load(Ordering::Relaxed)) {
        listener.stats.local_reply("DC");
        return Ok(local_reply::bad_request(
            "malformed or truncated request body",
        ));
    }
    Ok(respond(
        result,
        downstream_upgrade,
        &listener,
        &conn,
        &route,
        target,
        &facts,
    ))
}

/// The request body for the upstream: empty bodies cost nothing, others
/// remember whether the client broke them.
pub fn downstream_body(body: Incoming) -> (BoxBody, Option<Arc<AtomicBool>>) {
    if body.is_end_stream() {
        return (lacewing_core::body::empty(), None);
    }
    let failed = Arc::new(AtomicBool::new(false));
    (
        DownstreamBody::new(body, failed.clone()).boxed_unsync(),
        Some(failed),
    )
}

/// Turns the upstream result into the downstream response, recording it.
pub fn respond(
    result: Result<lacewing_upstream::UpstreamResponse, ProxyError>,
    downstream_upgrade: Option<hyper::upgrade::OnUpgrade>,
    listener: &HttpListenerState,
    conn: &ConnContext,
    route: &RouteState,
    target: &Target,
    facts: &RequestFacts,
) -> Response<ProxyBody> {
    match result {
        Ok(up) => {
            let mut resp = up.response;
            // Speak the client's HTTP version, whatever the upstream spoke.
            *resp.version_mut() = facts.version;
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                match downstream_upgrade {
                    Some(downstream) => {
                        let upstream = hyper::upgrade::on(&mut resp);
                        tokio::task::spawn_local(tunnel(downstream, upstream));
                    }
                    None => {
                        strip_hop_by_hop(resp.headers_mut());
                    }
                }
            } else {
                strip_hop_by_hop(resp.headers_mut());
            }
            let outcome = Outcome {
                status: resp.status().as_u16(),
                flag: None,
                route: Some(route),
                target: Some(target),
                upstream: Some(up.endpoint),
                attempts: up.attempts,
            };
            record(listener, conn, facts, &outcome);
            resp.map(ProxyBody::Upstream)
        }
        Err(err) => {
            let resp = local_reply::from_error(&err);
            let flag = err.flag();
            listener.stats.local_reply(flag.code());
            record(
                listener,
                conn,
                facts,
                &Outcome {
                    status: resp.status().as_u16(),
                    flag: Some(flag),
                    route: Some(route),
                    target: Some(target),
                    upstream: None,
                    attempts: 0,
                },
            );
            resp
        }
    }
}

/// Splices an upgraded downstream connection to an upgraded upstream one.
pub(super) async fn tunnel(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
) {
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

/// Records metrics and the access log line of one exchange.
pub fn record(
    listener: &HttpListenerState,
    conn: &ConnContext,
    facts: &RequestFacts,
    outcome: &Outcome<'_>,
) {
    let elapsed = facts.start.elapsed();
    if let Some(target) = outcome.target {
        target.stats.count(outcome.status);
        target.stats.duration.observe(elapsed.as_secs_f64());
    }
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
            status: outcome.status,
            flag: outcome.flag.map_or("-", |f| f.code()),
            route: outcome.route.map_or("-", |r| &r.name),
            cluster: outcome.target.map_or("-", |t| &t.cluster_name),
            upstream: outcome
                .upstream
                .map_or_else(|| "-".into(), |a| a.to_string()),
            attempts: outcome.attempts,
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
