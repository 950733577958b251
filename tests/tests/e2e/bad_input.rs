//! Malformed, hostile and oversized HTTP input: each gets the right status (or a
//! closed connection), an HTTP/1.1 connection is then closed, and the proxy
//! keeps serving.

use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use lacewing_tests::client::{self, RawExchange, raw_exchange, raw_exchange_with_timeout};
use lacewing_tests::{proxy, servers};

/// One proxy in front of an echo server, with listener `limits` spliced in.
struct Setup {
    handle: lacewing_proxy::ProxyHandle,
    _upstream: servers::TestServer,
}

impl Setup {
    async fn new(limits: &str) -> Self {
        let upstream = servers::http_echo().await;
        let handle = proxy::start(&proxy::fill(
            "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
listeners:
  - name: main
    address: 127.0.0.1:0
    limits: {limits}
    routes:
      - { name: default, cluster: upstream }
clusters:
  - { name: upstream, endpoints: ['{upstream}'] }
",
            &[("limits", &limits), ("upstream", &upstream.addr)],
        ));
        Self {
            handle,
            _upstream: upstream,
        }
    }

    fn addr(&self) -> SocketAddr {
        proxy::listener_addr(&self.handle, "main")
    }

    /// A normal request still works.
    async fn assert_still_serving(&self) {
        let response = client::get(&proxy::url(&self.handle, "main", "/after")).await;
        assert_eq!(response.status, StatusCode::OK, "the proxy still serves");
    }
}

fn assert_rejected(exchange: &RawExchange, status: u16) {
    assert_eq!(
        exchange.status(),
        Some(status),
        "expected {status}, got {:?}",
        exchange.text()
    );
    assert!(exchange.closed, "the connection is closed after {status}");
}

#[tokio::test]
async fn malformed_request_line_gets_400_and_close() {
    let setup = Setup::new("{}").await;

    let exchange = raw_exchange(setup.addr(), b"THIS IS NOT HTTP\r\n\r\n").await;

    assert_rejected(&exchange, 400);
    setup.assert_still_serving().await;
}

#[tokio::test]
async fn control_byte_in_header_name_gets_400_and_close() {
    let setup = Setup::new("{}").await;

    let exchange = raw_exchange(
        setup.addr(),
        b"GET / HTTP/1.1\r\nHost: example\r\nBad\x01Name: value\r\n\r\n",
    )
    .await;

    assert_rejected(&exchange, 400);
    setup.assert_still_serving().await;
}

#[tokio::test]
async fn oversized_header_block_gets_431_and_close() {
    let setup = Setup::new("{ max_request_headers: 8KiB }").await;
    let mut request = b"GET / HTTP/1.1\r\nHost: example\r\n".to_vec();
    for i in 0..64 {
        request.extend_from_slice(format!("x-filler-{i}: {}\r\n", "v".repeat(1000)).as_bytes());
    }
    request.extend_from_slice(b"\r\n");

    let exchange = raw_exchange(setup.addr(), &request).await;

    assert_rejected(&exchange, 431);
    setup.assert_still_serving().await;
}

#[tokio::test]
async fn too_many_header_fields_get_431_and_close() {
    let setup = Setup::new("{ max_header_count: 20 }").await;
    let mut request = b"GET / HTTP/1.1\r\nHost: example\r\n".to_vec();
    for i in 0..50 {
        request.extend_from_slice(format!("x-many-{i}: v\r\n").as_bytes());
    }
    request.extend_from_slice(b"\r\n");

    let exchange = raw_exchange(setup.addr(), &request).await;

    assert_rejected(&exchange, 431);
    setup.assert_still_serving().await;
}

/// Content-Length next to Transfer-Encoding is the classic smuggling shape.
/// Lacewing handles it as RFC 9112 section 6.3 requires of an intermediary:
/// Transfer-Encoding wins, Content-Length is dropped before forwarding, and
/// the connection is closed after the response, so bytes hidden behind the
/// chunked body can never become a second request.
#[tokio::test]
async fn content_length_with_transfer_encoding_cannot_smuggle_a_request() {
    let setup = Setup::new("{}").await;

    let exchange = raw_exchange(
        setup.addr(),
        b"POST / HTTP/1.1\r\nHost: example\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: example\r\n\r\n",
    )
    .await;

    let text = exchange.text();
    assert_eq!(
        text.matches("HTTP/1.1 ").count(),
        1,
        "exactly one response, the hidden request is never served: {text}"
    );
    assert!(
        !text.contains("/smuggled"),
        "the upstream never saw the hidden request: {text}"
    );
    assert!(
        !text.to_ascii_lowercase().contains("\"content-length\""),
        "Content-Length is not forwarded next to Transfer-Encoding: {text}"
    );
    assert!(
        exchange.closed,
        "the connection is closed after the response"
    );
    setup.assert_still_serving().await;
}

