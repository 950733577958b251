//! One cluster: pick an endpoint, respect the circuit breaker, reuse or open a
//! connection, send, retry, and record outlier results. The attempt chain
//! and retries are in `attempt`, one attempt over HTTP/1.1 or HTTP/2 in
//! `http1` and `http2`, and connecting to an endpoint in `connect`.
//!
//! The phases of [`Cluster::send`]:
//! ```text
//! max_requests ─▶ [ timeout ┊ pick ─▶ connection (pool | connect) ─▶ send ─▶ response head ┊ ]
//!                              ▲          │ connect failed                     │ retriable status,
//!                              └──────────┴── retry (attempts, budget) ◀───────┘ bodiless request
//! ```

mod attempt;
mod connect;
mod http1;
mod http2;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Poll;
use std::time::Duration;

use arc_swap::ArcSwap;

use http::{Request, Response};
use hyper::body::Incoming;
use lacewing_config::{ClusterConfig, RetryPolicy, UpstreamProtocol};
use lacewing_core::ProxyError;
use lacewing_core::body::BoxBody;
use lacewing_core::metrics::Metrics;
use lacewing_core::stream::UpstreamConnection;
use lacewing_core::timer::RequestDeadlines;
use prometheus::IntCounter;

use self::attempt::{AttemptChain, NO_RESEND, Pick};
use crate::breaker::{ConnectionCount, Limit, Limits};
use crate::clock::{LazyNow, now_ms};
use crate::endpoint::{Endpoint, EndpointSet};
use crate::lb::Balancer;
use crate::outlier::OutlierDetector;
use crate::pool::{self, H1Connection, PoolKey};
use crate::tls::{Conn, UpstreamTls};

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
    /// The connection that carried the answer (`upstream.*` properties).
    pub connection: Arc<UpstreamConnection>,
    /// The HTTP/1 connection that answered (`None` over HTTP/2): whether it
    /// sent bytes beyond the response (`UPE`).
    pub h1: Option<H1Connection>,
}

/// Metric children of one cluster, resolved once at build.
#[derive(Debug)]
struct ClusterMetrics {
    connect_failures: IntCounter,
    retries: IntCounter,
    overflow_connections: IntCounter,
    overflow_pending: IntCounter,
    overflow_requests: IntCounter,
    overflow_share: IntCounter,
}

/// A named group of endpoints with its balancer, limits, outlier detection and pools.
#[derive(Debug)]
pub struct Cluster {
    name: String,
    protocol: UpstreamProtocol,
    /// Replaced whole when the endpoint set changes; a request keeps the list it started with.
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    balancer: Balancer,
    connect_timeout: Duration,
    idle_timeout: Duration,
    limits: Limits,
    connections: Arc<ConnectionCount>,
    outlier: OutlierDetector,
    pool: PoolKey,
    /// Mutual TLS to the endpoints, when the cluster has it.
    tls: Option<UpstreamTls>,
    /// Held only here: per-thread pools of this cluster are dropped once it is.
    _alive: Arc<()>,
    metrics: ClusterMetrics,
}

static NEXT_CLUSTER_ID: AtomicU64 = AtomicU64::new(1);

