//! One cluster: pick an endpoint, respect the circuit breaker, reuse or open a
//! connection, send, retry, and record outlier results.
//!
//! The phases of [`Cluster::send`]:
//! ```text
//! max_requests ─▶ [ timeout ┊ pick ─▶ connection (pool | connect) ─▶ send ─▶ response head ┊ ]
//!                              ▲          │ connect failed                     │ retriable status,
//!                              └──────────┴── retry (attempts, budget) ◀───────┘ bodiless request
//! ```

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, Version, header};
use http_body::Body as _;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lacewing_config::{ClusterConfig, RetryPolicy, UpstreamProtocol};
use lacewing_core::ProxyError;
use lacewing_core::body::{self, BoxBody};
use lacewing_core::metrics::Metrics;
use prometheus::IntCounter;
use tokio::net::TcpStream;

use crate::breaker::{ConnectionCount, ConnectionSlot, Held, Limit, Limits};
use crate::clock::now_ms;
use crate::endpoint::{Endpoint, EndpointSet};
use crate::lb::Balancer;
use crate::outlier::{Failure, OutlierDetector};
use crate::pool::{self, H1Sender, H2Lookup, H2Sender, IdleSince, PoolKey};

/// Connect retries of [`Cluster::connect_tcp`] (the route default for HTTP).
const TCP_CONNECT_RETRIES: u32 = 2;

/// How one request may be sent: its deadline and its retries.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestPolicy {
    /// Bounds the whole exchange up to the response head, retries included; zero means no limit.
    pub timeout: Duration,
    /// Extra attempts after the first.
    pub retry_attempts: u32,
    /// Response statuses sent again (only for requests whose body is known to be empty).
    pub retry_on_status: Vec<u16>,
    /// Send again, to another endpoint when there is one, when connecting fails.
    pub retry_on_connect_failure: bool,
}

impl RequestPolicy {
    /// The policy of a route.
    pub fn from_route(timeout: Duration, retry: &RetryPolicy) -> Self {
        Self {
            timeout,
            retry_attempts: retry.attempts,
            retry_on_status: retry.on_status.clone(),
            retry_on_connect_failure: retry.on_connect_failure,
        }
    }

    /// The policy of a filter callout: connect failures retried, statuses never.
    pub fn callout(timeout: Duration) -> Self {
        Self {
            timeout,
            retry_attempts: lacewing_config::defaults::retry_attempts(),
            retry_on_status: Vec::new(),
            retry_on_connect_failure: true,
        }
    }
}

/// A response head from an endpoint; the body streams from the connection.
#[derive(Debug)]
pub struct UpstreamResponse {
    pub response: Response<Incoming>,
    /// The endpoint that answered.
    pub endpoint: SocketAddr,
    /// Attempts made, 1 when the first one answered.
    pub attempts: u32,
}

/// Metric children of one cluster, resolved once at build.
#[derive(Debug)]
struct ClusterMetrics {
    connect_failures: IntCounter,
    retries: IntCounter,
    overflow_connections: IntCounter,
    overflow_pending: IntCounter,
    overflow_requests: IntCounter,
}

/// A named group of endpoints with its balancer, limits, outlier detection and pools.
#[derive(Debug)]
pub struct Cluster {
    name: String,
    protocol: UpstreamProtocol,
    endpoints: Box<[Endpoint]>,
    balancer: Balancer,
    connect_timeout: Duration,
    idle_timeout: Duration,
    limits: Limits,
    connections: Arc<ConnectionCount>,
    outlier: OutlierDetector,
    pool: PoolKey,
    /// Held only here: per-thread pools of this cluster are dropped once it is.
    _alive: Arc<()>,
    metrics: ClusterMetrics,
}

/// Why one attempt did not produce a response head.
enum AttemptError {
    /// No connection could be made; nothing was sent and the request comes back.
    Unsent {
        error: ProxyError,
        request: Box<Request<BoxBody>>,
    },
    /// A reused pooled connection broke before any response came back: the
    /// server most likely closed it while idle. Safe to resend only for
    /// idempotent requests without a body.
    Stale(ProxyError),
    /// The request is gone (sent, or refused by a limit).
    Failed(ProxyError),
}

