//! Upstream framing and header amplification at the edge, as a client sees
//! them: a response the upstream framed wrongly (both `Content-Length` and
//! `Transfer-Encoding`, a body shorter or longer than its length, a chunked
//! body cut before its last chunk) never reaches the client as a complete
//! one, and
//! the access log and metrics flag it `UPE`; an h2 header block that HPACK
//! inflates past `max_request_headers` is refused before any upstream sees it.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lacewing_tests::client::{self, RawExchange, raw_exchange};
use lacewing_tests::{eventually, proxy, servers};
use tokio::net::TcpStream;

const CONFIG: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
access_log: { path: '{log}' }
listeners:
  - name: main
    address: 127.0.0.1:0
    routes: [{ name: all, cluster: upstream }]
clusters:
  - { name: upstream, endpoints: ['{upstream}'] }
";

/// A proxy in front of one upstream, with its access log in a file removed at the end.
struct Edge {
    handle: lacewing_proxy::ProxyHandle,
    log: PathBuf,
    upstream: servers::TestServer,
}

impl Edge {
    fn new(name: &str, upstream: servers::TestServer) -> Self {
        let log = std::env::temp_dir().join(format!(
            "lacewing-edge-framing-{name}-{}.log",
            std::process::id()
        ));
        let _ = std::fs::remove_file(&log);
        let handle = proxy::start(&proxy::fill(
            CONFIG,
            &[("log", &log.display()), ("upstream", &upstream.addr)],
        ));
        Self {
            handle,
            log,
            upstream,
        }
    }

    fn addr(&self) -> SocketAddr {
        proxy::listener_addr(&self.handle, "main")
    }

    /// One HTTP/1.1 request on a raw socket; `keep_alive` leaves the
    /// connection open, so a close is the proxy's doing.
    async fn raw_get(&self, keep_alive: bool) -> RawExchange {
        let connection = if keep_alive { "keep-alive" } else { "close" };
        let head = format!(
            "GET /framed HTTP/1.1\r\nHost: edge.example\r\nConnection: {connection}\r\n\r\n"
        );
        raw_exchange(self.addr(), head.as_bytes()).await
    }

    /// One h2 request: its status, and its body or the error that ended it.
    async fn h2_get(&self) -> (StatusCode, Result<Bytes, hyper::Error>) {
        let stream = TcpStream::connect(self.addr()).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tokio::spawn(connection);
        let request = Request::get("http://edge.example/framed")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.expect("h2 response");
        let status = response.status();
        let body = response.into_body().collect().await.map(|b| b.to_bytes());
        (status, body)
    }

    /// The access log lines written so far.
    fn lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("each line is JSON"))
            .collect()
    }

    /// Waits for `count` access log lines and returns them.
    async fn logged(&self, count: usize) -> Vec<serde_json::Value> {
        eventually(&format!("{count} access log lines"), || async {
            self.lines().len() >= count
        })
        .await;
        self.lines()
    }

    /// `lacewing_http_local_replies_total` of the listener for `flag`.
    async fn flagged(&self, flag: &str) -> f64 {
        let text = client::metrics(proxy::admin_addr(&self.handle)).await;
        client::metric_sum(
            &text,
            "lacewing_http_local_replies_total",
            &[("listener", "main"), ("flag", flag)],
        )
        .unwrap_or(0.0)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.log);
    }
}

/// The error that ended an h2 body is the peer's reset of the stream.
fn is_stream_reset(error: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.is_reset() && h2.is_remote();
        }
        source = e.source();
    }
    false
}

