//! Clients for tests: HTTP/1.1 and h2c requests collected into a [`Response`],
//! the admin endpoint's metrics, and raw bytes on a socket for malformed input.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest a helper here waits for a whole exchange before panicking (a hang guard, not a latency bound).
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long [`raw`] waits for the peer to close.
pub const RAW_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// A response with its body (and trailers) read to the end.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Trailers, when the response had any.
    pub trailers: Option<HeaderMap>,
}

impl Response {
    /// A header's value as text; `None` when absent or not text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}, body {:?}",
                self.status,
                self.text()
            )
        })
    }

    /// For echo-server responses: the value of a request header as the upstream saw it.
    pub fn echoed_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name.to_ascii_lowercase()]
            .as_str()
            .map(str::to_string)
    }
}

/// GET over HTTP/1.1.
pub async fn get(url: &str) -> Response {
    request(
        Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("valid request"),
    )
    .await
}

/// GET over HTTP/2 with prior knowledge (h2c).
pub async fn get_h2(url: &str) -> Response {
    send_h2(
        Request::get(url)
            .body(Full::new(Bytes::new()))
            .expect("valid request"),
    )
    .await
}

/// Sends `req` over HTTP/1.1 and reads the whole response.
pub async fn request(req: Request<Full<Bytes>>) -> Response {
    send(req).await
}

/// Sends a request with any body over HTTP/1.1 and reads the whole response.
pub async fn send<B>(req: Request<B>) -> Response
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = Client::builder(TokioExecutor::new()).build_http::<B>();
    exchange(&client, req).await
}

/// Sends a request with any body over h2c and reads the whole response.
pub async fn send_h2<B>(req: Request<B>) -> Response
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<B>();
    exchange(&client, req).await
}

/// A client that keeps its connections: sequential requests reuse one
/// HTTP/1.1 connection, concurrent h2c requests share one HTTP/2 connection.
#[derive(Debug, Clone)]
pub struct ReusingClient {
    inner: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

impl ReusingClient {
    /// An HTTP/1.1 client.
    pub fn http1() -> Self {
        Self {
            inner: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// An h2c (prior knowledge) client.
    pub fn h2() -> Self {
        Self {
            inner: Client::builder(TokioExecutor::new())
                .http2_only(true)
                .build_http(),
        }
    }

    /// GET `url`.
    pub async fn get(&self, url: &str) -> Response {
        self.request(
            Request::get(url)
                .body(Full::new(Bytes::new()))
                .expect("valid request"),
        )
        .await
    }

    /// Sends `req` and reads the whole response.
    pub async fn request(&self, req: Request<Full<Bytes>>) -> Response {
        exchange(&self.inner, req).await
    }
}

/// Sends a request and returns the response with its body still streaming.
///
/// For large downloads: read the body frame by frame instead of collecting it.
pub async fn send_streaming<B>(req: Request<B>) -> http::Response<hyper::body::Incoming>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = Client::builder(TokioExecutor::new()).build_http::<B>();
    let what = format!("{} {}", req.method(), req.uri());
    match tokio::time::timeout(EXCHANGE_TIMEOUT, client.request(req)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => panic!("{what} failed: {e:?}"),
        Err(_) => panic!("{what}: no response head within {EXCHANGE_TIMEOUT:?}"),
    }
}

/// [`send`] with an explicit hang guard, for very large bodies.
pub async fn send_with_timeout<B>(req: Request<B>, limit: Duration) -> Response
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = Client::builder(TokioExecutor::new()).build_http::<B>();
    exchange_within(&client, req, limit).await
}

/// [`send_streaming`] over h2c.
pub async fn send_streaming_h2<B>(req: Request<B>) -> http::Response<hyper::body::Incoming>
where
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let client = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http::<B>();
    let what = format!("{} {}", req.method(), req.uri());
    match tokio::time::timeout(EXCHANGE_TIMEOUT, client.request(req)).await {
        Ok(Ok(response)) => response,
        Ok(Err(e)) => panic!("{what} failed: {e:?}"),
        Err(_) => panic!("{what}: no response head within {EXCHANGE_TIMEOUT:?}"),
    }
}

async fn exchange<C, B>(client: &Client<C, B>, req: Request<B>) -> Response
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    exchange_within(client, req, EXCHANGE_TIMEOUT).await
}

async fn exchange_within<C, B>(client: &Client<C, B>, req: Request<B>, limit: Duration) -> Response
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
    B: http_body::Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let what = format!("{} {}", req.method(), req.uri());
    let exchange = async {
        let response = client
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("{what} failed: {e:?}"));
        let (parts, body) = response.into_parts();
        let collected = body
            .collect()
            .await
            .unwrap_or_else(|e| panic!("{what}: reading the body failed: {e:?}"));
        let trailers = collected.trailers().cloned();
        Response {
            status: parts.status,
            version: parts.version,
            headers: parts.headers,
            body: collected.to_bytes(),
            trailers,
        }
    };
    tokio::time::timeout(limit, exchange)
        .await
        .unwrap_or_else(|_| panic!("{what}: no complete response within {limit:?}"))
}

