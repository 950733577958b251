//! The one place an error becomes a response the client sees.

use http::{HeaderValue, Response, StatusCode, header};
use lacewing_core::ProxyError;
use lacewing_core::stream::LocalReply;

use super::body::ProxyBody;

static TEXT_PLAIN: HeaderValue = HeaderValue::from_static("text/plain; charset=utf-8");

/// The response for a proxying failure: status by error kind, a one-line body.
pub fn from_error(err: &ProxyError) -> Response<ProxyBody> {
    let status = err.status();
    let reason = status.canonical_reason().unwrap_or("error");
    text(status, format!("{} {}: {}\n", status.as_u16(), reason, err))
}

/// A plain-text response.
pub fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, TEXT_PLAIN.clone());
    resp
}

/// The response for a reply a filter asked for.
pub fn from_local(reply: LocalReply) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::full(reply.body));
    *resp.status_mut() = reply.status;
    *resp.headers_mut() = reply.headers;
    resp
}

/// 400 for a request the proxy will not forward; the connection is closed after it.
pub fn bad_request(reason: &str) -> Response<ProxyBody> {
    let mut resp = text(
        StatusCode::BAD_REQUEST,
        format!("400 Bad Request: {reason}\n"),
    );
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}