#[tokio::test]
async fn upstream_content_length_with_transfer_encoding_is_refused() {
    // The length says 5, the chunks carry 11 bytes: forwarding the length
    // would hand the client a response split in two.
    let edge = Edge::new(
        "cl-te",
        servers::raw_http(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n\
              b\r\nhello world\r\n0\r\n\r\n",
        ),
    );
    let exchange = edge.raw_get(false).await;
    let response = exchange
        .response()
        .unwrap_or_else(|| panic!("no response: {:?}", exchange.text()));
    assert_eq!(response.status, 502, "{}", exchange.text());
    assert!(
        !exchange.text().contains("hello"),
        "the body is not forwarded: {}",
        exchange.text()
    );

    let (status, _) = edge.h2_get().await;
    assert_eq!(status, StatusCode::BAD_GATEWAY);

    let lines = edge.logged(2).await;
    for line in &lines {
        assert_eq!(line["status"], 502, "{line}");
        assert_eq!(line["flag"], "UPE", "{line}");
    }
    assert_eq!(edge.flagged("UPE").await, 2.0);
    assert_eq!(edge.upstream.requests(), 2);
}

/// A 200 whose body the upstream cut short: the HTTP/1.1 client (keeping
/// its connection alive) sees the connection closed mid-body, the h2 client a
/// reset stream, and both exchanges are logged and counted `UPE`. Returns
/// what the HTTP/1.1 client received.
async fn assert_cut_short(edge: &Edge) -> (RawExchange, client::RawResponse) {
    let exchange = edge.raw_get(true).await;
    let response = exchange
        .response()
        .unwrap_or_else(|| panic!("no response: {:?}", exchange.text()));
    assert_eq!(response.status, 200, "{}", exchange.text());
    assert!(exchange.closed, "the connection is closed mid-body");

    let (status, body) = edge.h2_get().await;
    assert_eq!(status, StatusCode::OK);
    let error = body.expect_err("the body does not complete");
    assert!(is_stream_reset(&error), "{error:?}");

    let lines = edge.logged(2).await;
    for line in &lines {
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["flag"], "UPE", "{line}");
    }
    assert_eq!(edge.flagged("UPE").await, 2.0);
    (exchange, response)
}

#[tokio::test]
async fn upstream_body_shorter_than_its_length_is_cut_not_completed() {
    let edge = Edge::new(
        "short",
        servers::raw_http(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly twenty-one bytes"),
    );
    // The head promised 100 bytes; fewer come before the close.
    let (exchange, response) = assert_cut_short(&edge).await;
    assert_eq!(response.header("content-length"), Some("100"));
    assert!(response.body.len() < 100, "{}", exchange.text());
}

#[tokio::test]
async fn truncated_chunked_upstream_body_never_gets_its_last_chunk() {
    let edge = Edge::new(
        "chunked",
        servers::raw_http(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
    );
    let (exchange, response) = assert_cut_short(&edge).await;
    assert_eq!(response.header("transfer-encoding"), Some("chunked"));
    assert!(
        !exchange.received.ends_with(b"0\r\n\r\n"),
        "no last chunk is sent: {:?}",
        exchange.text()
    );
}

#[tokio::test]
async fn well_framed_upstream_bodies_are_logged_clean() {
    let edge = Edge::new(
        "clean",
        servers::raw_http(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        ),
    );
    let exchange = edge.raw_get(false).await;
    let response = exchange
        .response()
        .unwrap_or_else(|| panic!("no response: {:?}", exchange.text()));
    assert_eq!(response.status, 200, "{}", exchange.text());
    assert_eq!(response.body, b"hello");
    let (status, body) = edge.h2_get().await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body.expect("complete body"), "hello");

    let lines = edge.logged(2).await;
    for line in &lines {
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["flag"], "-", "{line}");
    }
    assert_eq!(edge.flagged("UPE").await, 0.0);
}

/// Header fields of one request that HPACK sends as one literal and then as
/// one-byte references to it.
const REPEATS: usize = 4_000;

/// An h2 client (the h2 crate's, which sends header lists as given) of
/// listener `main`.
async fn h2_client(handle: &lacewing_proxy::ProxyHandle) -> h2::client::SendRequest<Bytes> {
    let stream = TcpStream::connect(proxy::listener_addr(handle, "main"))
        .await
        .expect("connect");
    let (client, connection) = h2::client::handshake(stream).await.expect("h2 handshake");
    tokio::spawn(connection);
    client.ready().await.expect("h2 ready")
}

