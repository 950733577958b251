//! Upstream servers for tests: an HTTP echo server (HTTP/1.1 and h2c), a gRPC
//! echo server, a raw TCP echo server and an upstream writing exact bytes, each on its own thread and port.
//!
//! Each server runs on a dedicated thread with its own runtime, so a test that
//! blocks its own thread (joining a proxy, say) never stalls its upstreams.

use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdTcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::body::GeneratedBody;

/// The error type of the echo server's response bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response header naming which server answered.
pub const UPSTREAM_HEADER: &str = "x-upstream";

/// A running upstream server; dropping it stops the server and closes its port.
#[derive(Debug)]
pub struct TestServer {
    /// Where it listens (127.0.0.1 and a free port).
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestServer {
    /// TCP connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// HTTP requests (or gRPC calls) received so far, counted when their head arrives.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// `http://<addr>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A loopback address with nothing listening on it: connections to it are
/// refused. The port stays bound (without listening) for the rest of the
/// test process, so a server another test starts cannot take it; a port
/// bound and released at once was sometimes taken by one.
pub fn dead_addr() -> SocketAddr {
    let socket = tokio::net::TcpSocket::new_v4().expect("create a TCP socket");
    socket
        .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind a loopback port");
    let addr = socket.local_addr().expect("bound socket has an address");
    std::mem::forget(socket);
    addr
}

/// Binds 127.0.0.1:0 and runs `handle` for every accepted connection on a new thread.
///
/// `handle` gets the stream and the server's request counter.
fn spawn_server<H, Fut>(name: &str, handle: H) -> TestServer
where
    H: Fn(TcpStream, Arc<AtomicUsize>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let std_listener = StdTcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
    std_listener
        .set_nonblocking(true)
        .expect("set listener non-blocking");
    let addr = std_listener
        .local_addr()
        .expect("bound listener has an address");
    let accepted = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(AtomicUsize::new(0));
    let request_counter = requests.clone();
    let (stop, stopped) = oneshot::channel::<()>();
    let counter = accepted.clone();
    let thread = std::thread::Builder::new()
        .name(format!("test-{name}-{}", addr.port()))
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("build a test server runtime");
            runtime.block_on(async move {
                let listener = TcpListener::from_std(std_listener).expect("adopt listener");
                let accept_loop = async {
                    loop {
                        let Ok((stream, _)) = listener.accept().await else {
                            // Out of descriptors or similar: back off instead of spinning.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                            continue;
                        };
                        counter.fetch_add(1, Ordering::SeqCst);
                        let _ = stream.set_nodelay(true);
                        tokio::spawn(handle(stream, request_counter.clone()));
                    }
                };
                tokio::select! {
                    _ = stopped => {}
                    () = accept_loop => {}
                }
            });
            // Dropping the runtime here cancels every connection task and closes the sockets.
        })
        .expect("spawn a test server thread");
    TestServer {
        addr,
        accepted,
        requests,
        stop: Some(stop),
        thread: Some(thread),
    }
}

/// An upstream that answers each request head it reads with exactly `reply`
/// (malformed framing included), then closes the connection.
pub fn raw_http(reply: &[u8]) -> TestServer {
    let reply: Arc<[u8]> = Arc::from(reply);
    spawn_server("raw-http", move |mut stream, requests| {
        let reply = reply.clone();
        async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            requests.fetch_add(1, Ordering::SeqCst);
            let _ = stream.write_all(&reply).await;
            let _ = stream.shutdown().await;
        }
    })
}

/// An HTTP echo server named `echo`; see [`http_echo_named`].
pub async fn http_echo() -> TestServer {
    http_echo_named("echo").await
}

