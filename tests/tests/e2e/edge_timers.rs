//! Every wait has a timer, and no client can starve the others, as a client
//! and an upstream see it: a connection that never sends a request head (or
//! trickles the HTTP/2 preface, or only pings) is closed after
//! `header_read_timeout`, as is an HTTP/1.1 connection that sends half of a
//! later request head or trickles it, one that only pings after its requests after
//! `idle_timeout` (even if it ignores the GOAWAY), and any after
//! `max_connection_duration` when set; a body still streaming at
//! `max_stream_duration` is cut; an upstream that stalls its body is cut (flag `UT`)
//! and released; a client that does not read is cut (flag `SI`) and its
//! upstream released; one HTTP/2 client with many zero-window streams gets
//! only its share of a cluster while another client is still served.
//!
//! Timers are set to a few hundred milliseconds so the tests are quick; the
//! waits below only bound a regression, they assert nothing about speed.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lacewing_tests::access_log::LogFile;
use lacewing_tests::client::raw_exchange_with_timeout;
use lacewing_tests::{client, eventually, proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bounds a wait that should end after a sub-second timer, so a regression
/// fails instead of hanging.
pub(crate) const HANG_GUARD: Duration = Duration::from_secs(30);

/// One listener `main` with short timers to cluster `up`, access log to `{log}`.
const CONFIG: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
access_log: { path: '{log}' }
listeners:
  - name: main
    address: 127.0.0.1:0
    limits:
      header_read_timeout: 300ms
      upstream_body_timeout: 300ms
      write_timeout: 300ms
      max_concurrent_streams: 50
      max_upstream_share: 0.5
{more}    routes: [{ name: all, cluster: up }]
clusters:
  - name: up
    endpoints: ['{up}']
    idle_timeout: 200ms
    circuit_breaker: { max_connections: 4, max_pending_requests: 4 }
";

/// Waits for an access-log line with `flag`, and returns it.
pub(crate) async fn flagged(log: &LogFile, flag: &str) -> serde_json::Value {
    log.find(&format!("an access-log line flagged {flag}"), |l| {
        l["flag"] == flag
    })
    .await
}

/// An upstream that counts its connections as they open and close.
pub(crate) struct Upstream {
    pub(crate) addr: SocketAddr,
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl Upstream {
    /// Connections the upstream accepted so far.
    pub(crate) fn opened(&self) -> usize {
        self.opened.load(Ordering::SeqCst)
    }

    /// Connections the upstream saw closed so far.
    pub(crate) fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }

    /// Waits until every connection the upstream accepted has closed.
    pub(crate) async fn all_released(&self) {
        eventually("the upstream's connections are released", || async {
            let opened = self.opened.load(Ordering::SeqCst);
            opened > 0 && self.closed.load(Ordering::SeqCst) == opened
        })
        .await;
    }

    /// Accepts connections, each served by `serve` on this runtime.
    pub(crate) async fn start<F, Fut>(serve: F) -> Self
    where
        F: Fn(TcpStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let opened = Arc::new(AtomicUsize::new(0));
        let closed = Arc::new(AtomicUsize::new(0));
        let (o, c) = (opened.clone(), closed.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                o.fetch_add(1, Ordering::SeqCst);
                let c = c.clone();
                let conn = serve(stream);
                tokio::spawn(async move {
                    conn.await;
                    c.fetch_add(1, Ordering::SeqCst);
                });
            }
        });
        Self {
            addr,
            opened,
            closed,
        }
    }

    /// Sends a response head promising 1 MB, 10 bytes of it, then nothing
    /// until the proxy closes the connection.
    pub(crate) async fn stalling() -> Self {
        Self::start(|mut stream| async move {
            let _ = client::read_head(&mut stream).await;
            let _ = stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\n0123456789")
                .await;
            let mut buf = [0u8; 1024];
            while let Ok(n) = stream.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
        })
        .await
    }

    /// Sends a chunked response head, then a one-byte chunk every 50 ms
    /// until the proxy closes the connection.
    async fn trickling() -> Self {
        Self::start(|mut stream| async move {
            let _ = client::read_head(&mut stream).await;
            let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n";
            if stream.write_all(head).await.is_err() {
                return;
            }
            while stream.write_all(b"1\r\nx\r\n").await.is_ok() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await
    }

    /// Answers every request with `size` bytes (HTTP/1.1, keep-alive).
    pub(crate) async fn large(size: usize) -> Self {
        let body = Bytes::from(vec![b'x'; size]);
        Self::start(move |stream| {
            let body = body.clone();
            async move {
                let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(body)))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            }
        })
        .await
    }
}

