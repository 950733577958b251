//! HTTP forwarding as a client sees it: requests and responses intact, proxy
//! headers added, hop-by-hop headers removed, connections reused, HTTP/2 and
//! upgrades carried through.

use bytes::Bytes;
use http::{Request, StatusCode, Version};
use http_body_util::Full;
use lacewing_proxy::ProxyHandle;
use lacewing_tests::client::{self, ReusingClient, metric_sum, raw_exchange};
use lacewing_tests::proxy;
use lacewing_tests::servers::{self, TestServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn http1_request_and_response_pass_through_intact() {
    let upstream = servers::http_echo_named("a").await;
    let handle = proxy::start(&proxy::simple_yaml(&[upstream.addr], "http1"));
    let request = Request::post(proxy::url(&handle, "main", "/some/path?q=1&r=two"))
        .header("x-custom", "custom value")
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(b"hello, upstream")))
        .unwrap();

    let response = client::request(request).await;

    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.version, Version::HTTP_11);
    assert_eq!(response.header("x-upstream"), Some("a"));
    assert_eq!(response.header("content-type"), Some("application/json"));
    let echo = response.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["path"], "/some/path");
    assert_eq!(echo["query"], "q=1&r=two");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["body_len"], 15);
    assert_eq!(echo["headers"]["x-custom"], "custom value");
    assert_eq!(echo["headers"]["content-type"], "text/plain");
}

#[tokio::test]
async fn upstream_status_and_body_reach_the_client() {
    let (_upstream, handle) = echo_behind_proxy("http1").await;

    let not_found = client::get(&proxy::url(&handle, "main", "/status/404")).await;
    assert_eq!(not_found.status, StatusCode::NOT_FOUND);
    assert_eq!(not_found.text(), "status 404");

    let bytes = client::get(&proxy::url(&handle, "main", "/bytes/300000")).await;
    assert_eq!(bytes.status, StatusCode::OK);
    assert_eq!(bytes.body.len(), 300_000);
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let (upstream, handle) = echo_behind_proxy("http1").await;

    for i in 0..5 {
        let response = client::get(&proxy::url(&handle, "main", &format!("/n/{i}"))).await;
        assert_eq!(response.status, StatusCode::OK, "request {i}");
    }

    assert_eq!(
        upstream.accepted(),
        1,
        "five sequential requests should share one pooled upstream connection"
    );
}

#[tokio::test]
async fn h2c_client_to_http1_upstream() {
    let (_upstream, handle) = echo_behind_proxy("http1").await;

    let echo = h2c_get_echo(&handle, "/h2-to-h1").await;

    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(echo["path"], "/h2-to-h1");
    assert!(
        !echo["authority"].as_str().unwrap_or("").is_empty(),
        "the upstream needs a Host header: {echo}"
    );
}

#[tokio::test]
async fn h2c_client_to_h2_upstream() {
    let (_upstream, handle) = echo_behind_proxy("h2").await;

    let echo = h2c_get_echo(&handle, "/h2-to-h2").await;

    assert_eq!(echo["version"], "HTTP/2.0");
    assert_eq!(echo["path"], "/h2-to-h2");
}

#[tokio::test]
async fn http1_client_to_h2_upstream() {
    let (_upstream, handle) = echo_behind_proxy("h2").await;

    let response = client::get(&proxy::url(&handle, "main", "/h1-to-h2")).await;

    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.json()["version"], "HTTP/2.0");
}

#[tokio::test]
async fn response_trailers_survive_h2_end_to_end() {
    let (_upstream, handle) = echo_behind_proxy("h2").await;

    let response = client::get_h2(&proxy::url(&handle, "main", "/trailers")).await;

    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.text(), "body before trailers");
    let trailers = response
        .trailers
        .expect("the upstream's trailers reach the client");
    assert_eq!(trailers.get("x-trailer").unwrap(), "yes");
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let (_upstream, handle) = echo_behind_proxy("http1").await;
    let request = "GET /hop HTTP/1.1\r\n\
        Host: example\r\n\
        Connection: close, x-named-by-connection\r\n\
        Keep-Alive: timeout=5\r\n\
        Proxy-Connection: keep-alive\r\n\
        TE: trailers, deflate\r\n\
        Upgrade: not-really\r\n\
        Transfer-Encoding: chunked\r\n\
        X-Named-By-Connection: secret\r\n\
        X-End-To-End: kept\r\n\
        \r\n\
        0\r\n\r\n";

    let exchange = raw_exchange(proxy::listener_addr(&handle, "main"), request.as_bytes()).await;

    let response = exchange
        .response()
        .unwrap_or_else(|| panic!("no HTTP response: {:?}", exchange.text()));
    assert_eq!(response.status, 200, "{:?}", exchange.text());
    let headers = response.json()["headers"].clone();
    for stripped in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
        "x-named-by-connection",
    ] {
        assert!(
            headers.get(stripped).is_none(),
            "`{stripped}` reached the upstream: {headers}"
        );
    }
    assert_eq!(
        headers["te"], "trailers",
        "TE is reduced to `trailers`: {headers}"
    );
    assert_eq!(headers["x-end-to-end"], "kept");
}