/// Why no connection was had.
enum OpenError {
    Overflow(ProxyError),
    Connect(ProxyError),
}

impl AttemptError {
    /// A send that failed with no retry left on this endpoint: unsent when
    /// hyper gave the request back, failed otherwise.
    fn send_failed(error: hyper::Error, unsent: Option<Request<BoxBody>>) -> Self {
        match unsent {
            Some(unsent) => AttemptError::Unsent {
                error: reset(error),
                request: Box::new(unsent),
            },
            None => AttemptError::Failed(reset(error)),
        }
    }
}

impl OpenError {
    /// The attempt's outcome when no connection could be had for `request`; a
    /// failed connect gives the request back for another endpoint.
    fn attempt_error(self, request: Request<BoxBody>) -> AttemptError {
        match self {
            OpenError::Overflow(error) => AttemptError::Failed(error),
            OpenError::Connect(error) => AttemptError::Unsent {
                error,
                request: Box::new(request),
            },
        }
    }
}

/// The endpoint chosen for an attempt, or why there is none.
enum Pick {
    Endpoint(usize),
    /// Every endpoint is ejected after failed connects (or the cluster is empty).
    NoHealthy,
    /// Every endpoint already failed to connect during this request.
    Exhausted,
}

/// The bookkeeping of one request's (or connection's) attempts: the endpoints
/// tried and failed, the retry-budget slot, and the error to report when no
/// endpoint is left.
struct AttemptChain<'a> {
    cluster: &'a Cluster,
    tried: EndpointSet,
    failed: EndpointSet,
    retry_slot: Option<Held<'a>>,
    last_error: Option<ProxyError>,
    /// Attempts started so far, the first included.
    attempts: u32,
}

impl<'a> AttemptChain<'a> {
    fn new(cluster: &'a Cluster) -> Self {
        Self {
            cluster,
            tried: EndpointSet::default(),
            failed: EndpointSet::default(),
            retry_slot: None,
            last_error: None,
            attempts: 0,
        }
    }

    /// Picks the endpoint of the next attempt and counts it (as a retry after the first).
    fn next_endpoint(&mut self) -> Result<usize, ProxyError> {
        let cluster = self.cluster;
        let index = match cluster.pick(&self.tried, &self.failed) {
            Pick::Endpoint(index) => index,
            Pick::NoHealthy => return Err(cluster.no_healthy()),
            Pick::Exhausted => {
                return Err(self
                    .last_error
                    .take()
                    .unwrap_or_else(|| cluster.no_healthy()));
            }
        };
        if self.attempts > 0 {
            cluster.metrics.retries.inc();
        }
        self.attempts += 1;
        self.tried.insert(index);
        Ok(index)
    }

    /// Records that connecting to an endpoint failed: never picked again by
    /// this chain, and a connect failure for outlier detection.
    fn connect_failed(&mut self, index: usize) {
        self.failed.insert(index);
        self.cluster
            .outlier
            .failure(&self.cluster.endpoints, index, Failure::Connect);
    }

    /// Takes (once per chain) a slot of the retry budget.
    fn retry_permit(&mut self) -> bool {
        if self.retry_slot.is_none() {
            self.retry_slot = self.cluster.limits.retry();
        }
        self.retry_slot.is_some()
    }
}

static NEXT_CLUSTER_ID: AtomicU64 = AtomicU64::new(1);