fn start(log: &LogFile, up: SocketAddr) -> lacewing_proxy::ProxyHandle {
    start_with(log, up, "")
}

/// [`start`] with more listener limits, each line indented by six spaces.
fn start_with(log: &LogFile, up: SocketAddr, more: &str) -> lacewing_proxy::ProxyHandle {
    proxy::start(&proxy::fill(
        CONFIG,
        &[("log", &log.path().display()), ("up", &up), ("more", &more)],
    ))
}

/// Reads until the peer closes; `false` if it has not within [`HANG_GUARD`].
pub(crate) async fn closed_by_peer(read: &mut (impl AsyncReadExt + Unpin)) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(HANG_GUARD, async {
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

/// Pings every 50 ms until the connection breaks.
fn ping_forever(write: tokio::net::tcp::OwnedWriteHalf) -> tokio::task::JoinHandle<()> {
    write_until_broken(
        write,
        Vec::new(),
        frame(0x6, &[7; 8]),
        Duration::from_millis(50),
    )
}

/// Writes `first`, then `each` every `every` until the connection breaks.
pub(crate) fn write_until_broken(
    mut write: tokio::net::tcp::OwnedWriteHalf,
    first: Vec<u8>,
    each: Vec<u8>,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if write.write_all(&first).await.is_err() {
            return;
        }
        while write.write_all(&each).await.is_ok() {
            tokio::time::sleep(every).await;
        }
    })
}

#[tokio::test]
async fn a_connection_that_sends_no_request_head_is_closed_after_header_read_timeout() {
    let log = LogFile::new("edge-timers-silent");
    let up = Upstream::large(10).await;
    let handle = start(&log, up.addr);
    let addr = proxy::listener_addr(&handle, "main");
    // Nothing at all, half an HTTP/1.1 head, and a trickled HTTP/2 preface:
    // each is closed by the proxy, though `idle_timeout` is 300 s.
    for (what, bytes) in [
        ("nothing", &b""[..]),
        ("a partial HTTP/1.1 head", b"GET / HTTP/1.1\r\nHost: a\r\n"),
        ("a partial HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n"),
    ] {
        let exchange = raw_exchange_with_timeout(addr, bytes, HANG_GUARD).await;
        assert!(exchange.closed, "{what}: the proxy closes the connection");
        assert_eq!(exchange.status(), None, "{what}: {:?}", exchange.text());
    }
    // A client that sends its request in time is served.
    let response = client::get(&proxy::url(&handle, "main", "/")).await;
    assert_eq!(response.status, StatusCode::OK);
}

#[tokio::test]
async fn an_http1_head_after_the_first_that_stalls_or_trickles_is_cut() {
    let log = LogFile::new("edge-timers-later-head");
    let up = Upstream::large(10).await;
    let handle = start(&log, up.addr);
    let addr = proxy::listener_addr(&handle, "main");
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    for (n, trickle) in [(1, false), (2, true)] {
        let (mut read, mut write) = TcpStream::connect(addr).await.unwrap().into_split();
        // A first request, answered: the first-head look is done with.
        write.write_all(request).await.unwrap();
        eventually("the first request is answered", || async {
            log.lines().iter().filter(|l| l["status"] == 200).count() == n
        })
        .await;
        // Then half a head, left there or trickled a byte every 50 ms;
        // `idle_timeout` is 300 s, so only the head timer can close it.
        let half = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        let writer = if trickle {
            write_until_broken(write, half, b"x".to_vec(), Duration::from_millis(50))
        } else {
            write.write_all(&half).await.unwrap();
            tokio::spawn(async move {
                tokio::time::sleep(HANG_GUARD).await;
                drop(write);
            })
        };
        let closed = closed_by_peer(&mut read).await;
        writer.abort();
        assert!(
            closed,
            "trickled: {trickle}: the proxy closes the connection"
        );
    }
    let response = client::get(&proxy::url(&handle, "main", "/")).await;
    assert_eq!(response.status, StatusCode::OK);
}

/// An HTTP/2 frame on stream 0 with no flags.
pub(crate) fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    stream_frame(kind, 0, 0, payload)
}

