//! HTTP and gRPC callouts (`proxy_http_call`, `proxy_grpc_call`,
//! `proxy_grpc_stream`) sent through the proxy's clusters.
//!
//! [`http_call`] turns the module's header pairs (with the `:method`, `:path`,
//! `:authority` pseudo-headers), body and trailers into a request, sends it
//! through [`Upstreams`] and collects the whole response under a size limit.
//! [`grpc_start`] opens a gRPC stream on the worker's `LocalSet`: messages the
//! module sends are framed onto the request body, response frames are parsed
//! as they arrive and everything the module must hear about comes back as
//! [`GrpcEvent`]s, ending with exactly one [`GrpcEvent::Close`] unless the
//! module cancelled the stream.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HOST, TE, TRAILER, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use lacewing_core::ProxyError;
use lacewing_core::body::{self, BoxBody, BoxError};
use lacewing_core::callout::Upstreams;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Largest HTTP callout response body collected for a module.
pub const MAX_HTTP_CALL_RESPONSE_BYTES: usize = 16 * 1024 * 1024;
/// Largest gRPC message sent or received.
pub const MAX_GRPC_MESSAGE_BYTES: usize = 4 * 1024 * 1024;
/// How long a gRPC stream without a deadline may wait for its response head
/// (a server may answer only once the client finished sending).
const NO_DEADLINE_HEAD_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);
/// Length of the gRPC message prefix: compressed flag and big-endian length.
const GRPC_PREFIX_LEN: usize = 5;

/// gRPC status codes the host reports itself.
pub mod grpc_status {
    /// Success.
    pub const OK: u32 = 0;
    /// The caller cancelled the call.
    pub const CANCELLED: u32 = 1;
    /// An error without a better code (e.g. no or an unreadable `grpc-status`).
    pub const UNKNOWN: u32 = 2;
    /// The deadline passed before the call ended.
    pub const DEADLINE_EXCEEDED: u32 = 4;
    /// The caller may not call this.
    pub const PERMISSION_DENIED: u32 = 7;
    /// A message exceeded the size limit.
    pub const RESOURCE_EXHAUSTED: u32 = 8;
    /// The server does not implement the method.
    pub const UNIMPLEMENTED: u32 = 12;
    /// The call broke a protocol rule (bad frame, bad request).
    pub const INTERNAL: u32 = 13;
    /// The server could not be reached or the connection failed.
    pub const UNAVAILABLE: u32 = 14;
    /// The caller is not authenticated.
    pub const UNAUTHENTICATED: u32 = 16;
}

/// Why an HTTP callout (or a gRPC send) failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CalloutError {
    /// The configuration has no cluster of that name.
    #[error("unknown cluster `{0}`")]
    UnknownCluster(String),
    /// The module's request is malformed.
    #[error("bad callout request: {0}")]
    BadRequest(String),
    /// No complete response within the callout's timeout.
    #[error("callout timed out")]
    Timeout,
    /// The upstream could not be reached or failed mid-response.
    #[error("callout failed: {0}")]
    Upstream(String),
    /// The response body (or a gRPC message) exceeds its size limit.
    #[error("callout body exceeds its size limit")]
    BodyTooLarge,
}

impl From<ProxyError> for CalloutError {
    fn from(error: ProxyError) -> Self {
        match error {
            ProxyError::UpstreamTimeout(_) => Self::Timeout,
            other => Self::Upstream(other.to_string()),
        }
    }
}

/// The complete response to an HTTP callout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCallResponse {
    /// The status code.
    pub status: u16,
    /// Response headers, starting with `:status`.
    pub headers: Vec<(String, Bytes)>,
    /// The whole body.
    pub body: Bytes,
    /// Response trailers, if the upstream sent any.
    pub trailers: Vec<(String, Bytes)>,
}

/// Sends one HTTP request to `cluster` and collects its response.
///
/// `headers` must hold `:method`, `:path` and `:authority`; `:scheme` is
/// optional and other pseudo-headers are ignored. The request goes out with
/// an origin-form URI and `:authority` as its `host` header; framing headers
/// (`content-length`, `transfer-encoding`) are recomputed from the body.
/// `timeout` bounds the whole exchange, body included.
pub async fn http_call(
    upstreams: Arc<dyn Upstreams>,
    cluster: String,
    headers: Vec<(String, Bytes)>,
    body: Bytes,
    trailers: Vec<(String, Bytes)>,
    timeout: Duration,
) -> Result<HttpCallResponse, CalloutError> {
    http_call_limited(
        upstreams,
        cluster,
        headers,
        body,
        trailers,
        timeout,
        MAX_HTTP_CALL_RESPONSE_BYTES,
    )
    .await
}

async fn http_call_limited(
    upstreams: Arc<dyn Upstreams>,
    cluster: String,
    headers: Vec<(String, Bytes)>,
    body: Bytes,
    trailers: Vec<(String, Bytes)>,
    timeout: Duration,
    body_limit: usize,
) -> Result<HttpCallResponse, CalloutError> {
    if !upstreams.has_cluster(&cluster) {
        return Err(CalloutError::UnknownCluster(cluster));
    }
    let request = http_request(headers, body, trailers)?;
    let exchange = async {
        let response = upstreams.send(&cluster, request, timeout).await?;
        collect_response(response, body_limit).await
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| CalloutError::Timeout)?
}

fn header_name(name: &str) -> Result<HeaderName, CalloutError> {
    HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| CalloutError::BadRequest(format!("invalid header name {name:?}")))
}

fn header_value(name: &str, value: &[u8]) -> Result<HeaderValue, CalloutError> {
    HeaderValue::from_bytes(value)
        .map_err(|_| CalloutError::BadRequest(format!("invalid value for header {name:?}")))
}

