//! The attempt chain of one request: which endpoint each attempt goes to,
//! when a failed attempt is sent again (connect failures, retriable
//! statuses, stale pooled connections), and the request shaped for the
//! upstream protocol. One attempt is [`super::http1`] or [`super::http2`].

use std::sync::Arc;

use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri, Version, header};
use http_body::Body as _;
use hyper::body::Incoming;
use lacewing_config::UpstreamProtocol;
use lacewing_core::ProxyError;
use lacewing_core::body::{self, BoxBody};

use super::http2::{invalid_target, set_absolute};
use super::{Cluster, RequestPolicy, UpstreamResponse};
use crate::breaker::Held;
use crate::endpoint::{Endpoint, EndpointSet};
use crate::outlier::Failure;
use crate::pool::{ConnInfo, H1Connection};

/// Why one attempt did not produce a response head.
pub(super) enum AttemptError {
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
pub(super) enum OpenError {
    Overflow(ProxyError),
    Connect(ProxyError),
}

impl AttemptError {
    /// A send that failed with no retry left on this endpoint: unsent when
    /// hyper gave the request back, failed otherwise.
    pub(super) fn send_failed(error: hyper::Error, unsent: Option<Request<BoxBody>>) -> Self {
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
    pub(super) fn attempt_error(self, request: Request<BoxBody>) -> AttemptError {
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
pub(super) enum Pick {
    Endpoint(usize),
    /// Every endpoint is ejected after failed connects (or the cluster is empty).
    NoHealthy,
    /// Every endpoint already failed to connect during this request.
    Exhausted,
}

/// The bookkeeping of one request's (or connection's) attempts: the endpoints
/// tried and failed, the retry-budget slot, and the error to report when no
/// endpoint is left.
pub(super) struct AttemptChain<'a> {
    cluster: &'a Cluster,
    /// The cluster's endpoints when the chain started; indexes below refer to it.
    pub(super) endpoints: Arc<Vec<Arc<Endpoint>>>,
    tried: EndpointSet,
    failed: EndpointSet,
    retry_slot: Option<Held<'a>>,
    pub(super) last_error: Option<ProxyError>,
    /// Attempts started so far, the first included.
    pub(super) attempts: u32,
}

impl<'a> AttemptChain<'a> {
    pub(super) fn new(cluster: &'a Cluster) -> Self {
        Self {
            cluster,
            endpoints: cluster.endpoints.load_full(),
            tried: EndpointSet::default(),
            failed: EndpointSet::default(),
            retry_slot: None,
            last_error: None,
            attempts: 0,
        }
    }

    /// Picks the endpoint of the next attempt and counts it (as a retry after the first).
    pub(super) fn next_endpoint(&mut self) -> Result<(usize, Arc<Endpoint>), ProxyError> {
        let cluster = self.cluster;
        let index = match cluster.pick(&self.endpoints, &self.tried, &self.failed) {
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
        Ok((index, self.endpoints[index].clone()))
    }

    /// Records that connecting to an endpoint failed: never picked again by
    /// this chain, and a connect failure for outlier detection.
    pub(super) fn connect_failed(&mut self, index: usize) {
        self.failed.insert(index);
        self.cluster
            .outlier
            .failure(&self.endpoints, index, Failure::Connect);
    }

    /// Takes (once per chain) a slot of the retry budget.
    pub(super) fn retry_permit(&mut self) -> bool {
        if self.retry_slot.is_none() {
            self.retry_slot = self.cluster.limits.retry();
        }
        self.retry_slot.is_some()
    }
}

impl Cluster {
    /// The attempt chain of one request, without the overall deadline.
    pub(super) async fn exchange<F: Fn() -> Request<BoxBody>>(
        &self,
        mut request: Request<BoxBody>,
        policy: &RequestPolicy,
        resend: Option<&F>,
    ) -> Result<UpstreamResponse, ProxyError> {
        self.prepare(&mut request)?;
        // A bodiless request can be sent again: on a retriable status, or (when
        // idempotent) after a reused connection broke under it.
        let template = (policy.retry_attempts > 0
            && (!policy.retry_on_status.is_empty() || is_idempotent(request.method()))
            && (request.body().is_end_stream() || request.body().size_hint().exact() == Some(0)))
        .then(|| match resend {
            // Rebuilt only when needed: a copy made now costs a header map
            // clone on every request (about 700 instructions, callgrind).
            Some(source) => Resend::Source {
                method: request.method().clone(),
                source,
            },
            None => Resend::Copy(RetryTemplate::of(&request)),
        });
        let mut chain = AttemptChain::new(self);
        loop {
            let (index, endpoint) = chain.next_endpoint()?;
            let outcome = {
                let _active = endpoint.begin_request();
                self.attempt(&endpoint, request).await
            };
            let may_retry = chain.attempts <= policy.retry_attempts;
            match outcome {
                Ok((response, connection, h1)) => {
                    let status = response.status().as_u16();
                    if status >= 500 {
                        self.outlier
                            .failure(&chain.endpoints, index, Failure::Response);
                    } else {
                        self.outlier.success(&endpoint);
                    }
                    if may_retry
                        && policy.retry_on_status.contains(&status)
                        && let Some(template) = &template
                        && chain.retry_permit()
                    {
                        drop(response);
                        request = template.request(self)?;
                        continue;
                    }
                    return Ok(UpstreamResponse {
                        response,
                        endpoint: endpoint.addr,
                        attempts: chain.attempts,
                        connection,
                        h1,
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
                        && is_idempotent(template.method())
                        && chain.retry_permit()
                    {
                        request = template.request(self)?;
                        continue;
                    }
                    self.outlier
                        .failure(&chain.endpoints, index, Failure::Response);
                    return Err(error);
                }
                Err(AttemptError::Failed(error)) => {
                    if matches!(error, ProxyError::UpstreamReset(_)) {
                        self.outlier
                            .failure(&chain.endpoints, index, Failure::Response);
                    }
                    return Err(error);
                }
            }
        }
    }

    /// Shapes the request target and version for the upstream protocol.
    pub(super) fn prepare(&self, request: &mut Request<BoxBody>) -> Result<(), ProxyError> {
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

    pub(super) async fn attempt(
        &self,
        endpoint: &Arc<Endpoint>,
        request: Request<BoxBody>,
    ) -> Result<(Response<Incoming>, ConnInfo, Option<H1Connection>), AttemptError> {
        match self.protocol {
            UpstreamProtocol::Http1 => self.attempt_h1(endpoint, request).await,
            UpstreamProtocol::H2 => {
                let (response, info) = self.attempt_h2(endpoint, request).await?;
                Ok((response, info, None))
            }
        }
    }
}

/// No source for a request sent again: [`Cluster::exchange`] copies it.
pub(super) const NO_RESEND: Option<&fn() -> Request<BoxBody>> = None;

/// Where a bodiless request sent again comes from.
enum Resend<'a, F> {
    /// A copy of the first attempt's request.
    Copy(RetryTemplate),
    /// The caller's, which keeps the request's head (a filtered stream):
    /// rebuilt and shaped for the upstream again.
    Source { method: Method, source: &'a F },
}

impl<F: Fn() -> Request<BoxBody>> Resend<'_, F> {
    fn method(&self) -> &Method {
        match self {
            Self::Copy(template) => &template.method,
            Self::Source { method, .. } => method,
        }
    }

    fn request(&self, cluster: &Cluster) -> Result<Request<BoxBody>, ProxyError> {
        match self {
            Self::Copy(template) => Ok(template.request()),
            Self::Source { source, .. } => {
                let mut request = source();
                cluster.prepare(&mut request)?;
                Ok(request)
            }
        }
    }
}

/// What is needed to send a bodiless request again.
pub(super) struct RetryTemplate {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
}

impl RetryTemplate {
    pub(super) fn of(request: &Request<BoxBody>) -> Self {
        Self {
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            headers: request.headers().clone(),
        }
    }

    pub(super) fn request(&self) -> Request<BoxBody> {
        let mut request = Request::new(body::empty());
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.version_mut() = self.version;
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Methods that may be sent twice without changing the outcome (RFC 9110, 9.2.2).
pub(super) fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

pub(super) fn reset(error: hyper::Error) -> ProxyError {
    ProxyError::UpstreamReset(error.to_string())
}
