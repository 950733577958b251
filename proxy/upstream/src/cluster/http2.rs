//! One attempt over HTTP/2: every request on a worker shares one connection
//! per endpoint, opened by the first request that needs it while the others
//! wait; a connection that closed before the stream opened is replaced once.

use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lacewing_core::ProxyError;
use lacewing_core::body::BoxBody;

use super::Cluster;
use super::attempt::{AttemptError, OpenError};
use crate::breaker::Limit;
use crate::endpoint::Endpoint;
use crate::pool::{self, ConnInfo, H2Lookup, H2Sender, PoolKey};

impl Cluster {
    pub(super) async fn attempt_h2(
        &self,
        endpoint: &Arc<Endpoint>,
        mut request: Request<BoxBody>,
    ) -> Result<(Response<Incoming>, ConnInfo), AttemptError> {
        if request.uri().authority().is_none()
            && let Err(error) = Authority::try_from(endpoint.host.as_bytes())
                .map_err(|e| invalid_target(&e))
                .and_then(|authority| set_absolute(&mut request, authority))
        {
            return Err(AttemptError::Failed(error));
        }
        let mut fresh = false;
        loop {
            let (mut sender, info) = match self.h2_sender(endpoint).await {
                Ok(sender) => sender,
                Err(error) => return Err(error.attempt_error(request)),
            };
            match sender.try_send_request(request).await {
                Ok(response) => return Ok((response, info)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) if !fresh => {
                        // The shared connection closed before the stream opened: replace it once.
                        pool::h2_evict(&self.pool, endpoint);
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
    pub(super) async fn h2_sender(
        &self,
        endpoint: &Arc<Endpoint>,
    ) -> Result<(H2Sender, ConnInfo), OpenError> {
        let mut waited = false;
        loop {
            match pool::h2_lookup(&self.pool, endpoint, self.idle_timeout) {
                H2Lookup::Ready(sender, info) => return Ok((sender, info)),
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
                H2Lookup::Wait(_) | H2Lookup::Unpooled => {
                    return Box::pin(self.open_h2(endpoint)).await;
                }
                H2Lookup::Connect(claim) => {
                    let claim = H2Claim {
                        key: &self.pool,
                        endpoint,
                        notify: Some(claim),
                    };
                    // Boxed: the connect and handshake future is large and rare;
                    // inline, every request's future would carry (and move) it.
                    let (sender, info) = Box::pin(self.open_h2(endpoint)).await?;
                    pool::h2_install(&self.pool, endpoint, sender.clone(), info.clone());
                    claim.installed();
                    return Ok((sender, info));
                }
            }
        }
    }

    pub(super) async fn open_h2(
        &self,
        endpoint: &Endpoint,
    ) -> Result<(H2Sender, ConnInfo), OpenError> {
        let _pending = self
            .limits
            .pending()
            .ok_or_else(|| OpenError::Overflow(self.overflow(Limit::PendingRequests)))?;
        let (stream, slot, info) = self.open_connection(endpoint).await?;
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| OpenError::Connect(self.handshake_failed(endpoint, &e)))?;
        pool::spawn_h2_driver(conn, slot);
        Ok((sender, info))
    }

    pub(super) fn wait_for_connect(&self) -> Duration {
        if self.connect_timeout.is_zero() {
            Duration::from_secs(60)
        } else {
            self.connect_timeout + Duration::from_millis(100)
        }
    }
}

/// A claim on an endpoint's HTTP/2 slot; given up (and waiters woken) unless installed.
pub(super) struct H2Claim<'a> {
    key: &'a PoolKey,
    endpoint: &'a Arc<Endpoint>,
    notify: Option<Arc<tokio::sync::Notify>>,
}

impl H2Claim<'_> {
    pub(super) fn installed(mut self) {
        self.notify = None;
    }
}

impl Drop for H2Claim<'_> {
    fn drop(&mut self) {
        if let Some(notify) = self.notify.take() {
            pool::h2_abandon(self.key, self.endpoint, &notify);
        }
    }
}

pub(super) fn invalid_target(error: &dyn std::fmt::Display) -> ProxyError {
    ProxyError::UpstreamReset(format!("invalid request authority: {error}"))
}

/// Makes the request URI absolute (`http://authority/path`), as HTTP/2 requires.
pub(super) fn set_absolute(
    request: &mut Request<BoxBody>,
    authority: Authority,
) -> Result<(), ProxyError> {
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    if parts.path_and_query.is_none() {
        parts.path_and_query = Some(PathAndQuery::from_static("/"));
    }
    *request.uri_mut() = Uri::from_parts(parts).map_err(|e| invalid_target(&e))?;
    Ok(())
}