/// Builds the request a module described.
fn http_request(
    headers: Vec<(String, Bytes)>,
    body: Bytes,
    trailers: Vec<(String, Bytes)>,
) -> Result<Request<BoxBody>, CalloutError> {
    let mut method = None;
    let mut path = None;
    let mut authority = None;
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        match name.as_str() {
            ":method" => method = Some(value),
            ":path" => path = Some(value),
            ":authority" => authority = Some(value),
            ":scheme" => {
                // The cluster decides the scheme; a malformed one is still
                // the module's mistake.
                http::uri::Scheme::try_from(&value[..])
                    .map_err(|_| CalloutError::BadRequest("invalid :scheme".into()))?;
            }
            pseudo if pseudo.starts_with(':') => {}
            _ => {
                let header = header_name(&name)?;
                if header == CONTENT_LENGTH || header == TRANSFER_ENCODING {
                    continue;
                }
                map.append(header, header_value(&name, &value)?);
            }
        }
    }
    let missing = |name: &str| CalloutError::BadRequest(format!("missing {name} header"));
    let method = method.ok_or_else(|| missing(":method"))?;
    let method = Method::from_bytes(&method)
        .map_err(|_| CalloutError::BadRequest("invalid :method".into()))?;
    let path = path.ok_or_else(|| missing(":path"))?;
    if !path.starts_with(b"/") {
        return Err(CalloutError::BadRequest(":path must start with '/'".into()));
    }
    let uri = http::Uri::try_from(&path[..])
        .map_err(|_| CalloutError::BadRequest("invalid :path".into()))?;
    let authority = authority.ok_or_else(|| missing(":authority"))?;
    if authority.is_empty() {
        return Err(missing(":authority"));
    }
    if !map.contains_key(HOST) {
        map.insert(HOST, header_value(":authority", &authority)?);
    }

    let body = if trailers.is_empty() {
        body::full(body)
    } else {
        let mut trailer_map = HeaderMap::new();
        for (name, value) in &trailers {
            let trailer = header_name(name)?;
            trailer_map.append(trailer, header_value(name, value)?);
        }
        if !map.contains_key(TRAILER) {
            // HTTP/1.1 only sends trailers that the head announced.
            let names: Vec<&str> = trailer_map.keys().map(HeaderName::as_str).collect();
            map.insert(
                TRAILER,
                header_value("trailer", names.join(", ").as_bytes())?,
            );
        }
        let (tx, rx) = unbounded_channel();
        // The receiver is alive, so these sends cannot fail.
        let _ = tx.send(Frame::data(body));
        let _ = tx.send(Frame::trailers(trailer_map));
        ChannelBody::new(rx).boxed_unsync()
    };

    let mut request = Request::new(body);
    *request.method_mut() = method;
    *request.uri_mut() = uri;
    *request.headers_mut() = map;
    Ok(request)
}

/// Header pairs as modules see them.
fn pairs(map: &HeaderMap) -> Vec<(String, Bytes)> {
    map.iter()
        .map(|(name, value)| {
            (
                name.as_str().to_owned(),
                Bytes::copy_from_slice(value.as_bytes()),
            )
        })
        .collect()
}

async fn collect_response(
    response: http::Response<BoxBody>,
    body_limit: usize,
) -> Result<HttpCallResponse, CalloutError> {
    let (parts, mut body) = response.into_parts();
    let mut headers = Vec::with_capacity(parts.headers.len() + 1);
    headers.push((
        ":status".to_owned(),
        Bytes::copy_from_slice(parts.status.as_str().as_bytes()),
    ));
    headers.extend(pairs(&parts.headers));
    let mut data = BytesMut::new();
    let mut trailers = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| CalloutError::Upstream(error.to_string()))?;
        match frame.into_data() {
            Ok(chunk) => {
                if data.len().saturating_add(chunk.len()) > body_limit {
                    return Err(CalloutError::BodyTooLarge);
                }
                data.extend_from_slice(&chunk);
            }
            Err(frame) => {
                if let Ok(map) = frame.into_trailers() {
                    trailers.extend(pairs(&map));
                }
            }
        }
    }
    Ok(HttpCallResponse {
        status: parts.status.as_u16(),
        headers,
        body: data.freeze(),
        trailers,
    })
}

/// A body whose frames arrive on a channel; it ends when every sender is gone.
#[derive(Debug)]
struct ChannelBody {
    frames: UnboundedReceiver<Frame<Bytes>>,
    ended: bool,
}

impl ChannelBody {
    fn new(frames: UnboundedReceiver<Frame<Bytes>>) -> Self {
        Self {
            frames,
            ended: false,
        }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.frames.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}

/// What a gRPC stream reports to the module, in order: initial metadata,
/// messages, trailing metadata, then one close.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrpcEvent {
    /// Response headers (empty for a trailers-only response).
    InitialMetadata(Vec<(String, Bytes)>),
    /// One response message, unframed.
    Message(Bytes),
    /// Response trailers (or the headers of a trailers-only response).
    TrailingMetadata(Vec<(String, Bytes)>),
    /// The stream ended with this gRPC status.
    Close { status: u32, message: String },
}

/// The module's side of an open gRPC stream.
///
/// Dropping the handle half-closes the request side like [`close`](Self::close);
/// the stream still runs to its end. Only [`cancel`](Self::cancel) stops it.
#[derive(Debug)]
pub struct GrpcStreamHandle {
    /// Framed messages for the request body; `None` once half-closed.
    outgoing: Mutex<Option<UnboundedSender<Frame<Bytes>>>>,
    cancelled: Arc<AtomicBool>,
    task: tokio::task::AbortHandle,
}

impl GrpcStreamHandle {
    fn outgoing(&self) -> MutexGuard<'_, Option<UnboundedSender<Frame<Bytes>>>> {
        // The guarded value is a plain Option; poisoning cannot tear it.
        self.outgoing.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends one message; with `end_of_stream` the request side is closed
    /// after it.
    pub fn send(&self, message: Bytes, end_of_stream: bool) -> Result<(), CalloutError> {
        if message.len() > MAX_GRPC_MESSAGE_BYTES {
            return Err(CalloutError::BodyTooLarge);
        }
        let mut outgoing = self.outgoing();
        let sender = outgoing
            .as_ref()
            .ok_or_else(|| CalloutError::BadRequest("the stream is closed for sending".into()))?;
        sender
            .send(Frame::data(grpc_frame(&message)))
            .map_err(|_| CalloutError::Upstream("the stream has ended".into()))?;
        if end_of_stream {
            *outgoing = None;
        }
        Ok(())
    }