impl Cluster {
    /// Builds a cluster over resolved endpoint addresses.
    pub(crate) fn new(config: &ClusterConfig, addrs: Vec<SocketAddr>, metrics: &Metrics) -> Self {
        let name = config.name.as_str();
        let overflow = |limit: Limit| {
            metrics
                .upstream_overflows
                .with_label_values(&[name, limit.name()])
        };
        let connections = Arc::new(ConnectionCount::new(
            config.circuit_breaker.max_connections,
            metrics
                .upstream_connections_active
                .with_label_values(&[name]),
            metrics
                .upstream_connections_total
                .with_label_values(&[name]),
        ));
        let endpoints: Box<[Endpoint]> = addrs.into_iter().map(Endpoint::new).collect();
        let alive = Arc::new(());
        Self {
            pool: PoolKey {
                id: NEXT_CLUSTER_ID.fetch_add(1, Ordering::Relaxed),
                endpoints: endpoints.len(),
                alive: Arc::downgrade(&alive),
                idle_timeout: config.idle_timeout.0,
            },
            _alive: alive,
            name: config.name.clone(),
            protocol: config.protocol,
            endpoints,
            balancer: Balancer::new(config.lb),
            connect_timeout: config.connect_timeout.0,
            idle_timeout: config.idle_timeout.0,
            limits: Limits::new(&config.circuit_breaker, &config.retry_budget),
            connections,
            outlier: OutlierDetector::new(
                &config.outlier_detection,
                metrics.upstream_ejections.with_label_values(&[name]),
            ),
            metrics: ClusterMetrics {
                connect_failures: metrics.upstream_connect_failures.with_label_values(&[name]),
                retries: metrics.upstream_retries.with_label_values(&[name]),
                overflow_connections: overflow(Limit::Connections),
                overflow_pending: overflow(Limit::PendingRequests),
                overflow_requests: overflow(Limit::Requests),
            },
        }
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The protocol spoken to the endpoints.
    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// The endpoint addresses, in configuration order.
    pub fn endpoints(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        self.endpoints.iter().map(|e| e.addr)
    }

    /// Whether outlier detection has the endpoint out right now.
    pub fn is_ejected(&self, endpoint: SocketAddr) -> bool {
        let now = now_ms();
        self.endpoints
            .iter()
            .any(|e| e.addr == endpoint && e.is_ejected(now))
    }

    /// Open pooled connections of this cluster, across all workers.
    pub fn open_connections(&self) -> usize {
        self.connections.open()
    }

    /// Idle HTTP/1 connections in the calling thread's pool.
    pub fn idle_connections(&self) -> usize {
        pool::idle_h1_count(&self.pool)
    }

    /// Requests in flight (waiting for their response head), across all workers.
    pub fn requests_in_flight(&self) -> usize {
        self.limits.requests_in_flight()
    }

    /// Sends one request and waits for the response head.
    ///
    /// Picks an endpoint (skipping ejected ones), enforces the circuit breaker
    /// ([`ProxyError::Overflow`]), reuses a pooled connection or opens one, and
    /// gives up after `policy.timeout` ([`ProxyError::UpstreamTimeout`]). Failed
    /// connects are retried on another endpoint when the policy and the retry
    /// budget allow (nothing was sent). Statuses in `policy.retry_on_status` are
    /// retried only when the request body is known to be empty
    /// (`is_end_stream()` or an exact size hint of 0).
    ///
    /// The URI may be origin-form. HTTP/1 sends origin-form with the Host header
    /// as given (the authority, or the endpoint address, when there is none);
    /// HTTP/2 sends `http://<Host or authority>/path`. HTTP/1 connections are
    /// driven with upgrades: after a `101` answer call
    /// `hyper::upgrade::on(&mut response.response)`; that connection never returns
    /// to the pool.
    pub async fn send(
        &self,
        request: Request<BoxBody>,
        policy: &RequestPolicy,
    ) -> Result<UpstreamResponse, ProxyError> {
        let _in_flight = self
            .limits
            .request()
            .ok_or_else(|| self.overflow(Limit::Requests))?;
        let exchange = self.exchange(request, policy);
        if policy.timeout.is_zero() {
            return exchange.await;
        }
        match tokio::time::timeout(policy.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::UpstreamTimeout(policy.timeout)),
        }
    }

