//! A real HTTP server on 127.0.0.1:0 for callout tests: the filter's callouts
//! go through the host's real cluster, pool and network to it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};

/// A request the test upstream received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: http::Method,
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

type Handler = dyn Fn(&Received) -> http::Response<Bytes> + Send + Sync;

/// An HTTP/1.1 server on its own thread, answering with a handler; it stops
/// when dropped with the test process.
pub struct TestUpstream {
    addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
}

impl std::fmt::Debug for TestUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestUpstream")
            .field("addr", &self.addr)
            .finish()
    }
}

impl TestUpstream {
    /// Starts a server answering every request with `handler`.
    pub fn start(
        handler: impl Fn(&Received) -> http::Response<Bytes> + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let handler: Arc<Handler> = Arc::new(handler);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((tcp, _)) = listener.accept().await {
                    let handler = handler.clone();
                    let log = log.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(
                            move |req: http::Request<hyper::body::Incoming>| {
                                let handler = handler.clone();
                                let log = log.clone();
                                async move {
                                    let (parts, body) = req.into_parts();
                                    let body = body
                                        .collect()
                                        .await
                                        .map(|b| b.to_bytes())
                                        .unwrap_or_default();
                                    let got = Received {
                                        method: parts.method,
                                        path: parts.uri.to_string(),
                                        headers: parts.headers,
                                        body,
                                    };
                                    let response = handler(&got);
                                    log.lock().unwrap_or_else(PoisonError::into_inner).push(got);
                                    Ok::<_, Infallible>(response.map(Full::new))
                                }
                            },
                        );
                        let io = hyper_util::rt::TokioIo::new(tcp);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            });
        });
        Ok(Self { addr, received })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request received so far.
    pub fn received(&self) -> Vec<Received> {
        self.received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
