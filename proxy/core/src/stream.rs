//! Per-request and per-connection state shared by the data plane and its filters.
//!
//! The data plane owns the request while it moves; filters see it through a
//! [`SharedStream`] handle. Filters run on the worker thread that owns the
//! request, so the handle is a cheap `Rc<RefCell<_>>`: the data plane never
//! holds a borrow across a filter call, and a filter may keep the handle to
//! touch the stream again later (for example after an HTTP callout).

use std::cell::RefCell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use http::{HeaderMap, StatusCode};
use tokio::sync::Notify;

use crate::error::ResponseFlag;

/// Facts about a request or connection, readable by filters as properties.
#[derive(Debug, Clone)]
pub struct StreamInfo {
    /// Process-unique id of the downstream connection.
    pub connection_id: u64,
    /// The client's address.
    pub downstream_remote: SocketAddr,
    /// The address the client connected to.
    pub downstream_local: SocketAddr,
    /// HTTP version of the downstream request (HTTP_11 for raw TCP).
    pub protocol: http::Version,
    /// When the request (or connection) started, wall clock.
    pub start_time: SystemTime,
    /// When the request (or connection) started, monotonic.
    pub start_instant: Instant,
    /// The listener that accepted it.
    pub listener_name: Arc<str>,
    /// The route that matched, once routing happened.
    pub route_name: Option<Arc<str>>,
    /// The cluster the request goes to, once routing happened.
    pub cluster_name: Option<Arc<str>>,
    /// The upstream endpoint of the last attempt.
    pub upstream_address: Option<SocketAddr>,
    /// Status sent downstream, once known.
    pub response_code: Option<u16>,
    /// Why the proxy answered itself, if it did.
    pub response_flag: Option<ResponseFlag>,
    /// Free text detail of a local reply (proxy-wasm `details`).
    pub response_code_details: Option<String>,
    /// Request body bytes received from downstream.
    pub request_body_bytes: u64,
    /// Response body bytes sent downstream.
    pub response_body_bytes: u64,
    /// Number of upstream attempts made.
    pub attempt_count: u32,
    /// What the downstream TLS handshake established; `None` for plaintext.
    pub tls: Option<Arc<TlsFacts>>,
    /// The upstream connection of the last attempt, once one answered (HTTP)
    /// or was made (TCP).
    pub upstream_connection: Option<Arc<UpstreamConnection>>,
}

/// One upstream connection as plugins see it (`upstream.*`): made once per
/// connection and shared by every request it carries.
#[derive(Debug)]
pub struct UpstreamConnection {
    /// This proxy's address on the connection.
    pub local_address: Option<SocketAddr>,
    /// What the TLS handshake established; `None` for plaintext.
    pub tls: Option<Box<dyn UpstreamTls>>,
}

/// What an upstream TLS handshake established, in the encodings of Envoy's
/// `upstream.*` properties. Certificates are parsed on first use, when a
/// plugin asks, not per connection.
pub trait UpstreamTls: std::fmt::Debug + Send + Sync {
    /// `TLSv1.3`.
    fn version(&self) -> &str;
    /// This proxy's certificate on the connection.
    fn local_certificate(&self) -> Option<&CertificateFacts>;
    /// The server's certificate.
    fn peer_certificate(&self) -> Option<&CertificateFacts>;
}

/// What one certificate says, as Envoy encodes it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CertificateFacts {
    /// RFC 2253.
    pub subject: String,
    pub uri_sans: Vec<String>,
    pub dns_sans: Vec<String>,
    /// SHA-256 of the DER, lowercase hex.
    pub sha256: String,
}

/// What a downstream TLS handshake established, in the encodings of Envoy's
/// `connection.*` properties.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFacts {
    /// `TLSv1.3`.
    pub version: String,
    /// The SNI the client sent (empty when none).
    pub requested_server_name: String,
    /// Whether the client presented a verified certificate.
    pub mtls: bool,
    /// URI SANs of the client's certificate (its SPIFFE ID first).
    pub peer_uri_sans: Vec<String>,
    /// The client certificate's subject, RFC 2253.
    pub peer_subject: String,
    /// SHA-256 of the client certificate's DER, lowercase hex.
    pub peer_sha256: String,
    /// URI SANs of this proxy's own certificate.
    pub local_uri_sans: Vec<String>,
}

impl StreamInfo {
    /// Info for a new stream on a connection, starting now.
    pub fn new(
        connection_id: u64,
        downstream_remote: SocketAddr,
        downstream_local: SocketAddr,
        listener_name: Arc<str>,
    ) -> Self {
        Self::started(
            connection_id,
            downstream_remote,
            downstream_local,
            listener_name,
            (SystemTime::now(), Instant::now()),
        )
    }