    /// Opens a raw TCP connection to an endpoint, with the balancer, ejection and
    /// connect retries of [`Cluster::send`]. The caller owns the stream; it is
    /// counted in `upstream_connections_total` but not in the circuit breaker.
    pub async fn connect_tcp(&self) -> Result<(TcpStream, SocketAddr), ProxyError> {
        let mut chain = AttemptChain::new(self);
        loop {
            let index = chain.next_endpoint()?;
            match self.connect(index).await {
                Ok(stream) => {
                    self.connections.count_unpooled();
                    self.outlier.success(&self.endpoints[index]);
                    return Ok((stream, self.endpoints[index].addr));
                }
                Err(error) => {
                    chain.connect_failed(index);
                    if chain.attempts <= TCP_CONNECT_RETRIES && chain.retry_permit() {
                        chain.last_error = Some(error);
                        continue;
                    }
                    return Err(error);
                }
            }
        }
    }

    /// The attempt chain of one request, without the overall deadline.
    async fn exchange(
        &self,
        mut request: Request<BoxBody>,
        policy: &RequestPolicy,
    ) -> Result<UpstreamResponse, ProxyError> {
        self.prepare(&mut request)?;
        // A bodiless request can be sent again: on a retriable status, or (when
        // idempotent) after a reused connection broke under it.
        let template = (policy.retry_attempts > 0
            && (!policy.retry_on_status.is_empty() || is_idempotent(request.method()))
            && (request.body().is_end_stream() || request.body().size_hint().exact() == Some(0)))
        .then(|| RetryTemplate::of(&request));
        let mut chain = AttemptChain::new(self);
        loop {
            let index = chain.next_endpoint()?;
            let endpoint = &self.endpoints[index];
            let outcome = {
                let _active = endpoint.begin_request();
                self.attempt(index, request).await
            };
            let may_retry = chain.attempts <= policy.retry_attempts;
            match outcome {
                Ok(response) => {
                    let status = response.status().as_u16();
                    if status >= 500 {
                        self.outlier
                            .failure(&self.endpoints, index, Failure::Response);
                    } else {
                        self.outlier.success(endpoint);
                    }
                    if may_retry
                        && policy.retry_on_status.contains(&status)
                        && let Some(template) = &template
                        && chain.retry_permit()
                    {
                        drop(response);
                        request = template.request();
                        continue;
                    }
                    return Ok(UpstreamResponse {
                        response,
                        endpoint: endpoint.addr,
                        attempts: chain.attempts,
                    });
                }
                Err(AttemptError::Unsent {
                    error,
                    request: unsent,
                }) => {
                    chain.connect_failed(index);
                    if may_retry && policy.retry_on_connect_failure && chain.retry_permit() {
                        request = *unsent;
                        chain.last_error = Some(error);
                        continue;
                    }
                    return Err(error);
                }
                Err(AttemptError::Stale(error)) => {
                    if may_retry
                        && let Some(template) = &template
                        && is_idempotent(&template.method)
                        && chain.retry_permit()
                    {
                        request = template.request();
                        continue;
                    }
                    self.outlier
                        .failure(&self.endpoints, index, Failure::Response);
                    return Err(error);
                }
                Err(AttemptError::Failed(error)) => {
                    if matches!(error, ProxyError::UpstreamReset(_)) {
                        self.outlier
                            .failure(&self.endpoints, index, Failure::Response);
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Chooses the endpoint of the next attempt.
    ///
    /// Preference: not ejected and not yet tried by this request; then not
    /// ejected; then, when every remaining endpoint is ejected, any endpoint not
    /// yet failed by this request (panic routing: better to try than to refuse),
    /// unless every endpoint is ejected because it refused connections, which
    /// fails fast with `NoHealthyUpstream` until the first ejection expires.
    /// Endpoints that failed to connect during this request are never chosen again.
    fn pick(&self, tried: &EndpointSet, failed: &EndpointSet) -> Pick {
        let now = now_ms();
        let endpoints = &self.endpoints[..];
        let usable = |i: usize| !failed.contains(i) && !endpoints[i].is_ejected(now);
        if let Some(index) = self
            .balancer
            .choose(endpoints, |i| usable(i) && !tried.contains(i))
            .or_else(|| self.balancer.choose(endpoints, usable))
        {
            return Pick::Endpoint(index);
        }
        if endpoints.is_empty() {
            return Pick::NoHealthy;
        }
        if (0..endpoints.len()).all(|i| failed.contains(i)) {
            return Pick::Exhausted;
        }
        let all_down = endpoints
            .iter()
            .all(|e| e.is_ejected(now) && e.ejected_for_connect.load(Ordering::Relaxed));
        if all_down {
            return Pick::NoHealthy;
        }
        match self.balancer.choose(endpoints, |i| !failed.contains(i)) {
            Some(index) => Pick::Endpoint(index),
            None => Pick::Exhausted,
        }
    }

    fn no_healthy(&self) -> ProxyError {
        ProxyError::NoHealthyUpstream(self.name.clone())
    }

    fn overflow(&self, limit: Limit) -> ProxyError {
        match limit {
            Limit::Connections => &self.metrics.overflow_connections,
            Limit::PendingRequests => &self.metrics.overflow_pending,
            Limit::Requests => &self.metrics.overflow_requests,
        }
        .inc();
        ProxyError::Overflow {
            cluster: self.name.clone(),
            limit: limit.name(),
        }
    }

    /// Shapes the request target and version for the upstream protocol.
    fn prepare(&self, request: &mut Request<BoxBody>) -> Result<(), ProxyError> {
        match self.protocol {
            UpstreamProtocol::Http1 => {
                *request.version_mut() = Version::HTTP_11;
                if request.method() == Method::CONNECT {
                    return Ok(());
                }
                if let Some(authority) = request.uri().authority() {
                    if !request.headers().contains_key(header::HOST)
                        && let Ok(host) = HeaderValue::from_str(authority.as_str())
                    {
                        request.headers_mut().insert(header::HOST, host);
                    }
                    let origin = request
                        .uri()
                        .path_and_query()
                        .cloned()
                        .unwrap_or_else(|| PathAndQuery::from_static("/"));
                    *request.uri_mut() = Uri::from(origin);
                }
            }
            UpstreamProtocol::H2 => {
                *request.version_mut() = Version::HTTP_2;
                let host = request.headers_mut().remove(header::HOST);
                let authority = match (request.uri().authority(), host) {
                    (Some(authority), _) => authority.clone(),
                    (None, Some(host)) => {
                        Authority::try_from(host.as_bytes()).map_err(|e| invalid_target(&e))?
                    }
                    (None, None) => return Ok(()),
                };
                set_absolute(request, authority)?;
            }
        }
        Ok(())
    }

    async fn attempt(
        &self,
        index: usize,
        request: Request<BoxBody>,
    ) -> Result<Response<Incoming>, AttemptError> {
        match self.protocol {
            UpstreamProtocol::Http1 => self.attempt_h1(index, request).await,
            UpstreamProtocol::H2 => self.attempt_h2(index, request).await,
        }
    }

    async fn attempt_h1(
        &self,
        index: usize,
        mut request: Request<BoxBody>,
    ) -> Result<Response<Incoming>, AttemptError> {
        if !request.headers().contains_key(header::HOST) {
            let host = self.endpoints[index].host.clone();
            request.headers_mut().insert(header::HOST, host);
        }
        let mut yielded = false;
        loop {
            let Some((mut sender, idle_since)) =
                pool::checkout_h1(&self.pool, index, self.idle_timeout)
            else {
                if yielded {
                    break;
                }
                // Before paying for a connect, let connections whose response
                // just finished (on this worker) come back to the pool.
                yielded = true;
                tokio::task::yield_now().await;
                continue;
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    self.release_h1(index, sender, idle_since, &response);
                    return Ok(response);
                }
                Err(mut error) => match error.take_message() {
                    // The pooled connection closed under us before anything was written.
                    Some(unsent) => request = unsent,
                    None => {
                        let error = error.into_error();
                        let stale = error.is_incomplete_message() || error.is_canceled();
                        let error = reset(error);
                        return Err(if stale {
                            AttemptError::Stale(error)
                        } else {
                            AttemptError::Failed(error)
                        });
                    }
                },
            }
        }
        let (mut sender, idle_since) = match self.open_h1(index).await {
            Ok(connection) => connection,
            Err(error) => return Err(error.attempt_error(request)),
        };
        match sender.try_send_request(request).await {
            Ok(response) => {
                self.release_h1(index, sender, idle_since, &response);
                Ok(response)
            }
            Err(mut error) => {
                let unsent = error.take_message();
                Err(AttemptError::send_failed(error.into_error(), unsent))
            }
        }
    }

    /// Returns an HTTP/1 connection to the pool once its response body is done.
    /// Upgraded connections (`101`) belong to the caller and are never pooled.
    fn release_h1(
        &self,
        index: usize,
        mut sender: H1Sender,
        idle_since: IdleSince,
        response: &Response<Incoming>,
    ) {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        let key = self.pool.clone();
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                pool::checkin_h1(&key, index, sender, idle_since);
            }
        });
    }

    async fn open_h1(&self, index: usize) -> Result<(H1Sender, IdleSince), OpenError> {
        let _pending = self
            .limits
            .pending()
            .ok_or_else(|| OpenError::Overflow(self.overflow(Limit::PendingRequests)))?;
        let (stream, slot) = self.open_connection(index).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| OpenError::Connect(self.handshake_failed(index, &e)))?;
        let idle_since = Arc::new(AtomicU64::new(pool::BUSY));
        pool::spawn_h1_driver(
            conn.with_upgrades(),
            Arc::clone(&idle_since),
            self.idle_timeout,
            slot,
        );
        Ok((sender, idle_since))
    }