    /// Half-closes: ends the request stream; responses keep arriving.
    pub fn close(&self) {
        self.outgoing().take();
    }

    /// Abandons the stream. No further event is sent; events already queued
    /// before the call must be discarded by the receiver.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.outgoing().take();
        self.task.abort();
    }
}

/// One gRPC message with its length prefix (never compressed).
fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(GRPC_PREFIX_LEN + message.len());
    frame.extend_from_slice(&[0]);
    // `send` bounds messages to MAX_GRPC_MESSAGE_BYTES, far below u32::MAX.
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    frame.freeze()
}

/// Opens a gRPC stream to `/{service}/{method}` on `cluster` and returns the
/// module's handle; what happens on it arrives on `events`.
///
/// Must be called inside a tokio `LocalSet` (the stream runs as a local
/// task). `timeout`, if set, is the deadline of the whole stream and is sent
/// as `grpc-timeout`. Failures of any kind, even an unknown cluster or bad
/// metadata, are reported as a [`GrpcEvent::Close`], never synchronously.
pub fn grpc_start(
    upstreams: Arc<dyn Upstreams>,
    cluster: String,
    service: String,
    method: String,
    initial_metadata: Vec<(String, Bytes)>,
    timeout: Option<Duration>,
    events: UnboundedSender<GrpcEvent>,
) -> GrpcStreamHandle {
    let (outgoing, request_frames) = unbounded_channel();
    let cancelled = Arc::new(AtomicBool::new(false));
    let call = GrpcCall {
        upstreams,
        cluster,
        path: format!("/{service}/{method}"),
        initial_metadata,
        timeout,
        request_body: ChannelBody::new(request_frames),
    };
    let events = Events {
        tx: events,
        cancelled: Arc::clone(&cancelled),
    };
    let task = tokio::task::spawn_local(call.run(events));
    GrpcStreamHandle {
        outgoing: Mutex::new(Some(outgoing)),
        cancelled,
        task: task.abort_handle(),
    }
}

/// The module stopped listening (cancelled, or its VM is gone).
#[derive(Debug)]
struct Abandoned;

struct Events {
    tx: UnboundedSender<GrpcEvent>,
    cancelled: Arc<AtomicBool>,
}

