//! One attempt over HTTP/1.1: a pooled idle connection when there is one
//! (LIFO), else a new one; the connection returns to the pool once its
//! response body is done.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use lacewing_core::body::BoxBody;

use super::Cluster;
use super::attempt::{AttemptError, OpenError, reset};
use crate::breaker::Limit;
use crate::endpoint::Endpoint;
use crate::pool::{self, ConnInfo, H1Connection, H1Sender, IdleSince};

impl Cluster {
    pub(super) async fn attempt_h1(
        &self,
        endpoint: &Arc<Endpoint>,
        mut request: Request<BoxBody>,
    ) -> Result<(Response<Incoming>, ConnInfo, Option<H1Connection>), AttemptError> {
        if !request.headers().contains_key(header::HOST) {
            let host = endpoint.host.clone();
            request.headers_mut().insert(header::HOST, host);
        }
        let mut yielded = false;
        loop {
            let Some((mut sender, idle_since, info)) =
                pool::checkout_h1(&self.pool, endpoint, self.idle_timeout)
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
                    let connection = H1Connection::new(&idle_since);
                    self.release_h1(endpoint, sender, idle_since, info.clone(), &response);
                    return Ok((response, info, Some(connection)));
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
        // Boxed: the connect and handshake future is large and needed only on a
        // pool miss; inline, every request's future would carry (and move) it.
        let (mut sender, idle_since, info) = match Box::pin(self.open_h1(endpoint)).await {
            Ok(connection) => connection,
            Err(error) => return Err(error.attempt_error(request)),
        };
        match sender.try_send_request(request).await {
            Ok(response) => {
                let connection = H1Connection::new(&idle_since);
                self.release_h1(endpoint, sender, idle_since, info.clone(), &response);
                Ok((response, info, Some(connection)))
            }
            Err(mut error) => {
                let unsent = error.take_message();
                Err(AttemptError::send_failed(error.into_error(), unsent))
            }
        }
    }

    /// Returns an HTTP/1 connection to the pool; it is reused once its
    /// response body is done. Upgraded connections (`101`) belong to the
    /// caller and are never pooled.
    pub(super) fn release_h1(
        &self,
        endpoint: &Arc<Endpoint>,
        sender: H1Sender,
        idle_since: IdleSince,
        info: ConnInfo,
        response: &Response<Incoming>,
    ) {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return;
        }
        pool::checkin_h1(&self.pool, endpoint, sender, idle_since, info);
    }

    pub(super) async fn open_h1(
        &self,
        endpoint: &Endpoint,
    ) -> Result<(H1Sender, IdleSince, ConnInfo), OpenError> {
        let _pending = self
            .limits
            .pending()
            .ok_or_else(|| OpenError::Overflow(self.overflow(Limit::PendingRequests)))?;
        let (stream, slot, info) = self.open_connection(endpoint).await?;
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| OpenError::Connect(self.handshake_failed(endpoint, &e)))?;
        let idle_since = Arc::new(AtomicU64::new(pool::BUSY));
        pool::spawn_h1_driver(
            conn.with_upgrades(),
            Arc::clone(&idle_since),
            self.idle_timeout,
            slot,
        );
        Ok((sender, idle_since, info))
    }
}