/// An HTTP/1.1 + h2c echo server whose responses carry `x-upstream: <id>`.
///
/// - any path: 200 with JSON `{"method","path","query","version","authority","headers","body_len"}`;
///   `headers` maps each name to its values joined by `", "`; the body is read fully and only counted.
/// - `/status/{code}`: that status.
/// - `/delay/{ms}`: waits, then answers like any path.
/// - `/bytes/{n}`: streams `n` bytes in 64 KiB chunks.
/// - `/trailers`: a body followed by the trailer `x-trailer: yes`.
/// - `/ws`: accepts `Upgrade: websocket` with 101, then echoes raw bytes.
pub async fn http_echo_named(id: &str) -> TestServer {
    let id: Arc<str> = Arc::from(id);
    spawn_server("http-echo", move |stream, requests| {
        let id = id.clone();
        async move {
            let service = service_fn(move |req| {
                let id = id.clone();
                requests.fetch_add(1, Ordering::SeqCst);
                async move { Ok::<_, Infallible>(echo(&id, req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(stream), service)
                .await;
        }
    })
}

type EchoBody = BoxBody<Bytes, BoxError>;

fn full(body: impl Into<Bytes>) -> EchoBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

async fn echo(id: &str, mut req: Request<Incoming>) -> Response<EchoBody> {
    let path = req.uri().path().to_string();
    let mut segments = path.trim_start_matches('/').splitn(2, '/');
    let first = segments.next().unwrap_or("");
    let arg = segments.next().unwrap_or("");

    let mut response = match first {
        "ws" if is_websocket_upgrade(req.headers()) => websocket(&mut req),
        "bytes" => match arg.parse::<u64>() {
            Ok(n) => {
                drain_body(req.into_body()).await;
                Response::new(
                    GeneratedBody::sized(n)
                        .map_err(|never| match never {})
                        .boxed(),
                )
            }
            Err(_) => plain(StatusCode::BAD_REQUEST, "bad byte count"),
        },
        "status" => match arg
            .parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
        {
            Some(status) => {
                drain_body(req.into_body()).await;
                plain(status, format!("status {}", status.as_u16()))
            }
            None => plain(StatusCode::BAD_REQUEST, "bad status"),
        },
        "trailers" => {
            drain_body(req.into_body()).await;
            let mut trailers = HeaderMap::new();
            trailers.insert("x-trailer", HeaderValue::from_static("yes"));
            let frames = vec![
                Ok::<_, BoxError>(Frame::data(Bytes::from_static(b"body before trailers"))),
                Ok(Frame::trailers(trailers)),
            ];
            Response::new(BodyExt::boxed(StreamBody::new(futures_util::stream::iter(
                frames,
            ))))
        }
        "delay" => match arg.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                echo_json(req).await
            }
            Err(_) => plain(StatusCode::BAD_REQUEST, "bad delay"),
        },
        _ => echo_json(req).await,
    };
    if let Ok(value) = HeaderValue::from_str(id) {
        response.headers_mut().insert(UPSTREAM_HEADER, value);
    }
    response
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response<EchoBody> {
    let mut response = Response::new(full(text.into()));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain"),
    );
    response
}

/// Reads a body to its end, counting bytes without keeping them.
async fn drain_body(mut body: Incoming) -> u64 {
    let mut len = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    len += data.len() as u64;
                }
            }
            Err(_) => break,
        }
    }
    len
}

async fn echo_json(req: Request<Incoming>) -> Response<EchoBody> {
    let (parts, body) = req.into_parts();
    let mut headers = serde_json::Map::new();
    for name in parts.headers.keys() {
        let values: Vec<String> = parts
            .headers
            .get_all(name)
            .iter()
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .collect();
        headers.insert(name.as_str().to_string(), values.join(", ").into());
    }
    let authority = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| {
            parts
                .headers
                .get(http::header::HOST)
                .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        })
        .unwrap_or_default();
    let body_len = drain_body(body).await;
    let json = serde_json::json!({
        "method": parts.method.as_str(),
        "path": parts.uri.path(),
        "query": parts.uri.query().unwrap_or(""),
        "version": format!("{:?}", parts.version),
        "authority": authority,
        "headers": headers,
        "body_len": body_len,
    });
    let mut response = Response::new(full(json.to_string()));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

fn is_websocket_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"))
}

/// Answers 101 and, once the connection is upgraded, echoes every byte back.
fn websocket(req: &mut Request<Incoming>) -> Response<EchoBody> {
    let upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut io = TokioIo::new(upgraded);
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if io.write_all(&buf[..n]).await.is_err() || io.flush().await.is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut response = Response::new(full(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(
        http::header::CONNECTION,
        HeaderValue::from_static("upgrade"),
    );
    headers.insert(http::header::UPGRADE, HeaderValue::from_static("websocket"));
    response
}

/// A gRPC echo server (HTTP/2 only); see [`crate::grpc`] for its methods.
pub async fn grpc_echo() -> TestServer {
    grpc_echo_named("grpc").await
}

/// [`grpc_echo`] whose responses carry `x-upstream: <id>`.
pub async fn grpc_echo_named(id: &str) -> TestServer {
    let id: Arc<str> = Arc::from(id);
    spawn_server("grpc-echo", move |stream, requests| {
        let id = id.clone();
        async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let id = id.clone();
                requests.fetch_add(1, Ordering::SeqCst);
                async move {
                    let mut response = crate::grpc::serve(req).await;
                    if let Ok(value) = HeaderValue::from_str(&id) {
                        response.headers_mut().insert(UPSTREAM_HEADER, value);
                    }
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        }
    })
}

/// A raw TCP server that writes back every byte it reads.
pub async fn tcp_echo() -> TestServer {
    spawn_server("tcp-echo", |mut stream, _requests| async move {
        let (mut reader, mut writer) = stream.split();
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
        let _ = writer.shutdown().await;
    })
}