impl Events {
    fn emit(&self, event: GrpcEvent) -> Result<(), Abandoned> {
        if self.cancelled.load(Ordering::Acquire) {
            return Err(Abandoned);
        }
        self.tx.send(event).map_err(|_| Abandoned)
    }
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Closed {
    status: u32,
    message: String,
}

impl Closed {
    fn new(status: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

struct GrpcCall {
    upstreams: Arc<dyn Upstreams>,
    cluster: String,
    path: String,
    initial_metadata: Vec<(String, Bytes)>,
    timeout: Option<Duration>,
    request_body: ChannelBody,
}

impl GrpcCall {
    async fn run(self, events: Events) {
        let outcome = match self.timeout {
            Some(deadline) => tokio::time::timeout(deadline, self.exchange(&events))
                .await
                .unwrap_or_else(|_| {
                    Ok(Closed::new(
                        grpc_status::DEADLINE_EXCEEDED,
                        "deadline exceeded",
                    ))
                }),
            None => self.exchange(&events).await,
        };
        if let Ok(closed) = outcome {
            let _ = events.emit(GrpcEvent::Close {
                status: closed.status,
                message: closed.message,
            });
        }
    }

    fn request(
        path: &str,
        initial_metadata: Vec<(String, Bytes)>,
        timeout: Option<Duration>,
        body: ChannelBody,
    ) -> Result<Request<BoxBody>, CalloutError> {
        let uri = http::Uri::try_from(path)
            .map_err(|_| CalloutError::BadRequest(format!("invalid gRPC path {path:?}")))?;
        let mut headers = HeaderMap::new();
        for (name, value) in initial_metadata {
            if name.starts_with(':') {
                continue;
            }
            let header = header_name(&name)?;
            if [CONTENT_TYPE, TE, CONTENT_LENGTH, TRANSFER_ENCODING].contains(&header)
                || header == "grpc-timeout"
            {
                continue;
            }
            headers.append(header, header_value(&name, &value)?);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        headers.insert(TE, HeaderValue::from_static("trailers"));
        if let Some(timeout) = timeout {
            let value = HeaderValue::from_str(&grpc_timeout(timeout))
                .map_err(|_| CalloutError::BadRequest("unencodable timeout".into()))?;
            headers.insert("grpc-timeout", value);
        }
        let mut request = Request::new(body.boxed_unsync());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = uri;
        *request.headers_mut() = headers;
        Ok(request)
    }

    /// Runs the stream until it ends; events before the close are emitted
    /// here, the close itself by the caller.
    async fn exchange(self, events: &Events) -> Result<Closed, Abandoned> {
        let Self {
            upstreams,
            cluster,
            path,
            initial_metadata,
            timeout,
            request_body,
        } = self;
        if !upstreams.has_cluster(&cluster) {
            return Ok(Closed::new(
                grpc_status::UNAVAILABLE,
                format!("unknown cluster `{cluster}`"),
            ));
        }
        let request = match Self::request(&path, initial_metadata, timeout, request_body) {
            Ok(request) => request,
            Err(error) => return Ok(Closed::new(grpc_status::INTERNAL, error.to_string())),
        };
        let head_wait = timeout.unwrap_or(NO_DEADLINE_HEAD_WAIT);
        let response = match upstreams.send(&cluster, request, head_wait).await {
            Ok(response) => response,
            Err(ProxyError::UpstreamTimeout(_)) if timeout.is_some() => {
                return Ok(Closed::new(
                    grpc_status::DEADLINE_EXCEEDED,
                    "deadline exceeded",
                ));
            }
            Err(error) => return Ok(Closed::new(grpc_status::UNAVAILABLE, error.to_string())),
        };
        let (parts, mut body) = response.into_parts();

        if parts.headers.contains_key("grpc-status") {
            // Trailers-only: the headers are the trailers.
            events.emit(GrpcEvent::InitialMetadata(Vec::new()))?;
            events.emit(GrpcEvent::TrailingMetadata(pairs(&parts.headers)))?;
            return Ok(status_of(&parts.headers));
        }
        events.emit(GrpcEvent::InitialMetadata(pairs(&parts.headers)))?;
        if parts.status != StatusCode::OK {
            return Ok(Closed::new(
                grpc_status_of_http(parts.status),
                format!("upstream answered HTTP {}", parts.status.as_u16()),
            ));
        }

        let mut decoder = MessageDecoder::new(MAX_GRPC_MESSAGE_BYTES);
        loop {
            let frame = match body.frame().await {
                None => {
                    return Ok(Closed::new(
                        grpc_status::INTERNAL,
                        "stream ended without trailers",
                    ));
                }
                Some(Err(error)) => {
                    return Ok(Closed::new(grpc_status::UNAVAILABLE, error.to_string()));
                }
                Some(Ok(frame)) => frame,
            };
            let frame = match frame.into_data() {
                Ok(chunk) => {
                    decoder.push(&chunk);
                    loop {
                        match decoder.next_message() {
                            Ok(Some(message)) => events.emit(GrpcEvent::Message(message))?,
                            Ok(None) => break,
                            Err(closed) => return Ok(closed),
                        }
                    }
                    continue;
                }
                Err(frame) => frame,
            };
            if let Ok(trailers) = frame.into_trailers() {
                events.emit(GrpcEvent::TrailingMetadata(pairs(&trailers)))?;
                if decoder.has_partial() {
                    return Ok(Closed::new(
                        grpc_status::INTERNAL,
                        "stream ended inside a message",
                    ));
                }
                return Ok(status_of(&trailers));
            }
        }
    }
}

/// Splits a byte stream into gRPC messages.
#[derive(Debug)]
struct MessageDecoder {
    buffer: BytesMut,
    max_message: usize,
}

impl MessageDecoder {
    fn new(max_message: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            max_message,
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    fn has_partial(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// The next complete message, `None` if more bytes are needed, or the
    /// status to close with when the stream is malformed.
    fn next_message(&mut self) -> Result<Option<Bytes>, Closed> {
        let Some(prefix) = self.buffer.get(..GRPC_PREFIX_LEN) else {
            return Ok(None);
        };
        let compressed = prefix[0];
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        if compressed != 0 {
            return Err(Closed::new(
                grpc_status::INTERNAL,
                "compressed message, but no compression was negotiated",
            ));
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max_message {
            return Err(Closed::new(
                grpc_status::RESOURCE_EXHAUSTED,
                format!(
                    "message of {len} bytes exceeds the {} byte limit",
                    self.max_message
                ),
            ));
        }
        if self.buffer.len() - GRPC_PREFIX_LEN < len {
            return Ok(None);
        }
        self.buffer.advance(GRPC_PREFIX_LEN);
        Ok(Some(self.buffer.split_to(len).freeze()))
    }
}

/// The status in `grpc-status` / `grpc-message`.
fn status_of(map: &HeaderMap) -> Closed {
    let message = map
        .get("grpc-message")
        .map(|value| percent_decode(value.as_bytes()))
        .unwrap_or_default();
    match map.get("grpc-status") {
        None => Closed::new(grpc_status::UNKNOWN, "missing grpc-status"),
        Some(value) => match std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
        {
            Some(status) => Closed::new(status, message),
            None => Closed::new(grpc_status::UNKNOWN, "unreadable grpc-status"),
        },
    }
}

/// The gRPC status for a non-200 HTTP answer without `grpc-status`, per the
/// gRPC HTTP-to-gRPC status mapping.
fn grpc_status_of_http(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => grpc_status::INTERNAL,
        401 => grpc_status::UNAUTHENTICATED,
        403 => grpc_status::PERMISSION_DENIED,
        404 => grpc_status::UNIMPLEMENTED,
        429 | 502 | 503 | 504 => grpc_status::UNAVAILABLE,
        _ => grpc_status::UNKNOWN,
    }
}

/// Decodes `grpc-message` percent-encoding; bad escapes stay as written.
fn percent_decode(raw: &[u8]) -> String {
    fn hex(digit: u8) -> Option<u8> {
        char::from(digit)
            .to_digit(16)
            .and_then(|value| u8::try_from(value).ok())
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut index = 0;
    while index < raw.len() {
        let byte = raw[index];
        if byte == b'%'
            && let (Some(high), Some(low)) = (
                raw.get(index + 1).copied().and_then(hex),
                raw.get(index + 2).copied().and_then(hex),
            )
        {
            out.push(high << 4 | low);
            index += 3;
            continue;
        }
        out.push(byte);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `grpc-timeout` value: at most 8 digits and a unit.
fn grpc_timeout(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let millis = timeout.as_millis();
    if millis == 0 {
        return format!("{}u", timeout.as_micros().min(MAX));
    }
    if millis <= MAX {
        return format!("{millis}m");
    }
    let seconds = u128::from(timeout.as_secs());
    if seconds <= MAX {
        return format!("{seconds}S");
    }
    if seconds / 60 <= MAX {
        return format!("{}M", seconds / 60);
    }
    format!("{}H", (seconds / 3600).min(MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::convert::Infallible;
    use std::future::Future;
    use std::net::SocketAddr;

    use hyper::body::Incoming;
    use hyper::service::service_fn;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use lacewing_core::callout::LocalFuture;
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::LocalSet;

    #[derive(Debug, Clone, Copy)]
    enum Protocol {
        Http1,
        Http2,
    }

    /// Clusters of one endpoint each, reached over a fresh hyper client
    /// connection per request.
    struct DirectUpstreams {
        clusters: HashMap<String, (SocketAddr, Protocol)>,
    }

    impl DirectUpstreams {
        fn one(name: &str, addr: SocketAddr, protocol: Protocol) -> Arc<dyn Upstreams> {
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
                    let tcp =
                        TcpStream::connect(addr)
                            .await
                            .map_err(|error| ProxyError::Connect {
                                endpoint: addr.to_string(),
                                reason: error.to_string(),
                            })?;
                    let io = TokioIo::new(tcp);
                    let response = match protocol {
                        Protocol::Http1 => {
                            let (mut sender, connection) =
                                hyper::client::conn::http1::handshake(io)
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
    async fn serve<F, Fut>(protocol: Protocol, handler: F) -> SocketAddr
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
    async fn serve_cluster<F, Fut>(name: &str, protocol: Protocol, handler: F) -> Arc<dyn Upstreams>
    where
        F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = http::Response<BoxBody>> + Send + 'static,
    {
        DirectUpstreams::one(name, serve(protocol, handler).await, protocol)
    }

    /// A handler that never answers.
    async fn never_answers(_request: Request<Incoming>) -> http::Response<BoxBody> {
        std::future::pending::<()>().await;
        http::Response::new(body::empty())
    }

    /// A port nothing listens on.
    async fn closed_port() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    }

    fn pair(name: &str, value: &str) -> (String, Bytes) {
        (name.to_owned(), Bytes::copy_from_slice(value.as_bytes()))
    }

    fn value<'a>(pairs: &'a [(String, Bytes)], name: &str) -> Option<&'a [u8]> {
        pairs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_ref())
    }

    fn request_headers() -> Vec<(String, Bytes)> {
        vec![
            pair(":method", "POST"),
            pair(":path", "/echo?q=1"),
            pair(":authority", "example.test"),
            pair(":scheme", "http"),
            pair("X-Custom", "yes"),
            pair("content-length", "999"),
        ]
    }

    /// Echoes the request: method, path, host, a header and a trailer come
    /// back as headers, the body as the body.
    async fn echo(request: Request<Incoming>) -> http::Response<BoxBody> {
        let (parts, body) = request.into_parts();
        let collected = body.collect().await.unwrap();
        let trailer = collected
            .trailers()
            .and_then(|t| t.get("x-t"))
            .cloned()
            .unwrap_or(HeaderValue::from_static("none"));
        let header = |name: &str| parts.headers.get(name).cloned();
        let mut response = http::Response::new(body::full(collected.to_bytes()));
        *response.status_mut() = StatusCode::CREATED;
        let out = response.headers_mut();
        out.insert("x-method", parts.method.as_str().parse().unwrap());
        out.insert("x-path", parts.uri.to_string().parse().unwrap());
        if let Some(host) = header("host") {
            out.insert("x-host", host);
        }
        if let Some(custom) = header("x-custom") {
            out.insert("x-custom", custom);
        }
        out.insert("x-trailer", trailer);
        response
    }

    /// An HTTP call with no body or trailers and a 10 s timeout.
    async fn call_without_body(
        upstreams: Arc<dyn Upstreams>,
        cluster: &str,
        headers: Vec<(String, Bytes)>,
    ) -> Result<HttpCallResponse, CalloutError> {
        http_call(
            upstreams,
            cluster.into(),
            headers,
            Bytes::new(),
            Vec::new(),
            Duration::from_secs(10),
        )
        .await
    }

    async fn in_local_set<F: Future>(future: F) -> F::Output {
        LocalSet::new().run_until(future).await
    }

    #[tokio::test]
    async fn http_call_round_trip_over_http1() {
        in_local_set(async {
            let upstreams = serve_cluster("echo", Protocol::Http1, echo).await;
            let response = http_call(
                upstreams,
                "echo".into(),
                request_headers(),
                Bytes::from_static(b"hello"),
                vec![pair("x-t", "tail")],
                Duration::from_secs(10),
            )
            .await
            .unwrap();
            assert_eq!(response.status, 201);
            assert_eq!(response.headers[0], pair(":status", "201"));
            assert_eq!(value(&response.headers, "x-method"), Some(&b"POST"[..]));
            assert_eq!(value(&response.headers, "x-path"), Some(&b"/echo?q=1"[..]));
            assert_eq!(
                value(&response.headers, "x-host"),
                Some(&b"example.test"[..])
            );
            assert_eq!(value(&response.headers, "x-custom"), Some(&b"yes"[..]));
            assert_eq!(value(&response.headers, "x-trailer"), Some(&b"tail"[..]));
            assert_eq!(response.body, Bytes::from_static(b"hello"));
            assert!(response.trailers.is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn http_call_without_body_or_trailers() {
        in_local_set(async {
            let upstreams = serve_cluster("echo", Protocol::Http1, echo).await;
            let headers = vec![
                pair(":method", "GET"),
                pair(":path", "/"),
                pair(":authority", "a"),
            ];
            let response = call_without_body(upstreams, "echo", headers).await.unwrap();
            assert_eq!(value(&response.headers, "x-method"), Some(&b"GET"[..]));
            assert_eq!(value(&response.headers, "x-trailer"), Some(&b"none"[..]));
            assert!(response.body.is_empty());
        })
        .await;
    }

    #[tokio::test]
    async fn http_call_collects_response_trailers_over_http2() {
        in_local_set(async {
            let upstreams = serve_cluster("h2", Protocol::Http2, |_request| async {
                let mut trailers = HeaderMap::new();
                trailers.insert("x-done", HeaderValue::from_static("1"));
                let body = http_body_util::Full::new(Bytes::from_static(b"data"))
                    .map_err(|never| match never {})
                    .with_trailers(async { Some(Ok(trailers)) })
                    .boxed_unsync();
                http::Response::new(body)
            })
            .await;
            let response = call_without_body(upstreams, "h2", request_headers())
                .await
                .unwrap();
            assert_eq!(response.status, 200);
            assert_eq!(response.body, Bytes::from_static(b"data"));
            assert_eq!(response.trailers, vec![pair("x-done", "1")]);
        })
        .await;
    }

    #[tokio::test]
    async fn http_call_rejects_missing_pseudo_headers_and_unknown_clusters() {
        in_local_set(async {
            let addr = closed_port().await;
            let upstreams = DirectUpstreams::one("c", addr, Protocol::Http1);
            for missing in [":method", ":path", ":authority"] {
                let headers = request_headers()
                    .into_iter()
                    .filter(|(name, _)| name != missing)
                    .collect();
                let error = call_without_body(Arc::clone(&upstreams), "c", headers)
                    .await
                    .unwrap_err();
                assert!(
                    matches!(&error, CalloutError::BadRequest(m) if m.contains(missing)),
                    "{missing}: {error}"
                );
            }
            let mut bad = request_headers();
            bad.push(pair("bad header", "x"));
            let error = call_without_body(Arc::clone(&upstreams), "c", bad)
                .await
                .unwrap_err();
            assert!(matches!(error, CalloutError::BadRequest(_)), "{error}");
            let error = call_without_body(upstreams, "other", request_headers())
                .await
                .unwrap_err();
            assert_eq!(error, CalloutError::UnknownCluster("other".into()));
        })
        .await;
    }

    #[tokio::test]
    async fn http_call_times_out_when_the_upstream_never_answers() {
        in_local_set(async {
            let upstreams = serve_cluster("slow", Protocol::Http1, never_answers).await;
            let error = http_call(
                upstreams,
                "slow".into(),
                request_headers(),
                Bytes::new(),
                Vec::new(),
                Duration::from_millis(200),
            )
            .await
            .unwrap_err();
            assert_eq!(error, CalloutError::Timeout);
        })
        .await;
    }

    #[tokio::test]
    async fn http_call_refuses_oversized_bodies() {
        in_local_set(async {
            let upstreams = serve_cluster("big", Protocol::Http1, |_request| async {
                http::Response::new(body::full(vec![b'x'; 4096]))
            })
            .await;
            let error = http_call_limited(
                Arc::clone(&upstreams),
                "big".into(),
                request_headers(),
                Bytes::new(),
                Vec::new(),
                Duration::from_secs(10),
                1024,
            )
            .await
            .unwrap_err();
            assert_eq!(error, CalloutError::BodyTooLarge);
            let response = http_call_limited(
                upstreams,
                "big".into(),
                request_headers(),
                Bytes::new(),
                Vec::new(),
                Duration::from_secs(10),
                4096,
            )
            .await
            .unwrap();
            assert_eq!(response.body.len(), 4096);
        })
        .await;
    }

    #[tokio::test]
    async fn http_call_reports_connection_failure() {
        in_local_set(async {
            let upstreams = DirectUpstreams::one("down", closed_port().await, Protocol::Http1);
            let error = call_without_body(upstreams, "down", request_headers())
                .await
                .unwrap_err();
            assert!(matches!(error, CalloutError::Upstream(_)), "{error}");
        })
        .await;
    }

    // ---- gRPC ----

    /// Writes raw response frames to a streamed response body.
    fn streamed_response() -> (UnboundedSender<Frame<Bytes>>, http::Response<BoxBody>) {
        let (tx, rx) = unbounded_channel();
        let mut response = http::Response::new(ChannelBody::new(rx).boxed_unsync());
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        (tx, response)
    }

    /// A gRPC echo server written against raw frames: each request message
    /// comes back as `echo:<message>`, each response frame split in two
    /// chunks; when the request ends it sends trailers. Headers it saw are
    /// reported in response headers.
    async fn grpc_echo(request: Request<Incoming>) -> http::Response<BoxBody> {
        let (parts, mut body) = request.into_parts();
        let (tx, mut response) = streamed_response();
        let seen = |name: &str| {
            parts
                .headers
                .get(name)
                .cloned()
                .unwrap_or(HeaderValue::from_static("absent"))
        };
        let out = response.headers_mut();
        out.insert("x-path", parts.uri.path().parse().unwrap());
        out.insert("x-seen-te", seen("te"));
        out.insert("x-seen-content-type", seen("content-type"));
        out.insert("x-seen-timeout", seen("grpc-timeout"));
        out.insert("x-seen-token", seen("token"));
        tokio::spawn(async move {
            let mut decoder = MessageDecoder::new(MAX_GRPC_MESSAGE_BYTES);
            while let Some(Ok(frame)) = body.frame().await {
                let Ok(chunk) = frame.into_data() else {
                    continue;
                };
                decoder.push(&chunk);
                while let Ok(Some(message)) = decoder.next_message() {
                    let mut reply = b"echo:".to_vec();
                    reply.extend_from_slice(&message);
                    let mut framed = grpc_frame(&reply);
                    let head = framed.split_to(3);
                    let _ = tx.send(Frame::data(head));
                    let _ = tx.send(Frame::data(framed));
                }
            }
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            trailers.insert("grpc-message", HeaderValue::from_static("all%20good"));
            trailers.insert("x-t", HeaderValue::from_static("tail"));
            let _ = tx.send(Frame::trailers(trailers));
        });
        response
    }

    /// Receives events until the close.
    async fn events_until_close(events: &mut UnboundedReceiver<GrpcEvent>) -> Vec<GrpcEvent> {
        let mut all = Vec::new();
        while let Some(event) = events.recv().await {
            let done = matches!(event, GrpcEvent::Close { .. });
            all.push(event);
            if done {
                break;
            }
        }
        all
    }

    /// The close event with `status` and `message`.
    fn closed(status: u32, message: &str) -> GrpcEvent {
        GrpcEvent::Close {
            status,
            message: message.into(),
        }
    }

    /// The status of `event` when it is a close.
    fn close_status(event: &GrpcEvent) -> Option<u32> {
        match event {
            GrpcEvent::Close { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// [`close_status`] of each event.
    fn close_statuses(events: &[GrpcEvent]) -> Vec<Option<u32>> {
        events.iter().map(close_status).collect()
    }

    fn start(
        upstreams: Arc<dyn Upstreams>,
        cluster: &str,
        metadata: Vec<(String, Bytes)>,
        timeout: Option<Duration>,
    ) -> (GrpcStreamHandle, UnboundedReceiver<GrpcEvent>) {
        let (tx, rx) = unbounded_channel();
        let handle = grpc_start(
            upstreams,
            cluster.into(),
            "test.Echo".into(),
            "Chat".into(),
            metadata,
            timeout,
            tx,
        );
        (handle, rx)
    }

    /// Opens a stream and, without sending or closing anything, collects
    /// its events until the close; the handle lives until then.
    async fn events_of_untouched_stream(
        upstreams: Arc<dyn Upstreams>,
        cluster: &str,
        metadata: Vec<(String, Bytes)>,
        timeout: Option<Duration>,
    ) -> Vec<GrpcEvent> {
        let (_handle, mut events) = start(upstreams, cluster, metadata, timeout);
        events_until_close(&mut events).await
    }

    #[tokio::test]
    async fn grpc_stream_echoes_messages_and_reports_trailers() {
        in_local_set(async {
            let upstreams = serve_cluster("grpc", Protocol::Http2, grpc_echo).await;
            let (handle, mut events) = start(
                upstreams,
                "grpc",
                vec![pair("token", "abc"), pair("te", "gzip")],
                Some(Duration::from_secs(30)),
            );
            handle.send(Bytes::from_static(b"one"), false).unwrap();
            handle.send(Bytes::from_static(b"two"), true).unwrap();
            assert!(matches!(
                handle.send(Bytes::from_static(b"late"), false),
                Err(CalloutError::BadRequest(_))
            ));
            let all = events_until_close(&mut events).await;
            assert_eq!(all.len(), 5, "{all:?}");
            let GrpcEvent::InitialMetadata(initial) = &all[0] else {
                panic!("{all:?}");
            };
            assert_eq!(value(initial, "x-path"), Some(&b"/test.Echo/Chat"[..]));
            assert_eq!(value(initial, "x-seen-te"), Some(&b"trailers"[..]));
            assert_eq!(
                value(initial, "x-seen-content-type"),
                Some(&b"application/grpc"[..])
            );
            assert_eq!(value(initial, "x-seen-timeout"), Some(&b"30000m"[..]));
            assert_eq!(value(initial, "x-seen-token"), Some(&b"abc"[..]));
            assert_eq!(all[1], GrpcEvent::Message(Bytes::from_static(b"echo:one")));
            assert_eq!(all[2], GrpcEvent::Message(Bytes::from_static(b"echo:two")));
            let GrpcEvent::TrailingMetadata(trailing) = &all[3] else {
                panic!("{all:?}");
            };
            assert_eq!(value(trailing, "x-t"), Some(&b"tail"[..]));
            assert_eq!(all[4], closed(grpc_status::OK, "all good"));
            // The task ends after the close: the channel is closed.
            assert_eq!(events.recv().await, None);
        })
        .await;
    }

    #[tokio::test]
    async fn grpc_close_half_closes_without_messages() {
        in_local_set(async {
            let upstreams = serve_cluster("grpc", Protocol::Http2, grpc_echo).await;
            let (handle, mut events) = start(upstreams, "grpc", Vec::new(), None);
            handle.close();
            let all = events_until_close(&mut events).await;
            let GrpcEvent::InitialMetadata(initial) = &all[0] else {
                panic!("{all:?}");
            };
            assert_eq!(value(initial, "x-seen-timeout"), Some(&b"absent"[..]));
            assert!(matches!(all[1], GrpcEvent::TrailingMetadata(_)), "{all:?}");
            assert_eq!(all[2], closed(grpc_status::OK, "all good"));
        })
        .await;
    }

    #[tokio::test]
    async fn grpc_trailers_only_response() {
        in_local_set(async {
            let upstreams = serve_cluster("grpc", Protocol::Http2, |_request| async {
                let mut response = http::Response::new(body::empty());
                let headers = response.headers_mut();
                headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
                headers.insert("grpc-status", HeaderValue::from_static("12"));
                headers.insert(
                    "grpc-message",
                    HeaderValue::from_static("no%20such%20method%"),
                );
                response
            })
            .await;
            let all = events_of_untouched_stream(upstreams, "grpc", Vec::new(), None).await;
            assert_eq!(all.len(), 3, "{all:?}");
            assert_eq!(all[0], GrpcEvent::InitialMetadata(Vec::new()));
            let GrpcEvent::TrailingMetadata(trailing) = &all[1] else {
                panic!("{all:?}");
            };
            assert_eq!(value(trailing, "grpc-status"), Some(&b"12"[..]));
            assert_eq!(
                all[2],
                closed(grpc_status::UNIMPLEMENTED, "no such method%")
            );
        })
        .await;
    }

    #[tokio::test]
    async fn grpc_http_error_without_status_maps_to_grpc_code() {
        in_local_set(async {
            let upstreams = serve_cluster("grpc", Protocol::Http2, |_request| async {
                let mut response = http::Response::new(body::full("overloaded"));
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
                response
            })
            .await;
            let all = events_of_untouched_stream(upstreams, "grpc", Vec::new(), None).await;
            assert!(matches!(all[0], GrpcEvent::InitialMetadata(_)), "{all:?}");
            assert_eq!(
                close_status(&all[1]),
                Some(grpc_status::UNAVAILABLE),
                "{all:?}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn grpc_deadline_closes_with_deadline_exceeded() {
        in_local_set(async {
            let upstreams = serve_cluster("grpc", Protocol::Http2, never_answers).await;
            let all = events_of_untouched_stream(
                upstreams,
                "grpc",
                Vec::new(),
                Some(Duration::from_millis(200)),
            )
            .await;
            assert_eq!(
                all,
                vec![closed(grpc_status::DEADLINE_EXCEEDED, "deadline exceeded")]
            );
        })
        .await;
    }

    #[tokio::test]
    async fn grpc_deadline_applies_after_the_head_too() {
        in_local_set(async {
            let upstreams = serve_cluster("grpc", Protocol::Http2, |_request| async {
                // Head now, then nothing: the body never ends.
                let (tx, response) = streamed_response();
                std::mem::forget(tx);
                response
            })
            .await;
            let all = events_of_untouched_stream(
                upstreams,
                "grpc",
                Vec::new(),
                Some(Duration::from_millis(300)),
            )
            .await;
            assert!(matches!(all[0], GrpcEvent::InitialMetadata(_)), "{all:?}");
            assert_eq!(
                all[1],
                closed(grpc_status::DEADLINE_EXCEEDED, "deadline exceeded")
            );
        })
        .await;
    }

    #[tokio::test]
    async fn grpc_unreachable_upstream_is_unavailable() {
        in_local_set(async {
            let upstreams = DirectUpstreams::one("grpc", closed_port().await, Protocol::Http2);
            let all =
                events_of_untouched_stream(Arc::clone(&upstreams), "grpc", Vec::new(), None).await;
            assert_eq!(
                close_statuses(&all),
                [Some(grpc_status::UNAVAILABLE)],
                "{all:?}"
            );
            let all = events_of_untouched_stream(upstreams, "nope", Vec::new(), None).await;
            assert_eq!(
                all,
                vec![closed(grpc_status::UNAVAILABLE, "unknown cluster `nope`")]
            );
        })
        .await;
    }

    #[tokio::test]
    async fn grpc_bad_metadata_closes_with_internal() {
        in_local_set(async {
            let upstreams = serve_cluster("grpc", Protocol::Http2, grpc_echo).await;
            let all =
                events_of_untouched_stream(upstreams, "grpc", vec![pair("bad name", "x")], None)
                    .await;
            assert_eq!(
                close_statuses(&all),
                [Some(grpc_status::INTERNAL)],
                "{all:?}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn grpc_oversized_response_message_is_resource_exhausted() {
        in_local_set(async {
            let upstreams = serve_cluster("grpc", Protocol::Http2, |_request| async {
                let (tx, response) = streamed_response();
                let mut prefix = vec![0u8];
                let too_big = u32::try_from(MAX_GRPC_MESSAGE_BYTES + 1).unwrap();
                prefix.extend_from_slice(&too_big.to_be_bytes());
                let _ = tx.send(Frame::data(Bytes::from(prefix)));
                std::mem::forget(tx);
                response
            })
            .await;
            let all = events_of_untouched_stream(upstreams, "grpc", Vec::new(), None).await;
            assert_eq!(
                all.last().and_then(close_status),
                Some(grpc_status::RESOURCE_EXHAUSTED),
                "{all:?}"
            );
        })
        .await;
    }

    #[tokio::test]
    async fn grpc_cancel_delivers_no_event() {
        in_local_set(async {
            let (seen_tx, mut seen_rx) = unbounded_channel::<()>();
            let upstreams = serve_cluster("grpc", Protocol::Http2, move |_request| {
                let seen_tx = seen_tx.clone();
                async move {
                    let _ = seen_tx.send(());
                    std::future::pending::<()>().await;
                    http::Response::new(body::empty())
                }
            })
            .await;
            let (handle, mut events) = start(upstreams, "grpc", Vec::new(), None);
            // Wait until the request reached the server, then cancel.
            seen_rx.recv().await.unwrap();
            handle.cancel();
            assert!(matches!(
                handle.send(Bytes::new(), false),
                Err(CalloutError::BadRequest(_))
            ));
            // The task is gone without a word: the channel just closes.
            assert_eq!(events.recv().await, None);
        })
        .await;
    }

    #[test]
    fn decoder_reassembles_messages_split_anywhere() {
        let mut stream = Vec::new();
        for message in [&b"first"[..], b"", b"third message"] {
            stream.extend_from_slice(&grpc_frame(message));
        }
        for chunk_size in 1..stream.len() {
            let mut decoder = MessageDecoder::new(64);
            let mut messages = Vec::new();
            for chunk in stream.chunks(chunk_size) {
                decoder.push(chunk);
                while let Some(message) = decoder.next_message().unwrap() {
                    messages.push(message);
                }
            }
            assert_eq!(
                messages,
                vec![
                    Bytes::from_static(b"first"),
                    Bytes::new(),
                    Bytes::from_static(b"third message")
                ]
            );
            assert!(!decoder.has_partial());
        }
    }

    #[test]
    fn decoder_refuses_compressed_and_oversized_frames() {
        let mut decoder = MessageDecoder::new(4);
        decoder.push(&[1, 0, 0, 0, 1, b'x']);
        assert_eq!(
            decoder.next_message().unwrap_err().status,
            grpc_status::INTERNAL
        );
        let mut decoder = MessageDecoder::new(4);
        decoder.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            decoder.next_message().unwrap_err().status,
            grpc_status::RESOURCE_EXHAUSTED
        );
        let mut decoder = MessageDecoder::new(4);
        decoder.push(&[0, 0, 0]);
        assert_eq!(decoder.next_message(), Ok(None));
        assert!(decoder.has_partial());
    }

    #[test]
    fn frames_have_a_length_prefix() {
        assert_eq!(&grpc_frame(b"ab")[..], &[0, 0, 0, 0, 2, b'a', b'b']);
    }

    #[test]
    fn grpc_timeout_fits_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(grpc_timeout(Duration::from_micros(250)), "250u");
        assert_eq!(grpc_timeout(Duration::ZERO), "0u");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000_000)), "3333333M");
        assert_eq!(grpc_timeout(Duration::MAX), "99999999H");
    }

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(percent_decode(b"a%20b%2"), "a b%2");
        assert_eq!(percent_decode(b"%E2%9C%93 ok%zz"), "\u{2713} ok%zz");
        assert_eq!(percent_decode(b"%ff"), "\u{fffd}");
    }

    #[test]
    fn status_comes_from_trailers() {
        let mut map = HeaderMap::new();
        assert_eq!(status_of(&map).status, grpc_status::UNKNOWN);
        map.insert("grpc-status", HeaderValue::from_static("nine"));
        assert_eq!(status_of(&map).status, grpc_status::UNKNOWN);
        map.insert("grpc-status", HeaderValue::from_static("9"));
        map.insert("grpc-message", HeaderValue::from_static("stop"));
        assert_eq!(status_of(&map), Closed::new(9, "stop"));
    }

    #[test]
    fn http_status_maps_to_grpc_status() {
        assert_eq!(
            grpc_status_of_http(StatusCode::NOT_FOUND),
            grpc_status::UNIMPLEMENTED
        );
        assert_eq!(
            grpc_status_of_http(StatusCode::UNAUTHORIZED),
            grpc_status::UNAUTHENTICATED
        );
        assert_eq!(
            grpc_status_of_http(StatusCode::IM_A_TEAPOT),
            grpc_status::UNKNOWN
        );
    }
}