/// An HTTP/2 frame: its 9-byte header (length, type, flags, stream), then `payload`.
pub(crate) fn stream_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = len.to_be_bytes()[1..].to_vec();
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A raw connection to listener `main` that has sent the HTTP/2 preface and
/// an empty SETTINGS frame.
pub(crate) async fn h2_connect(handle: &lacewing_proxy::ProxyHandle) -> TcpStream {
    let mut stream = TcpStream::connect(proxy::listener_addr(handle, "main"))
        .await
        .unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    stream.write_all(&frame(0x4, &[])).await.unwrap();
    stream
}

#[tokio::test]
async fn an_h2_client_that_only_pings_is_closed_after_header_read_timeout() {
    let log = LogFile::new("edge-timers-pings");
    let up = Upstream::large(10).await;
    let handle = start(&log, up.addr);
    let mut stream = h2_connect(&handle).await;
    // The server's SETTINGS come first and carry `max_concurrent_streams`.
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(head[3], 0x4, "a SETTINGS frame");
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut settings = vec![0u8; len];
    stream.read_exact(&mut settings).await.unwrap();
    let max_streams = settings
        .chunks(6)
        .find(|s| s[..2] == [0, 3])
        .map(|s| u32::from_be_bytes([s[2], s[3], s[4], s[5]]));
    assert_eq!(max_streams, Some(50), "SETTINGS_MAX_CONCURRENT_STREAMS");

    // Ping every 50 ms, never open a stream: the proxy closes the connection.
    let (mut read, write) = stream.into_split();
    let pinger = ping_forever(write);
    let closed = closed_by_peer(&mut read).await;
    pinger.abort();
    assert!(closed, "the pinging connection is closed");
}

/// HEADERS on `stream`, END_STREAM | END_HEADERS: GET http://a/ in HPACK
/// (indexed :method GET, :scheme http, :path /; literal :authority a).
pub(crate) fn get_on_stream(stream: u32) -> Vec<u8> {
    let block = [0x82, 0x86, 0x84, 0x41, 0x01, b'a'];
    stream_frame(0x1, 0x5, stream, &block)
}

#[tokio::test]
async fn an_h2_client_that_only_pings_after_its_request_is_closed_when_idle() {
    let log = LogFile::new("edge-timers-pings-after");
    let up = Upstream::large(10).await;
    let handle = start_with(&log, up.addr, "      idle_timeout: 300ms\n");
    let (mut read, mut write) = h2_connect(&handle).await.into_split();
    write.write_all(&get_on_stream(1)).await.unwrap();
    eventually("the request is answered", || async {
        log.lines().iter().any(|l| l["status"] == 200)
    })
    .await;
    // Then only pings: bytes move, but no exchange does.
    let pinger = ping_forever(write);
    let closed = closed_by_peer(&mut read).await;
    pinger.abort();
    assert!(closed, "the connection that only pings is closed");
}

#[tokio::test]
async fn max_connection_duration_closes_a_connection_after_its_response() {
    let log = LogFile::new("edge-timers-age");
    let up = Upstream::large(10).await;
    let handle = start_with(&log, up.addr, "      max_connection_duration: 300ms\n");
    let mut stream = TcpStream::connect(proxy::listener_addr(&handle, "main"))
        .await
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let head = client::read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // A keep-alive connection, closed by the proxy once old enough.
    assert!(
        closed_by_peer(&mut stream).await,
        "the old connection is closed"
    );
}

/// GETs `url` (over h2 when `h2`): the head says 200, then the body fails
/// (a truncated HTTP/1.1 body, a reset h2 stream), never completes.
pub(crate) async fn get_cut(url: &str, h2: bool) {
    let request = Request::get(url).body(Empty::<Bytes>::new()).unwrap();
    let response = if h2 {
        client::send_streaming_h2(request).await
    } else {
        client::send_streaming(request).await
    };
    assert_eq!(response.status(), StatusCode::OK);
    let body = tokio::time::timeout(HANG_GUARD, response.into_body().collect())
        .await
        .expect("the body ends");
    assert!(
        body.is_err(),
        "a cut body is an error, not a complete response"
    );
}

