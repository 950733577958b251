//! A real HTTP server on 127.0.0.1:0 for callout tests: the filter's callouts
//! go through the host's real cluster, pool and network to it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::BodyExt;

/// A request the test upstream received.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: http::Method,
    /// Path and query, as sent.
    pub path: String,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

type Handler = dyn Fn(&Received) -> http::Response<Bytes> + Send + Sync;
type GrpcHandler = dyn Fn(&[u8]) -> (u32, Bytes) + Send + Sync;

/// A response body: data, then optional trailers.
type ReplyBody = http_body_util::StreamBody<
    futures_util::stream::Iter<std::vec::IntoIter<Result<hyper::body::Frame<Bytes>, Infallible>>>,
>;

fn reply_body(data: Bytes, trailers: Option<http::HeaderMap>) -> ReplyBody {
    let mut frames = vec![Ok(hyper::body::Frame::data(data))];
    if let Some(t) = trailers {
        frames.push(Ok(hyper::body::Frame::trailers(t)));
    }
    http_body_util::StreamBody::new(futures_util::stream::iter(frames))
}

/// What the server speaks.
#[derive(Clone)]
enum Serve {
    Http1(Arc<Handler>),
    Grpc(Arc<GrpcHandler>),
}

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
        Self::serve(Serve::Http1(Arc::new(handler)))
    }

    /// Starts a gRPC server (HTTP/2 without TLS) answering every unary call
    /// with `handler(request message) -> (grpc-status, response message)`.
    /// Register it with [`crate::Builder::grpc_cluster`].
    pub fn start_grpc(
        handler: impl Fn(&[u8]) -> (u32, Bytes) + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        Self::serve(Serve::Grpc(Arc::new(handler)))
    }

    fn serve(serve: Serve) -> std::io::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let received = Arc::new(Mutex::new(Vec::new()));
        let log = received.clone();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::spawn(move || {
            rt.block_on(async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((tcp, _)) = listener.accept().await {
                    let serve = serve.clone();
                    let log = log.clone();
                    tokio::spawn(async move {
                        let h2 = matches!(serve, Serve::Grpc(_));
                        let service = hyper::service::service_fn(
                            move |req: http::Request<hyper::body::Incoming>| {
                                let serve = serve.clone();
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
                                        path: parts
                                            .uri
                                            .path_and_query()
                                            .map_or_else(|| "/".into(), ToString::to_string),
                                        headers: parts.headers,
                                        body,
                                    };
                                    let response = match &serve {
                                        Serve::Http1(handler) => {
                                            handler(&got).map(|b| reply_body(b, None))
                                        }
                                        Serve::Grpc(handler) => {
                                            grpc_reply(handler.as_ref(), &got.body)
                                        }
                                    };
                                    log.lock().unwrap_or_else(PoisonError::into_inner).push(got);
                                    Ok::<_, Infallible>(response)
                                }
                            },
                        );
                        let io = hyper_util::rt::TokioIo::new(tcp);
                        let _ = if h2 {
                            hyper::server::conn::http2::Builder::new(
                                hyper_util::rt::TokioExecutor::new(),
                            )
                            .serve_connection(io, service)
                            .await
                        } else {
                            hyper::server::conn::http1::Builder::new()
                                .serve_connection(io, service)
                                .await
                        };
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

/// A unary gRPC answer: the length-prefixed message, then `grpc-status` trailers.
fn grpc_reply(handler: &GrpcHandler, framed: &[u8]) -> http::Response<ReplyBody> {
    let message = framed.get(5..).unwrap_or_default();
    let (status, reply) = handler(message);
    let mut data = Vec::with_capacity(5 + reply.len());
    data.push(0);
    data.extend_from_slice(&u32::try_from(reply.len()).unwrap_or(u32::MAX).to_be_bytes());
    data.extend_from_slice(&reply);
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from(status));
    let mut response = http::Response::new(reply_body(Bytes::from(data), Some(trailers)));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    response
}