#[tokio::test]
async fn h2_header_list_inflated_by_hpack_is_refused_before_the_upstream() {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::simple_yaml(&[upstream.addr], "http1"));
    let mut client = h2_client(&handle).await;

    // About 4 KB on the wire once indexed; 4,000 × (1,000 + 9 + 32) bytes, over
    // 4 MB, once decoded: far over the default 60 KiB `max_request_headers`.
    let value = http::HeaderValue::from_str(&"v".repeat(1_000)).unwrap();
    let mut request = Request::get("http://amplified.example/").body(()).unwrap();
    for _ in 0..REPEATS {
        request.headers_mut().append("x-amplify", value.clone());
    }
    let (response, _) = client.send_request(request, true).expect("send headers");
    match response.await {
        Ok(response) => assert_eq!(
            response.status(),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
        ),
        Err(e) => assert!(e.is_reset() || e.is_go_away(), "{e:?}"),
    }
    assert_eq!(upstream.requests(), 0, "the upstream never saw it");

    // The next request on a fresh connection is served as usual.
    let ok = client::get_h2(&proxy::url(&handle, "main", "/after")).await;
    assert_eq!(ok.status, StatusCode::OK);
    assert_eq!(upstream.requests(), 1);
}

/// Sends a GET for `url` through a pooled hyper client (h2 or HTTP/1.1)
/// and says whether its response arrived complete.
async fn completes(url: &str, h2: bool) -> bool {
    let mut builder = hyper_util::client::legacy::Client::builder(TokioExecutor::new());
    builder.http2_only(h2);
    let client = builder.build_http::<Empty<Bytes>>();
    let request = Request::get(url).body(Empty::new()).unwrap();
    match client.request(request).await {
        Ok(response) => response.into_body().collect().await.is_ok(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn an_http1_upstream_body_longer_than_its_length_is_cut_and_flagged_upe() {
    // One write: the extra bytes come in the same read as the body's end.
    let edge = Edge::new(
        "long",
        servers::raw_http(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello, and more"),
    );
    // HTTP/1.1: the body's one frame is withheld, so not even the head is
    // flushed before the connection closes.
    let exchange = edge.raw_get(true).await;
    assert!(exchange.closed, "the connection is closed");
    assert!(
        exchange.response().is_none_or(|r| r.body != b"hello"),
        "no complete response: {:?}",
        exchange.text()
    );
    // h2: the stream is reset (before its head: the body failed first).
    let url = format!("http://{}/framed", edge.addr());
    assert!(!completes(&url, true).await, "h2: not complete");

    let lines = edge.logged(2).await;
    for line in &lines {
        assert_eq!(line["status"], 200, "{line}");
        assert_eq!(line["flag"], "UPE", "{line}");
    }
    assert_eq!(edge.flagged("UPE").await, 2.0);
}

#[tokio::test]
async fn an_upstream_connection_that_sent_bytes_beyond_a_length_is_not_reused() {
    // Each response carries 10 bytes more than its length, on a connection
    // the upstream keeps open.
    let up = super::edge_timers::Upstream::start(|mut stream| async move {
        use tokio::io::AsyncWriteExt;
        loop {
            if tokio::time::timeout(
                std::time::Duration::from_secs(30),
                client::read_head(&mut stream),
            )
            .await
            .is_err()
            {
                return;
            }
            let reply = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello, and more";
            if stream.write_all(reply).await.is_err() {
                return;
            }
        }
    })
    .await;
    let handle = proxy::start(&proxy::simple_yaml(&[up.addr], "http1"));
    let url = proxy::url(&handle, "main", "/long");
    // An HTTP/1.1 client, then an h2 one: neither gets a complete response,
    // and the second goes over a new upstream connection.
    assert!(!completes(&url, false).await, "HTTP/1.1: not complete");
    assert!(!completes(&url, true).await, "h2: not complete");
    assert_eq!(
        up.opened(),
        2,
        "the first upstream connection is not reused"
    );
}

/// An h2 upstream whose every response says `content-length: 5` and
/// carries 15 bytes.
async fn h2_upstream_longer_than_its_length() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut conn) = h2::server::handshake(socket).await else {
                    return;
                };
                while let Some(Ok((_request, mut respond))) = conn.accept().await {
                    let head = http::Response::builder()
                        .header("content-length", "5")
                        .body(())
                        .unwrap();
                    if let Ok(mut body) = respond.send_response(head, false) {
                        let _ = body.send_data(Bytes::from_static(b"hello, and more"), true);
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn an_h2_upstream_body_longer_than_its_length_is_cut_and_flagged_upe() {
    let upstream = h2_upstream_longer_than_its_length().await;
    let handle = proxy::start(&proxy::simple_yaml(&[upstream], "h2"));
    let url = proxy::url(&handle, "main", "/long");
    // h2 refuses DATA beyond `content-length`, so the body fails before its
    // first byte: the client gets no complete response (the HTTP/1.1 head
    // is not even flushed before the connection closes; the h2 stream is
    // reset), and both exchanges are flagged.
    for h2 in [false, true] {
        let complete = completes(&url, h2).await;
        assert!(!complete, "h2 client: {h2}: the response is not complete");
    }
    let admin = proxy::admin_addr(&handle);
    eventually("two exchanges flagged UPE", || async {
        let text = client::metrics(admin).await;
        client::metric_sum(
            &text,
            "lacewing_http_local_replies_total",
            &[("listener", "main"), ("flag", "UPE")],
        ) == Some(2.0)
    })
    .await;
}

#[tokio::test]
async fn a_client_that_leaves_mid_body_is_logged_dc() {
    // More than loopback socket buffers hold, so the body is still coming
    // from the upstream when the client goes.
    const LENGTH: usize = 64 << 20;
    let mut reply = format!("HTTP/1.1 200 OK\r\nContent-Length: {LENGTH}\r\n\r\n").into_bytes();
    reply.resize(reply.len() + LENGTH, b'x');
    let edge = Edge::new("leaves", servers::raw_http(&reply));
    let mut stream = TcpStream::connect(edge.addr()).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut stream,
        b"GET /framed HTTP/1.1\r\nHost: edge.example\r\n\r\n",
    )
    .await
    .expect("send request");
    let head = client::read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    drop(stream);

    let lines = edge.logged(1).await;
    assert_eq!(lines[0]["status"], 200, "{}", lines[0]);
    assert_eq!(lines[0]["flag"], "DC", "{}", lines[0]);
}

#[tokio::test]
async fn an_h2_request_with_more_header_fields_than_max_header_count_gets_431() {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::simple_yaml(&[upstream.addr], "http1"));
    let url = proxy::url(&handle, "main", "/many");
    let mut client = h2_client(&handle).await;
    // The default `max_header_count` is 100: one more is refused. (The echo
    // upstream allows 100 too, and the proxy adds a few on the way.)
    for (count, status) in [
        (90, StatusCode::OK),
        (101, StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE),
    ] {
        let mut request = Request::get(&url).body(()).unwrap();
        for i in 0..count {
            let name = http::HeaderName::try_from(format!("x-field-{i}")).unwrap();
            request
                .headers_mut()
                .insert(name, http::HeaderValue::from_static("v"));
        }
        let (response, _) = client.send_request(request, true).expect("send headers");
        let response = response.await.expect("a response");
        assert_eq!(response.status(), status, "{count} header fields");
    }
    assert_eq!(upstream.requests(), 1, "the upstream saw only the first");
    let text = client::metrics(proxy::admin_addr(&handle)).await;
    let refused = client::metric_sum(
        &text,
        "lacewing_http_local_replies_total",
        &[("listener", "main"), ("flag", "PT")],
    );
    assert_eq!(refused, Some(1.0), "{text}");
}