#[tokio::test]
async fn an_upstream_body_that_stalls_is_cut_flagged_and_released() {
    let log = LogFile::new("edge-timers-stall");
    let up = Upstream::stalling().await;
    let handle = start(&log, up.addr);

    // HTTP/1.1: the head and the first bytes arrive, then the body fails.
    let url = proxy::url(&handle, "main", "/stall");
    get_cut(&url, false).await;
    let line = flagged(&log, "UT").await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["path"], "/stall");
    up.all_released().await;

    // h2: the stream is reset.
    get_cut(&url, true).await;
    eventually("two UT lines", || async {
        log.lines().iter().filter(|l| l["flag"] == "UT").count() == 2
    })
    .await;
    up.all_released().await;
}

#[tokio::test]
async fn max_stream_duration_cuts_a_body_that_keeps_trickling() {
    let log = LogFile::new("edge-timers-trickle");
    let up = Upstream::trickling().await;
    // The body never stalls for `upstream_body_timeout`, but it never ends.
    let handle = start_with(&log, up.addr, "      max_stream_duration: 500ms\n");
    get_cut(&proxy::url(&handle, "main", "/trickle"), false).await;
    let line = flagged(&log, "UT").await;
    assert_eq!(line["path"], "/trickle");
    up.all_released().await;
}

#[tokio::test]
async fn a_client_that_does_not_read_is_cut_and_its_upstream_released() {
    let log = LogFile::new("edge-timers-noread");
    // Far more than loopback socket buffers hold.
    let size = 64 << 20;
    let up = Upstream::large(size).await;
    let handle = start(&log, up.addr);
    let mut stream = TcpStream::connect(proxy::listener_addr(&handle, "main"))
        .await
        .unwrap();
    stream
        .write_all(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let head = client::read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    // Read nothing more until the proxy has given up on this client.
    let line = flagged(&log, "SI").await;
    assert_eq!(line["status"], 200);
    assert_eq!(line["path"], "/big");
    up.all_released().await;
    // What the client finds then: a connection closed before the body's end.
    let mut received = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    tokio::time::timeout(HANG_GUARD, async {
        while let Ok(n) = stream.read(&mut buf).await {
            if n == 0 {
                break;
            }
            received += n;
        }
    })
    .await
    .expect("the connection is closed");
    assert!(received < size, "{received} of {size} bytes: truncated");
}

#[tokio::test]
async fn many_zero_window_streams_leave_the_cluster_to_other_clients() {
    let log = LogFile::new("edge-timers-fair");
    let up = Upstream::large(1 << 20).await;
    let handle = start(&log, up.addr);
    let url = proxy::url(&handle, "main", "/big");

    // One h2 client opens 20 streams for 1 MB responses and never opens a
    // flow-control window: the cluster has 4 connections, this client may
    // hold half of them.
    let stream = TcpStream::connect(proxy::listener_addr(&handle, "main"))
        .await
        .unwrap();
    let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(0)
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    tokio::spawn(connection);
    let mut pending = Vec::new();
    for _ in 0..20 {
        let mut sender = sender.clone();
        let request = Request::get(&url).body(Empty::<Bytes>::new()).unwrap();
        pending.push(tokio::spawn(
            async move { sender.send_request(request).await },
        ));
    }
    let mut held = Vec::new();
    let mut refused = 0;
    for response in pending {
        let response = tokio::time::timeout(HANG_GUARD, response)
            .await
            .expect("every stream gets a head")
            .unwrap()
            .expect("a response");
        match response.status() {
            // Kept unread: its body waits on a window that never opens.
            StatusCode::OK => held.push(response),
            StatusCode::SERVICE_UNAVAILABLE => refused += 1,
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(held.len(), 2, "half of the 4 connections");
    assert_eq!(refused, 18);
    let line = flagged(&log, "UO").await;
    assert_eq!(line["status"], 503);
    let metrics = client::metrics(proxy::admin_addr(&handle)).await;
    let share_overflows = client::metric_sum(
        &metrics,
        "lacewing_upstream_overflows_total",
        &[("cluster", "up"), ("limit", "max_upstream_share")],
    );
    assert_eq!(share_overflows, Some(18.0), "{metrics}");

    // Another client is still served, body and all.
    let response = client::get(&url).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.body.len(), 1 << 20);

    // And the stalled client is cut by the write timer, its upstreams released.
    let line = flagged(&log, "SI").await;
    assert_eq!(line["status"], 200);
    up.all_released().await;
    drop(held);
}
