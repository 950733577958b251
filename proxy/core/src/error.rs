//! Errors of the data plane, each knowing its origin and whether a retry may help.

use std::time::Duration;

/// Where an error came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorOrigin {
    /// The client side of the proxy.
    Downstream,
    /// The upstream service or the path to it.
    Upstream,
    /// The proxy itself (config, filters, limits).
    Internal,
}

/// Short flags written to the access log, in the spirit of Envoy's response flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFlag {
    /// UF: could not connect to the upstream.
    UpstreamConnectionFailure,
    /// UH: no healthy endpoint in the cluster.
    NoHealthyUpstream,
    /// UT: the upstream did not answer in time.
    UpstreamRequestTimeout,
    /// UC: the upstream connection closed mid-request.
    UpstreamConnectionTermination,
    /// UO: a circuit-breaker limit was hit.
    UpstreamOverflow,
    /// NR: no route matched.
    NoRouteFound,
    /// DC: the client went away.
    DownstreamConnectionTermination,
    /// LR: a filter answered locally.
    LocalReply,
    /// FF: a filter failed (trap, deadline, memory) and the plugin fails closed.
    FilterFailure,
    /// PT: the request or its body exceeded a configured limit.
    PayloadTooLarge,
    /// FT: a filter paused the stream and did not resume it in time.
    FilterTimeout,
    /// DPE: the request's framing is ambiguous or malformed.
    DownstreamProtocolError,
    /// UPE: the upstream's response framing is ambiguous, or its body ended
    /// before its framing said it would.
    UpstreamProtocolError,
    /// SI: the exchange made no progress within the listener's
    /// `stream_idle_timeout`, or the client took no response data within its
    /// `write_timeout` (it stopped reading, or opened no HTTP/2 window).
    StreamIdleTimeout,
}

impl ResponseFlag {
    /// The short code written to the access log.
    pub fn code(self) -> &'static str {
        match self {
            Self::UpstreamConnectionFailure => "UF",
            Self::NoHealthyUpstream => "UH",
            Self::UpstreamRequestTimeout => "UT",
            Self::UpstreamConnectionTermination => "UC",
            Self::UpstreamOverflow => "UO",
            Self::NoRouteFound => "NR",
            Self::DownstreamConnectionTermination => "DC",
            Self::LocalReply => "LR",
            Self::FilterFailure => "FF",
            Self::PayloadTooLarge => "PT",
            Self::FilterTimeout => "FT",
            Self::DownstreamProtocolError => "DPE",
            Self::UpstreamProtocolError => "UPE",
            Self::StreamIdleTimeout => "SI",
        }
    }
}

/// A failure while proxying one request.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for {authority}{path}")]
    NoRoute { authority: String, path: String },
    #[error("cluster `{0}` has no healthy endpoint")]
    NoHealthyUpstream(String),
    #[error("connect to {endpoint} failed: {reason}")]
    Connect { endpoint: String, reason: String },
    #[error("upstream did not answer within {0:?}")]
    UpstreamTimeout(Duration),
    /// The response head came, then no body byte for this long.
    #[error("upstream response body stalled for {0:?}")]
    UpstreamBodyTimeout(Duration),
    /// The exchange was still streaming its response body at the listener's
    /// `max_stream_duration`.
    #[error("exchange still streaming after max_stream_duration {0:?}")]
    StreamDuration(Duration),
    /// Neither the client nor the upstream moved the exchange on for this long.
    #[error("stream idle for {0:?}")]
    StreamIdle(Duration),
    #[error("upstream connection failed: {0}")]
    UpstreamReset(String),
    #[error("circuit breaker open on cluster `{cluster}`: {limit}")]
    Overflow {
        cluster: String,
        limit: &'static str,
    },
    #[error("request body exceeds the {limit} byte buffer limit")]
    BodyTooLarge { limit: usize },
    #[error("filter `{plugin}` failed: {reason}")]
    Filter { plugin: String, reason: String },
    #[error("filter `{filter}` paused the stream and did not resume it within {limit:?}")]
    FilterTimeout { filter: String, limit: Duration },
    #[error("malformed or truncated request body")]
    DownstreamBody,
    #[error("both Content-Length and Transfer-Encoding")]
    AmbiguousFraming,
    /// Host and `:authority` are missing a single, valid, agreeing value.
    #[error("invalid request authority: {0}")]
    InvalidAuthority(String),
    /// An HTTP/2 request with more header fields than the listener's
    /// `max_header_count` (hyper counts HTTP/1.1 header lines itself).
    #[error("more than {0} request header fields")]
    TooManyHeaders(usize),
    /// No route accepts this method (CONNECT unless a route names it).
    #[error("method {0} is not allowed by any route")]
    MethodNotAllowed(String),
    /// The upstream's response cannot be forwarded as it was framed.
    #[error("upstream response framing: {0}")]
    UpstreamFraming(&'static str),
}