/// The admin endpoint's `/metrics` text.
pub async fn metrics(admin: SocketAddr) -> String {
    let response = get(&format!("http://{admin}/metrics")).await;
    assert_eq!(response.status, StatusCode::OK, "GET /metrics");
    response.text()
}

/// The sum of every sample whose line starts with `name_with_labels_prefix`,
/// e.g. `lacewing_upstream_retries_total` or `lacewing_http_requests_total{class="2xx"`;
/// `None` when no line matches.
pub fn metric_value(text: &str, name_with_labels_prefix: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name_with_labels_prefix) else {
            continue;
        };
        // `foo` must not match `foo_bucket`: after a bare name comes `{` or a space.
        let prefix_is_bare_name = !name_with_labels_prefix.contains('{');
        if prefix_is_bare_name && !(rest.starts_with('{') || rest.starts_with(' ')) {
            continue;
        }
        if let Some(value) = sample_value(line) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

/// The sum of every sample of metric `name` whose labels include all of `labels`
/// (in any order); `None` when no sample matches.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let sample_labels = if let Some(inner) = rest.strip_prefix('{') {
            match inner.split_once('}') {
                Some((inner, _)) => inner,
                None => continue,
            }
        } else if rest.starts_with(' ') {
            ""
        } else {
            continue;
        };
        let all_present = labels.iter().all(|(key, value)| {
            sample_labels
                .split(',')
                .any(|pair| pair == format!("{key}=\"{value}\""))
        });
        if all_present && let Some(value) = sample_value(line) {
            *found.get_or_insert(0.0) += value;
        }
    }
    found
}

fn sample_value(line: &str) -> Option<f64> {
    line.rsplit(' ').next()?.parse().ok()
}

/// Reads up to the end of a response head.
pub async fn read_head(stream: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(RAW_READ_TIMEOUT, stream.read(&mut byte))
            .await
            .expect("response head arrives")
            .expect("read response head");
        assert!(
            n > 0,
            "connection closed inside the head: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Writes `bytes` to `addr` and reads until the peer closes or [`RAW_READ_TIMEOUT`] passes.
pub async fn raw(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    raw_exchange(addr, bytes).await.received
}

/// What [`raw_exchange`] saw.
#[derive(Debug, Clone)]
pub struct RawExchange {
    /// Every byte read.
    pub received: Vec<u8>,
    /// Whether the peer closed (or reset) the connection before the timeout.
    pub closed: bool,
}

impl RawExchange {
    /// The received bytes as (lossy) text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.received).into_owned()
    }

    /// The status code of the first HTTP/1.x response line, if any.
    pub fn status(&self) -> Option<u16> {
        let text = self.text();
        let line = text.lines().next()?;
        let mut words = line.split(' ');
        let version = words.next()?;
        if !version.starts_with("HTTP/1.") {
            return None;
        }
        words.next()?.parse().ok()
    }

    /// The first HTTP/1.x response parsed: its head's header lines
    /// (lower-case names) and its body (de-chunked when chunked).
    pub fn response(&self) -> Option<RawResponse> {
        let status = self.status()?;
        let head_end = self.received.windows(4).position(|w| w == b"\r\n\r\n")?;
        let head = String::from_utf8_lossy(&self.received[..head_end]).into_owned();
        let headers: Vec<(String, String)> = head
            .split("\r\n")
            .skip(1)
            .filter_map(|line| line.split_once(':'))
            .map(|(name, value)| (name.trim().to_ascii_lowercase(), value.trim().to_string()))
            .collect();
        let rest = &self.received[head_end + 4..];
        let chunked = headers
            .iter()
            .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        let body = if chunked {
            dechunk(rest)
        } else {
            rest.to_vec()
        };
        Some(RawResponse {
            status,
            headers,
            body,
        })
    }
}

/// An HTTP/1.x response read off a raw socket.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header lines in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    /// The first value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "response body is not JSON ({e}); status {}, body {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

/// Decodes a chunked body, stopping at the last chunk or at the first malformed one.
fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or("").trim();
        let Ok(size) = usize::from_str_radix(size_text, 16) else {
            break;
        };
        data = &data[line_end + 2..];
        if size == 0 || data.len() < size {
            break;
        }
        out.extend_from_slice(&data[..size]);
        data = data.get(size + 2..).unwrap_or(&[]);
    }
    out
}

/// Writes `bytes` to `addr` and reads until the peer closes or [`RAW_READ_TIMEOUT`] passes.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> RawExchange {
    raw_exchange_with_timeout(addr, bytes, RAW_READ_TIMEOUT).await
}

/// [`raw_exchange`] with an explicit wait for the close.
pub async fn raw_exchange_with_timeout(
    addr: SocketAddr,
    bytes: &[u8],
    wait: Duration,
) -> RawExchange {
    let mut stream = TcpStream::connect(addr)
        .await
        .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
    // The proxy may answer and close before reading everything; a failed write is not an error here.
    let _ = stream.write_all(bytes).await;
    let mut received = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => received.extend_from_slice(&buf[..n]),
            Err(_) => break false,
        }
    };
    RawExchange { received, closed }
}
