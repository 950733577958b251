//! The one place a failure or a filter's verdict becomes the reply the client
//! sees, with its typed response flag.
//!
//! Every reply the proxy makes itself is a [`LocalReply`]: the forwarding path
//! runs it through the response phases of the filters that saw the request
//! (see [`crate::chain`]) and records it with its route, cluster and flag.

use http::{HeaderMap, HeaderValue, Response, header};
use lacewing_core::stream::LocalReply;
use lacewing_core::{ErrorOrigin, ProxyError};

use super::body::ProxyBody;
use crate::chain::Stop;

static TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");
static CLOSE: HeaderValue = HeaderValue::from_static("close");
/// What a 405 offers instead: every method but CONNECT.
static ALLOW: HeaderValue =
    HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, OPTIONS, TRACE, PATCH");

/// What ends an exchange the proxy answers itself.
#[derive(Debug)]
pub enum Answer {
    /// Send this reply.
    Reply(LocalReply),
    /// Reset the stream (HTTP/2) or close the connection (HTTP/1).
    Reset,
}

/// The answer for a chain's stop.
pub fn from_stop(stop: Stop) -> Answer {
    match stop {
        Stop::Reply(reply) => Answer::Reply(*reply),
        Stop::Reset => Answer::Reset,
        Stop::Error(err) => Answer::Reply(from_error(&err)),
    }
}

/// The reply for a proxying failure: status and flag by error kind, a
/// one-line text body. A failure the client caused closes its connection.
pub fn from_error(err: &ProxyError) -> LocalReply {
    let status = err.status();
    let reason = status.canonical_reason().unwrap_or("error");
    let mut headers = HeaderMap::with_capacity(2);
    headers.insert(header::CONTENT_TYPE, TEXT_PLAIN.clone());
    if err.origin() == ErrorOrigin::Downstream {
        headers.insert(header::CONNECTION, CLOSE.clone());
    }
    if status == http::StatusCode::METHOD_NOT_ALLOWED {
        headers.insert(header::ALLOW, ALLOW.clone());
    }
    LocalReply {
        status,
        headers,
        body: format!("{} {reason}: {err}\n", status.as_u16()).into(),
        details: err.to_string(),
        flag: err.flag(),
    }
}

/// The response for a reply, as it goes downstream.
pub fn into_response(reply: LocalReply, version: http::Version) -> Response<ProxyBody> {
    let length = reply.body.len();
    let mut resp = Response::new(ProxyBody::full(reply.body));
    *resp.status_mut() = reply.status;
    *resp.version_mut() = version;
    *resp.headers_mut() = reply.headers;
    if length > 0 {
        // As in Envoy, the reply states its length before the response phases
        // run: filters that read the body may pass it on in pieces.
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::StatusCode;
    use lacewing_core::ResponseFlag;

    #[test]
    fn errors_map_to_status_flag_and_text() {
        let reply = from_error(&ProxyError::NoRoute {
            authority: "a".into(),
            path: "/x".into(),
        });
        assert_eq!(reply.status, StatusCode::NOT_FOUND);
        assert_eq!(reply.flag, ResponseFlag::NoRouteFound);
        assert_eq!(reply.headers[header::CONTENT_TYPE], TEXT_PLAIN);
        assert!(!reply.headers.contains_key(header::CONNECTION));
        assert_eq!(reply.body, "404 Not Found: no route for a/x\n");
    }

    #[test]
    fn client_faults_close_the_connection() {
        for err in [ProxyError::DownstreamBody, ProxyError::AmbiguousFraming] {
            let reply = from_error(&err);
            assert_eq!(reply.status, StatusCode::BAD_REQUEST);
            assert_eq!(reply.headers[header::CONNECTION], CLOSE, "{err}");
        }
        assert_eq!(
            from_error(&ProxyError::AmbiguousFraming).flag,
            ResponseFlag::DownstreamProtocolError
        );
    }

    #[test]
    fn a_filter_that_never_resumes_is_not_an_upstream_timeout() {
        let reply = from_error(&ProxyError::FilterTimeout {
            filter: "auth".into(),
            limit: std::time::Duration::from_secs(1),
        });
        assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
        assert_eq!(reply.flag, ResponseFlag::FilterTimeout);
        assert_eq!(reply.flag.code(), "FT");
        assert!(reply.details.contains("`auth`"), "{}", reply.details);
    }
}