impl ProxyError {
    /// Where the failure started.
    pub fn origin(&self) -> ErrorOrigin {
        match self {
            Self::NoRoute { .. }
            | Self::BodyTooLarge { .. }
            | Self::Filter { .. }
            | Self::FilterTimeout { .. } => ErrorOrigin::Internal,
            Self::DownstreamBody
            | Self::AmbiguousFraming
            | Self::InvalidAuthority(_)
            | Self::TooManyHeaders(_)
            | Self::StreamIdle(_) => ErrorOrigin::Downstream,
            Self::MethodNotAllowed(_) => ErrorOrigin::Internal,
            Self::Overflow { .. } => ErrorOrigin::Internal,
            Self::NoHealthyUpstream(_)
            | Self::Connect { .. }
            | Self::UpstreamTimeout(_)
            | Self::UpstreamBodyTimeout(_)
            | Self::StreamDuration(_)
            | Self::UpstreamReset(_)
            | Self::UpstreamFraming(_) => ErrorOrigin::Upstream,
        }
    }

    /// Whether sending the request again (to another endpoint) may help.
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Connect { .. })
    }

    /// The HTTP status the client sees.
    pub fn status(&self) -> http::StatusCode {
        use http::StatusCode as S;
        match self {
            Self::NoRoute { .. } => S::NOT_FOUND,
            Self::NoHealthyUpstream(_) | Self::Overflow { .. } | Self::Filter { .. } => {
                S::SERVICE_UNAVAILABLE
            }
            Self::Connect { .. } | Self::UpstreamReset(_) | Self::UpstreamFraming(_) => {
                S::BAD_GATEWAY
            }
            Self::UpstreamTimeout(_)
            | Self::UpstreamBodyTimeout(_)
            | Self::StreamDuration(_)
            | Self::FilterTimeout { .. } => S::GATEWAY_TIMEOUT,
            Self::BodyTooLarge { .. } => S::PAYLOAD_TOO_LARGE,
            Self::TooManyHeaders(_) => S::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::DownstreamBody | Self::AmbiguousFraming | Self::InvalidAuthority(_) => {
                S::BAD_REQUEST
            }
            Self::MethodNotAllowed(_) => S::METHOD_NOT_ALLOWED,
            Self::StreamIdle(_) => S::REQUEST_TIMEOUT,
        }
    }

    /// The access-log flag.
    pub fn flag(&self) -> ResponseFlag {
        match self {
            Self::NoRoute { .. } => ResponseFlag::NoRouteFound,
            Self::NoHealthyUpstream(_) => ResponseFlag::NoHealthyUpstream,
            Self::Connect { .. } => ResponseFlag::UpstreamConnectionFailure,
            Self::UpstreamTimeout(_) | Self::UpstreamBodyTimeout(_) | Self::StreamDuration(_) => {
                ResponseFlag::UpstreamRequestTimeout
            }
            Self::UpstreamReset(_) => ResponseFlag::UpstreamConnectionTermination,
            Self::Overflow { .. } => ResponseFlag::UpstreamOverflow,
            Self::BodyTooLarge { .. } | Self::TooManyHeaders(_) => ResponseFlag::PayloadTooLarge,
            Self::Filter { .. } => ResponseFlag::FilterFailure,
            Self::FilterTimeout { .. } => ResponseFlag::FilterTimeout,
            Self::DownstreamBody => ResponseFlag::DownstreamConnectionTermination,
            Self::AmbiguousFraming | Self::InvalidAuthority(_) => {
                ResponseFlag::DownstreamProtocolError
            }
            Self::MethodNotAllowed(_) => ResponseFlag::NoRouteFound,
            Self::UpstreamFraming(_) => ResponseFlag::UpstreamProtocolError,
            Self::StreamIdle(_) => ResponseFlag::StreamIdleTimeout,
        }
    }
}