#[tokio::test]
async fn x_forwarded_for_is_set_or_appended() {
    let (_upstream, handle) = echo_behind_proxy("http1").await;
    let url = proxy::url(&handle, "main", "/xff");

    let fresh = client::get(&url).await;
    assert_eq!(
        fresh.echoed_header("x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );

    let request = get_with_header(&url, "x-forwarded-for", "203.0.113.7");
    let appended = client::request(request).await;
    assert_eq!(
        appended.echoed_header("x-forwarded-for").as_deref(),
        Some("203.0.113.7, 127.0.0.1")
    );
}

#[tokio::test]
async fn x_request_id_is_generated_when_absent_and_kept_when_present() {
    let (_upstream, handle) = echo_behind_proxy("http1").await;
    let url = proxy::url(&handle, "main", "/rid");

    let first = client::get(&url).await.echoed_header("x-request-id");
    let second = client::get(&url).await.echoed_header("x-request-id");
    let first = first.expect("a request id is generated");
    let second = second.expect("a request id is generated");
    assert!(!first.is_empty());
    assert_ne!(first, second, "each request gets its own id");

    let request = get_with_header(&url, "x-request-id", "caller-chosen-id-42");
    let kept = client::request(request).await;
    assert_eq!(
        kept.echoed_header("x-request-id").as_deref(),
        Some("caller-chosen-id-42")
    );
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled() {
    let (_upstream, handle) = echo_behind_proxy("http1").await;
    let mut stream = TcpStream::connect(proxy::listener_addr(&handle, "main"))
        .await
        .unwrap();
    stream
        .write_all(
            b"GET /ws HTTP/1.1\r\nHost: example\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
              Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .unwrap();

    let head = client::read_head(&mut stream).await;
    assert!(
        head.starts_with("HTTP/1.1 101"),
        "expected 101, got {head:?}"
    );
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "101 carries Upgrade: {head:?}"
    );

    for message in [&b"first frame bytes"[..], &[0u8, 1, 2, 255, 254][..]] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(client::RAW_READ_TIMEOUT, stream.read_exact(&mut echoed))
            .await
            .expect("echo arrives")
            .expect("tunnel stays open");
        assert_eq!(echoed, message);
    }
}

#[tokio::test]
async fn one_downstream_connection_carries_sequential_requests() {
    let (upstream, handle) = echo_behind_proxy("http1").await;
    let client = ReusingClient::http1();

    for i in 0..5 {
        let response = client
            .get(&proxy::url(&handle, "main", &format!("/ka/{i}")))
            .await;
        assert_eq!(response.status, StatusCode::OK, "request {i}");
    }

    let (connections, metrics) = downstream_connections(&handle).await;
    assert_eq!(
        connections,
        Some(1.0),
        "the client's keep-alive connection is kept open between requests: {metrics}"
    );
    assert_eq!(upstream.accepted(), 1);
}

#[tokio::test]
async fn concurrent_h2c_streams_share_one_connection_each_side() {
    const STREAMS: usize = 40;
    let (upstream, handle) = echo_behind_proxy("h2").await;
    let client = ReusingClient::h2();
    // One request first, so the connection exists before the burst.
    let first = client.get(&proxy::url(&handle, "main", "/first")).await;
    assert_eq!(first.status, StatusCode::OK);

    let requests: Vec<_> = (0..STREAMS)
        .map(|i| {
            let client = client.clone();
            let url = proxy::url(&handle, "main", &format!("/delay/100?stream={i}"));
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect();
    for (i, request) in requests.into_iter().enumerate() {
        let response = request.await.expect("request task did not panic");
        assert_eq!(response.status, StatusCode::OK, "stream {i}");
        assert_eq!(response.json()["query"], format!("stream={i}"));
    }

    let (connections, metrics) = downstream_connections(&handle).await;
    assert_eq!(
        connections,
        Some(1.0),
        "all streams on one downstream connection: {metrics}"
    );
    assert_eq!(
        upstream.accepted(),
        1,
        "an h2 cluster multiplexes concurrent requests on one upstream connection"
    );
}

#[tokio::test]
async fn head_response_has_headers_but_no_body() {
    let (_upstream, handle) = echo_behind_proxy("http1").await;
    let request = Request::head(proxy::url(&handle, "main", "/bytes/1000"))
        .body(Full::new(Bytes::new()))
        .unwrap();

    let response = client::request(request).await;

    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.header("content-length"), Some("1000"));
    assert!(response.body.is_empty());
    // The connection is still in a sane state for the next request.
    let next = client::get(&proxy::url(&handle, "main", "/after-head")).await;
    assert_eq!(next.status, StatusCode::OK);
}

/// An echo upstream and a proxy in front of it whose cluster speaks `protocol`
/// (`http1` or `h2`); keep both alive for the test.
async fn echo_behind_proxy(protocol: &str) -> (TestServer, ProxyHandle) {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::simple_yaml(&[upstream.addr], protocol));
    (upstream, handle)
}

/// GETs `path` over h2c through the `main` listener; asserts a 200 over HTTP/2
/// and returns what the echo upstream saw.
async fn h2c_get_echo(handle: &ProxyHandle, path: &str) -> serde_json::Value {
    let response = client::get_h2(&proxy::url(handle, "main", path)).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.version, Version::HTTP_2);
    response.json()
}

/// A bodiless GET of `url` carrying one extra header.
fn get_with_header(url: &str, name: &str, value: &str) -> Request<Full<Bytes>> {
    Request::get(url)
        .header(name, value)
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Downstream connections the `main` listener has accepted, with the metrics
/// text it was read from.
async fn downstream_connections(handle: &ProxyHandle) -> (Option<f64>, String) {
    let metrics = client::metrics(proxy::admin_addr(handle)).await;
    let total = metric_sum(
        &metrics,
        "lacewing_downstream_connections_total",
        &[("listener", "main")],
    );
    (total, metrics)
}
