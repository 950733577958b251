//! `proxy_http_call`: the module's header pairs (with the `:method`,
//! `:path`, `:authority` pseudo-headers), body and trailers become a request
//! sent through [`Upstreams`]; the whole response is collected under a size
//! limit.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, HOST, TRAILER, TRANSFER_ENCODING};
use http::{HeaderMap, HeaderName, Method, Request};
use http_body::Frame;
use http_body_util::BodyExt;
use lacewing_core::body::{self, BoxBody};
use lacewing_core::callout::Upstreams;
use tokio::sync::mpsc::unbounded_channel;

use super::body::ChannelBody;
use super::{CalloutError, MAX_HTTP_CALL_RESPONSE_BYTES, header_name, header_value, pairs};

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
/// `headers` must hold `:method`, `:path` and `:authority` (or a `host`
/// header in its place); `:scheme` is optional and other pseudo-headers are
/// ignored. The request goes out with an origin-form URI and `:authority` as
/// its `host` header; framing headers
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
    // A `host` header stands for a missing `:authority` (Envoy's header map
    // holds both under one name).
    match authority {
        Some(authority) if !authority.is_empty() => {
            if !map.contains_key(HOST) {
                map.insert(HOST, header_value(":authority", &authority)?);
            }
        }
        _ => {
            if map.get(HOST).is_none_or(|host| host.is_empty()) {
                return Err(missing(":authority"));
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderValue, StatusCode};
    use hyper::body::Incoming;

    use crate::callout::test_support::{
        DirectUpstreams, Protocol, closed_port, in_local_set, never_answers, pair, serve_cluster,
        value,
    };

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

    /// `GET /` with the header `name: value` (`:authority` or `host`).
    fn get_root(name: &str, value: &str) -> Vec<(String, Bytes)> {
        vec![
            pair(":method", "GET"),
            pair(":path", "/"),
            pair(name, value),
        ]
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
            let response = call_without_body(upstreams, "echo", get_root(":authority", "a"))
                .await
                .unwrap();
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
    async fn http_call_takes_host_as_the_authority_when_there_is_none() {
        in_local_set(async {
            let upstreams = serve_cluster("echo", Protocol::Http1, echo).await;
            let headers = get_root("host", "by-host.test");
            let response = call_without_body(Arc::clone(&upstreams), "echo", headers)
                .await
                .unwrap();
            assert_eq!(
                value(&response.headers, "x-host"),
                Some(&b"by-host.test"[..])
            );
            let error = call_without_body(upstreams, "echo", get_root("host", ""))
                .await
                .unwrap_err();
            assert!(
                matches!(&error, CalloutError::BadRequest(m) if m.contains(":authority")),
                "{error}"
            );
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
}