#[tokio::test]
async fn conflicting_content_lengths_get_400_and_close() {
    let setup = Setup::new("{}").await;

    let exchange = raw_exchange(
        setup.addr(),
        b"POST / HTTP/1.1\r\nHost: example\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    )
    .await;

    assert_rejected(&exchange, 400);
    setup.assert_still_serving().await;
}

#[tokio::test]
async fn absurd_chunk_size_is_rejected_or_closed() {
    let setup = Setup::new("{}").await;

    let exchange = raw_exchange(
        setup.addr(),
        b"POST / HTTP/1.1\r\nHost: example\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n",
    )
    .await;

    assert!(
        exchange.closed,
        "the connection is closed: {:?}",
        exchange.text()
    );
    assert!(
        matches!(exchange.status(), None | Some(400)),
        "a 400 or no response at all, got {:?}",
        exchange.text()
    );
    setup.assert_still_serving().await;
}

#[tokio::test]
async fn slowloris_head_is_cut_off_after_the_header_read_timeout() {
    let setup = Setup::new("{ header_read_timeout: 1s }").await;

    // Half a head, then silence: the proxy must close rather than wait forever.
    let exchange = raw_exchange_with_timeout(
        setup.addr(),
        b"GET /slow HTTP/1.1\r\nHost: example\r\nX-Partial: ",
        Duration::from_secs(10),
    )
    .await;

    assert!(
        exchange.closed,
        "the connection is closed after the header read timeout: {:?}",
        exchange.text()
    );
    assert!(
        matches!(exchange.status(), None | Some(408)),
        "nothing or a 408, got {:?}",
        exchange.text()
    );
    setup.assert_still_serving().await;
}

#[tokio::test]
async fn large_headers_within_the_limit_pass() {
    let setup = Setup::new("{ max_request_headers: 32KiB }").await;
    let big = "v".repeat(20 * 1024);
    let request = http::Request::get(proxy::url(&setup.handle, "main", "/big-header"))
        .header("x-big", big.as_str())
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();

    let response = client::request(request).await;

    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(
        response.echoed_header("x-big").map(|v| v.len()),
        Some(big.len())
    );
}

/// `max_request_headers` bounds the request head as config.md says: on
/// HTTP/1.1 the bytes of the head as sent, on h2 the decoded header list
/// (name and value lengths plus 32 per field). A head a little under the
/// limit passes; a little over gets 431.
#[tokio::test]
async fn request_head_limit_holds_on_http1_and_h2() {
    const LIMIT: usize = 16 * 1024;
    let setup = Setup::new("{ max_request_headers: 16KiB }").await;
    let head = |len: usize| {
        let mut head = b"GET /head HTTP/1.1\r\nHost: example\r\nConnection: close\r\n".to_vec();
        let filler = len - head.len() - "x-fill: \r\n\r\n".len();
        head.extend_from_slice(format!("x-fill: {}\r\n\r\n", "v".repeat(filler)).as_bytes());
        assert_eq!(head.len(), len);
        head
    };
    let under = raw_exchange(setup.addr(), &head(LIMIT - 512)).await;
    assert_eq!(under.status(), Some(200), "{:?}", under.text());
    let over = raw_exchange(setup.addr(), &head(LIMIT + 512)).await;
    assert_rejected(&over, 431);

    let url = proxy::url(&setup.handle, "main", "/head");
    let h2 = |value_len: usize| {
        let request = http::Request::get(&url)
            .header("x-fill", "v".repeat(value_len))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        client::send_h2(request)
    };
    assert_eq!(h2(LIMIT - 512).await.status, StatusCode::OK);
    assert_eq!(
        h2(LIMIT + 512).await.status,
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
    );
    setup.assert_still_serving().await;
}

/// Reads one HTTP/1.1 response (head and `content-length` body) to `GET /`
/// on `stream`, which stays open.
async fn keep_alive_get(stream: &mut tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
        .await
        .unwrap();
    let head = client::read_head(stream).await.to_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length: "))
        .expect("a content-length")
        .trim()
        .parse()
        .unwrap();
    let mut body = vec![0u8; length];
    tokio::time::timeout(client::RAW_READ_TIMEOUT, stream.read_exact(&mut body))
        .await
        .expect("the body")
        .unwrap();
}

/// Whether the proxy closes `stream` (EOF or reset) before [`client::RAW_READ_TIMEOUT`].
async fn closed_by_proxy(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncReadExt;
    let mut rest = Vec::new();
    tokio::time::timeout(client::RAW_READ_TIMEOUT, stream.read_to_end(&mut rest))
        .await
        .is_ok()
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_after_the_idle_timeout() {
    let setup = Setup::new("{ idle_timeout: 200ms }").await;
    let mut stream = tokio::net::TcpStream::connect(setup.addr()).await.unwrap();
    keep_alive_get(&mut stream).await;

    assert!(
        closed_by_proxy(&mut stream).await,
        "an idle keep-alive connection is closed"
    );
    setup.assert_still_serving().await;
}

#[tokio::test]
async fn connections_beyond_max_connections_are_closed_at_once() {
    let setup = Setup::new("{ max_connections: 2 }").await;
    let mut first = tokio::net::TcpStream::connect(setup.addr()).await.unwrap();
    let mut second = tokio::net::TcpStream::connect(setup.addr()).await.unwrap();
    keep_alive_get(&mut first).await;
    keep_alive_get(&mut second).await;

    let mut third = tokio::net::TcpStream::connect(setup.addr()).await.unwrap();
    assert!(
        closed_by_proxy(&mut third).await,
        "the third connection is closed"
    );

    drop(first);
    lacewing_tests::eventually("a freed slot takes a new connection", || async {
        let mut again = tokio::net::TcpStream::connect(setup.addr()).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let _ = again
            .write_all(b"GET / HTTP/1.1\r\nHost: example\r\nConnection: close\r\n\r\n")
            .await;
        let mut response = Vec::new();
        let _ =
            tokio::time::timeout(client::RAW_READ_TIMEOUT, again.read_to_end(&mut response)).await;
        response.starts_with(b"HTTP/1.1 200")
    })
    .await;
    keep_alive_get(&mut second).await;
}
