//! A gRPC stream on the worker's `LocalSet` (`proxy_grpc_call`,
//! `proxy_grpc_stream`): messages the module sends are framed onto the
//! request body, response frames are parsed as they arrive, and what the
//! module must hear about comes back as [`GrpcEvent`]s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, TE, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use http_body::Frame;
use http_body_util::BodyExt;
use lacewing_core::ProxyError;
use lacewing_core::body::BoxBody;
use lacewing_core::callout::Upstreams;
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};

use super::body::ChannelBody;
use super::grpc_frame::{
    Closed, MessageDecoder, grpc_frame, grpc_status_of_http, grpc_timeout, status_of,
};
use super::{CalloutError, MAX_GRPC_MESSAGE_BYTES, grpc_status, header_name, header_value, pairs};

/// How long a gRPC stream without a deadline may wait for its response head
/// (a server may answer only once the client finished sending).
const NO_DEADLINE_HEAD_WAIT: Duration = Duration::from_secs(365 * 24 * 3600);

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

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::body::Incoming;
    use lacewing_core::body;
    use tokio::sync::mpsc::UnboundedReceiver;

    use crate::callout::test_support::{
        DirectUpstreams, Protocol, closed_port, in_local_set, never_answers, pair, serve_cluster,
        value,
    };

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
}
