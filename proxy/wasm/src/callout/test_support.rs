//! Test support for callouts: loopback servers over HTTP/1.1 or h2c, and
//! clusters of one endpoint reached over a fresh hyper connection.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lacewing_core::ProxyError;
use lacewing_core::body::{self, BoxBody, BoxError};
use lacewing_core::callout::{LocalFuture, Upstreams};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::LocalSet;

#[derive(Debug, Clone, Copy)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

/// Clusters of one endpoint each, reached over a fresh hyper client
/// connection per request.
pub(super) struct DirectUpstreams {
    clusters: HashMap<String, (SocketAddr, Protocol)>,
}

impl DirectUpstreams {
    pub(super) fn one(name: &str, addr: SocketAddr, protocol: Protocol) -> Arc<dyn Upstreams> {
        Arc::new(Self {
            clusters: HashMap::from([(name.to_owned(), (addr, protocol))]),
        })
    }
}

fn reset(error: hyper::Error) -> ProxyError {
    ProxyError::UpstreamReset(error.to_string())
}

impl Upstreams for DirectUpstreams {
    fn has_cluster(&self, name: &str) -> bool {
        self.clusters.contains_key(name)
    }

    fn send(
        &self,
        cluster: &str,
        mut request: Request<BoxBody>,
        timeout: Duration,
    ) -> LocalFuture<Result<http::Response<BoxBody>, ProxyError>> {
        let target = self.clusters.get(cluster).copied();
        let cluster = cluster.to_owned();
        Box::pin(async move {
            let (addr, protocol) = target.ok_or(ProxyError::NoHealthyUpstream(cluster))?;
            let exchange = async {
                let tcp = TcpStream::connect(addr)
                    .await
                    .map_err(|error| ProxyError::Connect {
                        endpoint: addr.to_string(),
                        reason: error.to_string(),
                    })?;
                let io = TokioIo::new(tcp);
                let response = match protocol {
                    Protocol::Http1 => {
                        let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
                            .await
                            .map_err(reset)?;
                        tokio::task::spawn_local(connection);
                        sender.send_request(request).await.map_err(reset)?
                    }
                    Protocol::Http2 => {
                        let path = request
                            .uri()
                            .path_and_query()
                            .map_or("/", |p| p.as_str())
                            .to_owned();
                        *request.uri_mut() = format!("http://{addr}{path}").parse().unwrap();
                        let (mut sender, connection) =
                            hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                                .await
                                .map_err(reset)?;
                        tokio::task::spawn_local(connection);
                        sender.send_request(request).await.map_err(reset)?
                    }
                };
                Ok(response.map(|body| body.map_err(BoxError::from).boxed_unsync()))
            };
            tokio::time::timeout(timeout, exchange)
                .await
                .map_err(|_| ProxyError::UpstreamTimeout(timeout))?
        })
    }
}

/// Serves `handler` on a fresh loopback port, over HTTP/1.1 or h2c.
pub(super) async fn serve<F, Fut>(protocol: Protocol, handler: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<BoxBody>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let handler = handler.clone();
            let service = service_fn(move |request| {
                let response = handler(request);
                async move { Ok::<_, Infallible>(response.await) }
            });
            let io = TokioIo::new(tcp);
            tokio::spawn(async move {
                let _ = match protocol {
                    Protocol::Http1 => {
                        hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await
                    }
                    Protocol::Http2 => {
                        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, service)
                            .await
                    }
                };
            });
        }
    });
    addr
}

/// Serves `handler` like [`serve`], as the one endpoint of cluster `name`.
pub(super) async fn serve_cluster<F, Fut>(
    name: &str,
    protocol: Protocol,
    handler: F,
) -> Arc<dyn Upstreams>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = http::Response<BoxBody>> + Send + 'static,
{
    DirectUpstreams::one(name, serve(protocol, handler).await, protocol)
}

/// A handler that never answers.
pub(super) async fn never_answers(_request: Request<Incoming>) -> http::Response<BoxBody> {
    std::future::pending::<()>().await;
    http::Response::new(body::empty())
}

/// A port nothing listens on.
pub(super) async fn closed_port() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    listener.local_addr().unwrap()
}

pub(super) fn pair(name: &str, value: &str) -> (String, Bytes) {
    (name.to_owned(), Bytes::copy_from_slice(value.as_bytes()))
}

pub(super) fn value<'a>(pairs: &'a [(String, Bytes)], name: &str) -> Option<&'a [u8]> {
    pairs
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_ref())
}
pub(super) async fn in_local_set<F: Future>(future: F) -> F::Output {
    LocalSet::new().run_until(future).await
}