    /// Info for a stream that started at `(wall clock, monotonic)`, read
    /// once by the caller (a request's two clock reads are not repeated).
    pub fn started(
        connection_id: u64,
        downstream_remote: SocketAddr,
        downstream_local: SocketAddr,
        listener_name: Arc<str>,
        (start_time, start_instant): (SystemTime, Instant),
    ) -> Self {
        Self {
            connection_id,
            downstream_remote,
            downstream_local,
            protocol: http::Version::HTTP_11,
            start_time,
            start_instant,
            listener_name,
            route_name: None,
            cluster_name: None,
            upstream_address: None,
            response_code: None,
            response_flag: None,
            response_code_details: None,
            request_body_bytes: 0,
            response_body_bytes: 0,
            attempt_count: 0,
            tls: None,
            upstream_connection: None,
        }
    }
}

/// The protocol name as proxy-wasm (`request.protocol`) and the access log spell it.
pub fn protocol_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

/// A reply the proxy sends itself instead of (or in place of) the upstream's.
#[derive(Debug, Clone)]
pub struct LocalReply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// Why (proxy-wasm `details`; logged and exposed as `response.code_details`).
    pub details: String,
    /// Access-log flag.
    pub flag: ResponseFlag,
}

impl LocalReply {
    /// A plain-text reply with a flag and no extra headers.
    pub fn new(status: StatusCode, body: impl Into<Bytes>, flag: ResponseFlag) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
            body: body.into(),
            details: String::new(),
            flag,
        }
    }
}

/// The state of one HTTP request/response exchange.
#[derive(Debug)]
pub struct HttpStream {
    pub info: StreamInfo,
    /// Request line and headers. Pseudo-headers map to `method`, `uri` and `version`.
    pub request: http::request::Parts,
    /// Request body bytes currently buffered for filters.
    pub request_body: BytesMut,
    /// Request trailers, once received.
    pub request_trailers: Option<HeaderMap>,
    /// Response status and headers, once the upstream answered.
    pub response: Option<http::response::Parts>,
    /// Response body bytes currently buffered for filters.
    pub response_body: BytesMut,
    /// Response trailers, once received.
    pub response_trailers: Option<HeaderMap>,
    /// Set by a filter to answer locally; the data plane sends it after the callback.
    pub local_reply: Option<LocalReply>,
    /// Set by a filter to reset the stream (proxy-wasm close_stream).
    pub reset: bool,
    /// Per-stream properties set by filters (`proxy_set_property`).
    pub filter_state: HashMap<String, Bytes>,
    resume: Rc<Notify>,
}

/// Handle to a stream shared between the data plane and its filters.
pub type SharedStream = Rc<RefCell<HttpStream>>;

impl HttpStream {
    /// A stream for a request whose head has been read.
    pub fn new(info: StreamInfo, request: http::request::Parts) -> Self {
        Self {
            info,
            request,
            request_body: BytesMut::new(),
            request_trailers: None,
            response: None,
            response_body: BytesMut::new(),
            response_trailers: None,
            local_reply: None,
            reset: false,
            filter_state: HashMap::new(),
            resume: Rc::new(Notify::new()),
        }
    }

    /// Wraps the stream in a shared handle.
    pub fn shared(self) -> SharedStream {
        Rc::new(RefCell::new(self))
    }

    /// Wakes the data plane if it is paused on this stream (proxy-wasm continue_stream).
    /// A resume that comes before the pause is remembered.
    pub fn resume(&self) {
        self.resume.notify_one();
    }

    /// Future that completes on the next [`HttpStream::resume`]. Take it, drop the
    /// borrow, then await it.
    pub fn resumed(&self) -> Rc<Notify> {
        self.resume.clone()
    }
}

/// The state of one proxied TCP connection, for network filters.
#[derive(Debug)]
pub struct ConnectionStream {
    pub info: StreamInfo,
    /// Bytes from downstream not yet forwarded (visible in on_downstream_data).
    pub downstream_data: BytesMut,
    /// Bytes from upstream not yet forwarded (visible in on_upstream_data).
    pub upstream_data: BytesMut,
    /// Set by a filter to close the connection.
    pub close: bool,
    /// Per-connection properties set by filters.
    pub filter_state: HashMap<String, Bytes>,
    resume: Rc<Notify>,
}

/// Handle to a connection shared between the data plane and its filters.
pub type SharedConnection = Rc<RefCell<ConnectionStream>>;

impl ConnectionStream {
    /// State for a newly accepted connection.
    pub fn new(info: StreamInfo) -> Self {
        Self {
            info,
            downstream_data: BytesMut::new(),
            upstream_data: BytesMut::new(),
            close: false,
            filter_state: HashMap::new(),
            resume: Rc::new(Notify::new()),
        }
    }

    /// Wraps the state in a shared handle.
    pub fn shared(self) -> SharedConnection {
        Rc::new(RefCell::new(self))
    }

    /// Wakes the data plane if it is paused on this connection.
    pub fn resume(&self) {
        self.resume.notify_one();
    }

    /// The notifier [`ConnectionStream::resume`] fires.
    pub fn resumed(&self) -> Rc<Notify> {
        self.resume.clone()
    }
}
