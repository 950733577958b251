//! The admin listener: `/metrics`, `/ready`, `/config_dump`, on loopback by
//! default (elsewhere only when `admin.allow_remote` says so), with plugin
//! secrets redacted unless `admin.expose_secrets` says otherwise.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use lacewing_core::drain::DrainWatch;
use lacewing_core::metrics::Metrics;
use tokio::net::TcpListener;

use crate::publish::Publisher;

/// What the admin endpoints read.
#[derive(Debug, Clone)]
pub struct AdminState {
    pub metrics: Metrics,
    /// The live generation and its configuration.
    pub publisher: Publisher,
    /// True once every worker accepts; false again when draining.
    pub ready: Arc<AtomicBool>,
}

const INDEX: &str = "lacewing admin\n\n/metrics      Prometheus metrics\n/ready        200 when serving, 503 when starting or draining\n/config_dump  the live configuration as JSON, with its generation number and source (plugin secrets redacted unless admin.expose_secrets)\n";

/// What a redacted plugin value reads in `/config_dump`.
pub const REDACTED: &str = "[redacted]";

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    resp
}

/// Answers one admin request.
pub fn route(state: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "use GET\n");
    }
    match req.uri().path() {
        "/" => reply(StatusCode::OK, "text/plain", INDEX),
        "/metrics" => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            state.metrics.render(),
        ),
        "/ready" => {
            if state.ready.load(Ordering::Acquire) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        "/config_dump" => match config_dump(&state.publisher) {
            Ok(json) => reply(StatusCode::OK, "application/json", json),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("cannot serialize config: {e}\n"),
            ),
        },
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found; see /\n"),
    }
}

/// The live configuration as JSON, with a `generation` member: its number
/// and where it came from.
fn config_dump(publisher: &Publisher) -> Result<Vec<u8>, serde_json::Error> {
    let Some(live) = publisher.live() else {
        return Ok(b"{}".to_vec());
    };
    let mut json = serde_json::to_value(&*live.config)?;
    if !live.config.admin.expose_secrets {
        redact_plugins(&mut json);
    }
    if let Some(object) = json.as_object_mut() {
        object.insert("generation".into(), serde_json::to_value(&live.generation)?);
    }
    serde_json::to_vec_pretty(&json)
}

/// Replaces what plugins are configured with (`configuration`,
/// `vm_configuration`, each `env` value) by [`REDACTED`]: they often hold
/// keys and tokens. Names and structure stay visible.
fn redact_plugins(json: &mut serde_json::Value) {
    let Some(plugins) = json.get_mut("plugins").and_then(|p| p.as_array_mut()) else {
        return;
    };
    let redacted = || serde_json::Value::String(REDACTED.into());
    for plugin in plugins.iter_mut().filter_map(|p| p.as_object_mut()) {
        for key in ["configuration", "vm_configuration"] {
            if let Some(value) = plugin.get_mut(key)
                && !value.is_null()
            {
                *value = redacted();
            }
        }
        if let Some(env) = plugin.get_mut("env").and_then(|e| e.as_object_mut()) {
            env.values_mut().for_each(|v| *v = redacted());
        }
    }
}

/// Serves the admin endpoints until `stop` fires. While the proxy drains it
/// keeps answering, with `/ready` = 503.
pub async fn serve(
    listener: TcpListener,
    state: AdminState,
    mut drain: DrainWatch,
    mut stop: DrainWatch,
) {
    if let Ok(address) = listener.local_addr()
        && !address.ip().is_loopback()
    {
        tracing::warn!(
            %address,
            "the admin endpoint, which has no authentication, listens beyond loopback (admin.allow_remote)"
        );
    }
    let mut draining = false;
    let mut backoff = crate::accept::AcceptBackoff::new(
        "admin",
        state.metrics.accept_failures.with_label_values(&["admin"]),
    );
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.signaled(), if !draining => {
                draining = true;
                state.ready.store(false, Ordering::Release);
                continue;
            }
            _ = stop.signaled() => return,
        };
        let stream = match accepted {
            Ok((stream, _)) => {
                backoff.succeeded();
                stream
            }
            Err(e) => {
                // Out of descriptors: wait for some to free up instead of spinning.
                let wait = backoff.failed(&e);
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    _ = stop.signaled() => return,
                }
            }
        };
        let state = state.clone();
        let header_read_timeout = state.publisher.live().map_or_else(
            || lacewing_config::AdminConfig::default().header_read_timeout,
            |live| live.config.admin.header_read_timeout,
        );
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let resp = route(&state, &req);
                async move { Ok::<_, Infallible>(resp) }
            });
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_read_timeout.0);
            builder.http2().timer(TokioTimer::new());
            let _ = builder
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