    async fn attempt_h2(
        &self,
        index: usize,
        mut request: Request<BoxBody>,
    ) -> Result<Response<Incoming>, AttemptError> {
        if request.uri().authority().is_none()
            && let Err(error) = Authority::try_from(self.endpoints[index].host.as_bytes())
                .map_err(|e| invalid_target(&e))
                .and_then(|authority| set_absolute(&mut request, authority))
        {
            return Err(AttemptError::Failed(error));
        }
        let mut fresh = false;
        loop {
            let mut sender = match self.h2_sender(index).await {
                Ok(sender) => sender,
                Err(error) => return Err(error.attempt_error(request)),
            };
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(response),
                Err(mut error) => match error.take_message() {
                    Some(unsent) if !fresh => {
                        // The shared connection closed before the stream opened: replace it once.
                        pool::h2_evict(&self.pool, index);
                        request = unsent;
                        fresh = true;
                    }
                    unsent => return Err(AttemptError::send_failed(error.into_error(), unsent)),
                },
            }
        }
    }

    /// The shared HTTP/2 connection to an endpoint on this thread, opened by the
    /// first request that needs it while the others wait.
    async fn h2_sender(&self, index: usize) -> Result<H2Sender, OpenError> {
        let mut waited = false;
        loop {
            match pool::h2_lookup(&self.pool, index, self.idle_timeout) {
                H2Lookup::Ready(sender) => return Ok(sender),
                H2Lookup::Wait(notify) if !waited => {
                    waited = true;
                    let _pending = self.limits.pending().ok_or_else(|| {
                        OpenError::Overflow(self.overflow(Limit::PendingRequests))
                    })?;
                    let notified = notify.notified();
                    tokio::pin!(notified);
                    notified.as_mut().enable();
                    // Bounded: a connect that never reports back must not strand us.
                    let _ = tokio::time::timeout(self.wait_for_connect(), notified).await;
                }
                H2Lookup::Wait(_) | H2Lookup::Unpooled => return self.open_h2(index).await,
                H2Lookup::Connect(claim) => {
                    let claim = H2Claim {
                        key: &self.pool,
                        index,
                        notify: Some(claim),
                    };
                    let sender = self.open_h2(index).await?;
                    pool::h2_install(&self.pool, index, sender.clone());
                    claim.installed();
                    return Ok(sender);
                }
            }
        }
    }

    async fn open_h2(&self, index: usize) -> Result<H2Sender, OpenError> {
        let _pending = self
            .limits
            .pending()
            .ok_or_else(|| OpenError::Overflow(self.overflow(Limit::PendingRequests)))?;
        let (stream, slot) = self.open_connection(index).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| OpenError::Connect(self.handshake_failed(index, &e)))?;
        pool::spawn_h2_driver(conn, slot);
        Ok(sender)
    }

    fn wait_for_connect(&self) -> Duration {
        if self.connect_timeout.is_zero() {
            Duration::from_secs(60)
        } else {
            self.connect_timeout + Duration::from_millis(100)
        }
    }

    /// Reserves a connection under `max_connections` and connects.
    async fn open_connection(
        &self,
        index: usize,
    ) -> Result<(TcpStream, ConnectionSlot), OpenError> {
        let mut slot = self
            .connections
            .reserve()
            .ok_or_else(|| OpenError::Overflow(self.overflow(Limit::Connections)))?;
        let stream = self.connect(index).await.map_err(OpenError::Connect)?;
        slot.established();
        Ok((stream, slot))
    }

    /// One TCP connect within the connect timeout, with TCP_NODELAY.
    async fn connect(&self, index: usize) -> Result<TcpStream, ProxyError> {
        let addr = self.endpoints[index].addr;
        let reason = if self.connect_timeout.is_zero() {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(nodelay(stream)),
                Err(error) => error.to_string(),
            }
        } else {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(addr)).await {
                Ok(Ok(stream)) => return Ok(nodelay(stream)),
                Ok(Err(error)) => error.to_string(),
                Err(_) => format!("timed out after {:?}", self.connect_timeout),
            }
        };
        self.metrics.connect_failures.inc();
        tracing::debug!(cluster = %self.name, endpoint = %addr, %reason, "upstream connect failed");
        Err(ProxyError::Connect {
            endpoint: addr.to_string(),
            reason,
        })
    }

    fn handshake_failed(&self, index: usize, error: &hyper::Error) -> ProxyError {
        self.metrics.connect_failures.inc();
        ProxyError::Connect {
            endpoint: self.endpoints[index].addr.to_string(),
            reason: format!("handshake: {error}"),
        }
    }
}

