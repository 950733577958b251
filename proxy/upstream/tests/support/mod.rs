//! Real upstream servers on 127.0.0.1:0 and small builders for cluster tests.

#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lacewing_config::units::Dur;
use lacewing_config::{
    CircuitBreaker, ClusterConfig, LbPolicy, OutlierDetection, RetryBudget, UpstreamProtocol,
};
use lacewing_upstream::{Cluster, RequestPolicy, Upstreams};
use tokio::net::TcpListener;

pub type Reply = Response<Full<Bytes>>;
type Handler =
    Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// A running test upstream; counts accepted connections and requests.
pub struct Server {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicUsize>,
    pub requests: Arc<AtomicUsize>,
    pub closed: Arc<AtomicUsize>,
}

impl Server {
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }
    /// Connections that have ended, as the server saw them.
    pub fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// An HTTP/1.1 server (with upgrades) answering with `handler`.
pub async fn http1<F, Fut>(handler: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    serve(false, Arc::new(move |r| Box::pin(handler(r)))).await
}

/// An HTTP/2 prior-knowledge server answering with `handler`.
pub async fn h2<F, Fut>(handler: F) -> Server
where
    F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send + 'static,
{
    serve(true, Arc::new(move |r| Box::pin(handler(r)))).await
}

async fn serve(h2: bool, handler: Handler) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (acc, reqs, done) = (accepted.clone(), requests.clone(), closed.clone());
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            acc.fetch_add(1, Ordering::SeqCst);
            let handler = handler.clone();
            let reqs = reqs.clone();
            let service = service_fn(move |request| {
                reqs.fetch_add(1, Ordering::SeqCst);
                let reply = handler(request);
                async move { Ok::<_, Infallible>(reply.await) }
            });
            let io = TokioIo::new(stream);
            let done = done.clone();
            tokio::spawn(async move {
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, service)
                        .with_upgrades()
                        .await;
                }
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    Server {
        addr,
        accepted,
        requests,
        closed,
    }
}

/// A reply with a status and a body.
pub fn reply(status: u16, body: &'static str) -> Reply {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap();
    response
}

/// An address where nothing listens (bound, then closed).
pub fn dead_addr() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap()
}

/// A cluster config over `endpoints` with defaults suited to tests.
pub fn config(name: &str, endpoints: &[SocketAddr]) -> ClusterConfig {
    ClusterConfig {
        name: name.into(),
        endpoints: endpoints.iter().map(ToString::to_string).collect(),
        protocol: UpstreamProtocol::Http1,
        lb: LbPolicy::RoundRobin,
        connect_timeout: Dur(Duration::from_secs(2)),
        idle_timeout: Dur(Duration::from_secs(60)),
        circuit_breaker: CircuitBreaker::default(),
        retry_budget: RetryBudget::default(),
        outlier_detection: OutlierDetection::default(),
        tls: None,
    }
}

/// Builds one cluster from `config`, with its metrics.
pub fn build(config: ClusterConfig) -> (Arc<Cluster>, lacewing_core::metrics::Metrics) {
    let metrics = lacewing_core::metrics::Metrics::new();
    let name = config.name.clone();
    let upstreams = Upstreams::new(&[config], &metrics).unwrap();
    (upstreams.cluster(&name).unwrap().clone(), metrics)
}

/// A policy with a generous timeout and `retries` extra attempts on connect failure and 503.
pub fn policy(retries: u32) -> RequestPolicy {
    RequestPolicy {
        timeout: Duration::from_secs(10),
        retry_attempts: retries,
        retry_on_status: vec![503],
        retry_on_connect_failure: true,
    }
}

/// A GET with an origin-form URI.
pub fn get(path: &str) -> Request<lacewing_core::body::BoxBody> {
    Request::builder()
        .uri(path)
        .header("host", "backend.test")
        .body(lacewing_core::body::empty())
        .unwrap()
}

/// The whole body of a response.
pub async fn body_text(response: Response<Incoming>) -> String {
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(bytes.to_vec()).unwrap()
}

/// Polls `condition` until it holds, for at most ~10 s.
pub async fn eventually(what: &str, mut condition: impl FnMut() -> bool) {
    for _ in 0..500 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("never happened: {what}");
}