impl Cluster {
    /// Builds a cluster over resolved endpoint addresses.
    pub(crate) fn new(
        config: &ClusterConfig,
        addrs: Vec<SocketAddr>,
        metrics: &Metrics,
        tls: Option<UpstreamTls>,
    ) -> Self {
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
        let endpoints: Vec<Arc<Endpoint>> = addrs
            .into_iter()
            .map(|addr| Arc::new(Endpoint::new(addr)))
            .collect();
        let alive = Arc::new(());
        Self {
            pool: PoolKey {
                id: NEXT_CLUSTER_ID.fetch_add(1, Ordering::Relaxed),
                alive: Arc::downgrade(&alive),
                idle_timeout: config.idle_timeout.0,
            },
            _alive: alive,
            tls,
            name: config.name.clone(),
            protocol: config.protocol,
            endpoints: ArcSwap::from_pointee(endpoints),
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
                overflow_share: overflow(Limit::DownstreamShare),
            },
        }
    }

    /// The cluster's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether connections to the endpoints are mutual TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The protocol spoken to the endpoints.
    pub fn protocol(&self) -> UpstreamProtocol {
        self.protocol
    }

    /// The endpoint addresses, in configuration order.
    pub fn endpoints(&self) -> Vec<SocketAddr> {
        self.endpoints.load().iter().map(|e| e.addr).collect()
    }

    /// Replaces the endpoint set. An address that was already an endpoint
    /// stays the same endpoint, with its pooled connections, active-request
    /// count and outlier state; removed endpoints take no new request, and
    /// their pooled connections close once idle. Requests in flight finish on
    /// the set they started with.
    pub fn set_endpoints(&self, addrs: &[SocketAddr]) {
        let mut old: Vec<Arc<Endpoint>> = self.endpoints.load().iter().cloned().collect();
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|addr| match old.iter().position(|e| e.addr == *addr) {
                Some(i) => old.swap_remove(i),
                None => Arc::new(Endpoint::new(*addr)),
            })
            .collect();
        self.endpoints.store(Arc::new(next));
    }

    /// Whether outlier detection has the endpoint out right now.
    pub fn is_ejected(&self, endpoint: SocketAddr) -> bool {
        let now = now_ms();
        self.endpoints
            .load()
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

    /// The most exchanges one downstream connection may hold on this cluster
    /// at once, given its `share` (0 to 1) of the cluster: of the smaller of
    /// `max_connections` and `max_pending_requests` for HTTP/1.1 (an exchange
    /// holds one connection, or one pending slot while it waits for one), of
    /// `max_requests` for HTTP/2 (exchanges share connections). At least one.
    pub fn downstream_share(&self, share: f64) -> usize {
        let (max_pending, max_requests) = self.limits.maxima();
        let base = match self.protocol {
            UpstreamProtocol::Http1 => self.connections.max().min(max_pending),
            UpstreamProtocol::H2 => max_requests,
        };
        ((base as f64 * share) as usize).max(1)
    }

    /// The error of an exchange refused because its downstream connection
    /// already holds its [`Cluster::downstream_share`] (counted in the
    /// overflow metric as `max_upstream_share`).
    pub fn share_overflow(&self) -> ProxyError {
        self.overflow(Limit::DownstreamShare)
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
        self.send_timed(request, policy, NO_RESEND).await
    }

    /// [`Cluster::send`] with a timer made for this request; a future that
    /// is `Send` when `resend` is `Sync`.
    async fn send_timed<F: Fn() -> Request<BoxBody>>(
        &self,
        request: Request<BoxBody>,
        policy: &RequestPolicy,
        resend: Option<&F>,
    ) -> Result<UpstreamResponse, ProxyError> {
        let _in_flight = self
            .limits
            .request()
            .ok_or_else(|| self.overflow(Limit::Requests))?;
        // Pinned where it is built: the timeout and the await then move a
        // pointer instead of copying the whole attempt future (twice).
        let exchange = std::pin::pin!(self.exchange(request, policy, resend));
        if policy.timeout.is_zero() {
            return exchange.await;
        }
        match tokio::time::timeout(policy.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => Err(ProxyError::UpstreamTimeout(policy.timeout)),
        }
    }

    /// [`Cluster::send`] for a caller that keeps what the exchange would
    /// otherwise make for itself, on the caller's thread:
    /// - `deadlines`: the timer of a connection whose requests come one at
    ///   a time (HTTP/1), kept armed across them, watches the route timeout
    ///   (instead of a timer made for this request);
    /// - `resend`: gives the request again, with an empty body, should it be
    ///   sent again (instead of a copy of a bodiless request made before its
    ///   first attempt); it must give the method, target, version and
    ///   headers of `request`.
    pub async fn send_with<F: Fn() -> Request<BoxBody>>(
        &self,
        request: Request<BoxBody>,
        policy: &RequestPolicy,
        deadlines: Option<&RequestDeadlines>,
        resend: Option<&F>,
    ) -> Result<UpstreamResponse, ProxyError> {
        let Some(deadlines) = deadlines.filter(|_| !policy.timeout.is_zero()) else {
            return self.send_timed(request, policy, resend).await;
        };
        let _in_flight = self
            .limits
            .request()
            .ok_or_else(|| self.overflow(Limit::Requests))?;
        let mut exchange = std::pin::pin!(self.exchange(request, policy, resend));
        let deadline = tokio::time::Instant::now() + policy.timeout;
        // The exchange first, as `tokio::time::timeout` polls it.
        std::future::poll_fn(|cx| match exchange.as_mut().poll(cx) {
            Poll::Ready(result) => Poll::Ready(result),
            Poll::Pending => deadlines
                .poll_passed(cx, deadline)
                .map(|()| Err(ProxyError::UpstreamTimeout(policy.timeout))),
        })
        .await
    }

    /// Opens a raw TCP connection to an endpoint, with the balancer, ejection and
    /// connect retries of [`Cluster::send`]; mutual TLS (no ALPN) when the
    /// cluster has `tls`, a failed handshake retried like a failed connect.
    /// The caller owns the stream; it is
    /// counted in `upstream_connections_total` but not in the circuit breaker.
    pub async fn connect_tcp(
        &self,
    ) -> Result<(Conn, SocketAddr, Arc<UpstreamConnection>), ProxyError> {
        let mut chain = AttemptChain::new(self);
        loop {
            let (index, endpoint) = chain.next_endpoint()?;
            let connected = match self.connect(&endpoint).await {
                Ok(stream) => self.secure(stream, &endpoint, true).await,
                Err(error) => Err(error),
            };
            match connected {
                Ok((stream, info)) => {
                    self.connections.count_unpooled();
                    self.outlier.success(&endpoint);
                    return Ok((stream, endpoint.addr, info));
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

    /// Chooses the endpoint of the next attempt.
    ///
    /// Preference: not ejected and not yet tried by this request; then not
    /// ejected; then, when every remaining endpoint is ejected, any endpoint not
    /// yet failed by this request (panic routing: better to try than to refuse),
    /// unless every endpoint is ejected because it refused connections, which
    /// fails fast with `NoHealthyUpstream` until the first ejection expires.
    /// Endpoints that failed to connect during this request are never chosen again.
    fn pick(&self, endpoints: &[Arc<Endpoint>], tried: &EndpointSet, failed: &EndpointSet) -> Pick {
        let now = LazyNow::default();
        let usable = |i: usize| !failed.contains(i) && !endpoints[i].is_ejected_lazy(&now);
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
            .all(|e| e.is_ejected_lazy(&now) && e.ejected_for_connect.load(Ordering::Relaxed));
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
            Limit::DownstreamShare => &self.metrics.overflow_share,
        }
        .inc();
        ProxyError::Overflow {
            cluster: self.name.clone(),
            limit: limit.name(),
        }
    }
}