/// A claim on an endpoint's HTTP/2 slot; given up (and waiters woken) unless installed.
struct H2Claim<'a> {
    key: &'a PoolKey,
    index: usize,
    notify: Option<Arc<tokio::sync::Notify>>,
}

impl H2Claim<'_> {
    fn installed(mut self) {
        self.notify = None;
    }
}

impl Drop for H2Claim<'_> {
    fn drop(&mut self) {
        if let Some(notify) = self.notify.take() {
            pool::h2_abandon(self.key, self.index, &notify);
        }
    }
}

/// What is needed to send a bodiless request again.
struct RetryTemplate {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl RetryTemplate {
    fn of(request: &Request<BoxBody>) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: request.headers().clone(),
        }
    }

    fn request(&self) -> Request<BoxBody> {
        let mut request = Request::new(body::empty());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Methods that may be sent twice without changing the outcome (RFC 9110, 9.2.2).
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn nodelay(stream: TcpStream) -> TcpStream {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "TCP_NODELAY not set on upstream socket");
    }
    stream
}

fn reset(error: hyper::Error) -> ProxyError {
    ProxyError::UpstreamReset(error.to_string())
}

fn invalid_target(error: &dyn std::fmt::Display) -> ProxyError {
    ProxyError::UpstreamReset(format!("invalid request authority: {error}"))
}

/// Makes the request URI absolute (`http://authority/path`), as HTTP/2 requires.
fn set_absolute(request: &mut Request<BoxBody>, authority: Authority) -> Result<(), ProxyError> {
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *request.uri_mut() = Uri::from_parts(parts).map_err(|e| invalid_target(&e))?;
    Ok(())
}
