//! Connecting to an endpoint: the one place a connection to an upstream is
//! made (under the connection limit, within the connect timeout). A cluster
//! with TLS wraps the stream here (the handshake has its own connect timeout).

use std::sync::Arc;

use lacewing_core::ProxyError;
use lacewing_core::stream::UpstreamConnection;
use tokio::net::TcpStream;

use super::Cluster;
use super::attempt::OpenError;
use crate::breaker::{ConnectionSlot, Limit};
use crate::endpoint::Endpoint;
use crate::tls::Conn;

impl Cluster {
    /// Reserves a connection under `max_connections` and connects.
    pub(super) async fn open_connection(
        &self,
        endpoint: &Endpoint,
    ) -> Result<(Conn, ConnectionSlot, Arc<UpstreamConnection>), OpenError> {
        let mut slot = self
            .connections
            .reserve()
            .ok_or_else(|| OpenError::Overflow(self.overflow(Limit::Connections)))?;
        let stream = self.connect(endpoint).await.map_err(OpenError::Connect)?;
        let (conn, info) = self
            .secure(stream, endpoint, false)
            .await
            .map_err(OpenError::Connect)?;
        slot.established();
        Ok((conn, slot, info))
    }

    /// Wraps a connected `stream` in the cluster's TLS, if it has any: the
    /// handshake within the connect timeout, offering the protocol's ALPN or
    /// (`raw`, a byte stream) none. Returns the stream and the connection's
    /// facts for plugins.
    pub(super) async fn secure(
        &self,
        stream: TcpStream,
        endpoint: &Endpoint,
        raw: bool,
    ) -> Result<(Conn, Arc<UpstreamConnection>), ProxyError> {
        let local_address = stream.local_addr().ok();
        let Some(tls) = &self.tls else {
            let info = UpstreamConnection {
                local_address,
                tls: None,
            };
            return Ok((Conn::Plain(stream), Arc::new(info)));
        };
        let handshake = tls.handshake(stream, raw);
        let result = if self.connect_timeout.is_zero() {
            handshake.await
        } else {
            tokio::time::timeout(self.connect_timeout, handshake)
                .await
                .unwrap_or_else(|_| {
                    Err(format!(
                        "TLS handshake timed out after {:?}",
                        self.connect_timeout
                    ))
                })
        };
        let (conn, facts) = result.map_err(|reason| {
            self.metrics.connect_failures.inc();
            tracing::debug!(cluster = %self.name, endpoint = %endpoint.addr, %reason, "upstream TLS failed");
            ProxyError::Connect {
                endpoint: endpoint.addr.to_string(),
                reason,
            }
        })?;
        let info = UpstreamConnection {
            local_address,
            tls: Some(Box::new(facts)),
        };
        Ok((conn, Arc::new(info)))
    }

    /// One TCP connect within the connect timeout, with TCP_NODELAY.
    pub(super) async fn connect(&self, endpoint: &Endpoint) -> Result<TcpStream, ProxyError> {
        let addr = endpoint.addr;
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

    pub(super) fn handshake_failed(&self, endpoint: &Endpoint, error: &hyper::Error) -> ProxyError {
        self.metrics.connect_failures.inc();
        ProxyError::Connect {
            endpoint: endpoint.addr.to_string(),
            reason: format!("handshake: {error}"),
        }
    }
}

pub(super) fn nodelay(stream: TcpStream) -> TcpStream {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!(%error, "TCP_NODELAY not set on upstream socket");
    }
    stream
}
