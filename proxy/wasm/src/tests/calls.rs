//! Work that completes later on the worker: ticks, queues, HTTP callouts.

use std::net::SocketAddr;
use std::time::Duration;

use lacewing_abi::{Status, pairs};
use lacewing_core::filter::FilterStatus;

use super::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Waits (bounded) until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    for _ in 0..500 {
        if done() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}");
}

#[test]
fn tick_timer_fires_on_the_worker() {
    let (host, _) = host();
    let bytes = module(
        "",
        r#"(global $ticks (mut i32) (i32.const 0))
           (data (i32.const 100) "ticks")
           (func (export "proxy_on_configure") (param i32 i32) (result i32)
             (drop (call $set_tick (i32.const 5)))
             i32.const 1)
           (func (export "proxy_on_tick") (param i32)
             (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
             (call $record (i32.const 100) (i32.const 5) (global.get $ticks)))"#,
    );
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    // The load-time instance never ticks.
    assert_eq!(recorded(&host, "ticks"), None);
    tokio::task::LocalSet::new().block_on(&runtime(), async {
        let s = stream("/");
        let _f = filter(&plugin, &s);
        eventually("two ticks", || recorded(&host, "ticks").unwrap_or(0) >= 2).await;
    });
}

#[test]
fn queue_ready_is_delivered_to_the_registering_vm() {
    let (host, _) = host();
    let bytes = module(
        r#"(import "env" "proxy_resolve_shared_queue" (func $resolve_queue (param i32 i32 i32 i32 i32) (result i32)))
           (import "env" "proxy_enqueue_shared_queue" (func $enqueue (param i32 i32 i32) (result i32)))"#,
        r#"(data (i32.const 100) "jobs") (data (i32.const 110) "qid") (data (i32.const 120) "item") (data (i32.const 130) "empty")
           (func (export "proxy_on_configure") (param i32 i32) (result i32)
             (drop (call $register_queue (i32.const 100) (i32.const 4) (i32.const 2000)))
             (call $record (i32.const 110) (i32.const 3) (i32.load (i32.const 2000)))
             i32.const 1)
           (data (i32.const 140) "workers") (data (i32.const 150) "job-1") (data (i32.const 160) "enq")
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $resolve_queue (i32.const 140) (i32.const 7) (i32.const 100) (i32.const 4) (i32.const 2010)))
             (call $record (i32.const 160) (i32.const 3)
               (call $enqueue (i32.load (i32.const 2010)) (i32.const 150) (i32.const 5)))
             i32.const 0)
           (func (export "proxy_on_queue_ready") (param i32 i32)
             (drop (call $dequeue (local.get 1) (i32.const 2000) (i32.const 2004)))
             (drop (call $set_shared (i32.const 120) (i32.const 4) (i32.load (i32.const 2000)) (i32.load (i32.const 2004)) (i32.const 0)))
             (call $record (i32.const 130) (i32.const 5) (call $dequeue (local.get 1) (i32.const 2000) (i32.const 2004))))"#,
    );
    let plugin = load(
        &host,
        &config(serde_json::json!({ "vm_id": "workers" })),
        &bytes,
    )
    .unwrap();
    tokio::task::LocalSet::new().block_on(&runtime(), async {
        let s = stream("/");
        let mut f = filter(&plugin, &s);
        assert!(host.queues().resolve("workers", "jobs").is_some());
        f.on_request_headers(&s, true);
        assert_eq!(recorded(&host, "enq"), Some(0));
        eventually("the item", || host.shared_data().get(b"item").is_some()).await;
        assert_eq!(&host.shared_data().get(b"item").unwrap().0[..], b"job-1");
        assert_eq!(recorded(&host, "empty"), Some(Status::Empty.code()));
    });
}

/// An upstream answering `pong` with the request path in `x-path`.
async fn upstream() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let response = http::Response::builder()
                            .header("x-path", req.uri().path())
                            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                                b"pong",
                            )))
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    addr
}

fn cluster(name: &str, addr: SocketAddr) -> ClusterConfig {
    serde_json::from_value(serde_json::json!({ "name": name, "endpoints": [addr.to_string()] }))
        .unwrap()
}

fn call_module(call_headers: &[(&str, &str)]) -> Vec<u8> {
    call_module_with_timeout(call_headers, 5000)
}

/// [`call_module`] whose calls have a timeout of `timeout_ms`.
fn call_module_with_timeout(call_headers: &[(&str, &str)], timeout_ms: i32) -> Vec<u8> {
    let headers = pairs::encode(call_headers.iter().map(|(k, v)| (*k, *v)));
    module(
        "",
        &format!(
            r#"(data (i32.const 100) "backend") (data (i32.const 120) "call") (data (i32.const 130) "nh") (data (i32.const 140) "body")
               (data (i32.const 150) "x-auth") (data (i32.const 160) "ok") (data (i32.const 170) "bs") (data (i32.const 180) "status")
               (data (i32.const 190) "denied")
               (data (i32.const 300) "{data}")
               (data (i32.const 200) "to_root")
               (global $caller (mut i32) (i32.const 0))
               (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                 (global.set $caller (local.get 0))
                 (call $record (i32.const 120) (i32.const 4)
                   (call $http_call (i32.const 100) (i32.const 7) (i32.const 300) (i32.const {len}) (i32.const 0) (i32.const 0)
                     (i32.const 0) (i32.const 0) (i32.const {timeout_ms}) (i32.const 2100)))
                 (call $record (i32.const 190) (i32.const 6)
                   (call $http_call (i32.const 190) (i32.const 6) (i32.const 300) (i32.const {len}) (i32.const 0) (i32.const 0)
                     (i32.const 0) (i32.const 0) (i32.const {timeout_ms}) (i32.const 2100)))
                 i32.const 1)
               (func (export "proxy_on_http_call_response") (param $ctx i32) (param $token i32) (param $nh i32) (param $bs i32) (param $nt i32)
                 (call $record (i32.const 130) (i32.const 2) (local.get $nh))
                 (call $record (i32.const 170) (i32.const 2) (local.get $bs))
                 (drop (call $get_buffer (i32.const 4) (i32.const 0) (local.get $bs) (i32.const 2000) (i32.const 2004)))
                 (drop (call $set_shared (i32.const 140) (i32.const 4) (i32.load (i32.const 2000)) (i32.load (i32.const 2004)) (i32.const 0)))
                 (drop (call $get_status (i32.const 2200) (i32.const 2204) (i32.const 2208)))
                 (call $record (i32.const 180) (i32.const 6) (i32.load (i32.const 2200)))
                 (call $record (i32.const 200) (i32.const 7) (i32.ne (local.get $ctx) (global.get $caller)))
                 (drop (call $set_effective (global.get $caller)))
                 (drop (call $add_value (i32.const 0) (i32.const 150) (i32.const 6) (i32.const 160) (i32.const 2)))
                 (drop (call $continue_stream (i32.const 0))))"#,
            data = wat_bytes(&headers),
            len = headers.len(),
        ),
    )
}

const GOOD_CALL: &[(&str, &str)] = &[
    (":method", "GET"),
    (":path", "/check"),
    (":authority", "auth"),
];

#[test]
fn http_call_response_resumes_the_paused_stream() {
    let (host, metrics) = host();
    tokio::task::LocalSet::new().block_on(&runtime(), async {
        let addr = upstream().await;
        let ups = upstreams(&[cluster("backend", addr)], &metrics);
        let plugin = host
            .load_plugin_bytes(&config(serde_json::json!({})), &call_module(GOOD_CALL), ups)
            .unwrap();
        let s = stream("/");
        let mut f = filter(&plugin, &s);
        assert_eq!(f.on_request_headers(&s, true), FilterStatus::StopIteration);
        assert_eq!(recorded(&host, "call"), Some(0));
        assert_eq!(
            recorded(&host, "denied"),
            Some(Status::BadArgument.code()),
            "unknown cluster"
        );
        let resumed = s.borrow().resumed();
        tokio::time::timeout(Duration::from_secs(10), resumed.notified())
            .await
            .expect("resumed");
        assert_eq!(s.borrow().request.headers["x-auth"], "ok");
        assert_eq!(&host.shared_data().get(b"body").unwrap().0[..], b"pong");
        assert_eq!(recorded(&host, "bs"), Some(4));
        assert!(
            recorded(&host, "nh").unwrap() >= 2,
            ":status and x-path at least"
        );
        assert_eq!(recorded(&host, "status"), Some(0));
        assert_eq!(
            recorded(&host, "to_root"),
            Some(1),
            "answered on the root context"
        );
    });
}

#[test]
fn failed_http_call_reports_no_headers() {
    let (host, metrics) = host();
    tokio::task::LocalSet::new().block_on(&runtime(), async {
        // A port nothing listens on.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap()
        };
        let ups = upstreams(&[cluster("backend", closed)], &metrics);
        let plugin = host
            .load_plugin_bytes(&config(serde_json::json!({})), &call_module(GOOD_CALL), ups)
            .unwrap();
        let s = stream("/");
        let mut f = filter(&plugin, &s);
        assert_eq!(f.on_request_headers(&s, true), FilterStatus::StopIteration);
        eventually("the call response", || recorded(&host, "nh").is_some()).await;
        assert_eq!(recorded(&host, "nh"), Some(0));
        assert_ne!(recorded(&host, "status"), Some(0));
    });
}

#[test]
fn http_call_arguments_are_checked() {
    let (host, metrics) = host();
    tokio::task::LocalSet::new().block_on(&runtime(), async {
        let addr = upstream().await;
        // No :path.
        let ups = upstreams(&[cluster("backend", addr)], &metrics);
        let bad = call_module(&[(":method", "GET"), (":authority", "auth")]);
        let plugin = host
            .load_plugin_bytes(&config(serde_json::json!({})), &bad, ups.clone())
            .unwrap();
        let s = stream("/");
        filter(&plugin, &s).on_request_headers(&s, true);
        assert_eq!(recorded(&host, "call"), Some(Status::BadArgument.code()));
        // A cluster outside the plugin's allow-list.
        let cfg = config(serde_json::json!({ "name": "limited", "allowed_clusters": ["other"] }));
        let plugin = host
            .load_plugin_bytes(&cfg, &call_module(GOOD_CALL), ups.clone())
            .unwrap();
        let s = stream("/");
        filter(&plugin, &s).on_request_headers(&s, true);
        assert_eq!(recorded(&host, "call"), Some(Status::BadArgument.code()));
        // A negative timeout (read as a signed 32-bit number, as in Envoy).
        let negative = call_module_with_timeout(GOOD_CALL, -1);
        let plugin = host
            .load_plugin_bytes(&config(serde_json::json!({})), &negative, ups.clone())
            .unwrap();
        let s = stream("/");
        filter(&plugin, &s).on_request_headers(&s, true);
        assert_eq!(recorded(&host, "call"), Some(Status::BadArgument.code()));
        // `host` stands for a missing `:authority`.
        let by_host = call_module(&[(":method", "GET"), (":path", "/check"), ("host", "auth")]);
        let plugin = host
            .load_plugin_bytes(&config(serde_json::json!({})), &by_host, ups)
            .unwrap();
        let s = stream("/");
        filter(&plugin, &s).on_request_headers(&s, true);
        assert_eq!(recorded(&host, "call"), Some(Status::Ok.code()));
    });
}

/// A response body of one chunk followed by trailers.
struct BodyWithTrailers {
    data: Option<bytes::Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl http_body::Body for BodyWithTrailers {
    type Data = bytes::Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<bytes::Bytes>, Self::Error>>> {
        if let Some(data) = self.data.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(data))));
        }
        std::task::Poll::Ready(
            self.trailers
                .take()
                .map(|t| Ok(http_body::Frame::trailers(t))),
        )
    }
}

/// A gRPC upstream (h2c) whose every method echoes the request message back,
/// with `x-md: 1` initial metadata and status 0.
async fn grpc_upstream() -> SocketAddr {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let framed = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        let mut trailers = http::HeaderMap::new();
                        trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                        let response = http::Response::builder()
                            .header("content-type", "application/grpc")
                            .header("x-md", "1")
                            .body(BodyWithTrailers {
                                data: Some(framed),
                                trailers: Some(trailers),
                            })
                            .unwrap();
                        Ok::<_, std::convert::Infallible>(response)
                    },
                );
                let io = hyper_util::rt::TokioIo::new(tcp);
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(io, service)
                        .await;
            });
        }
    });
    addr
}

#[test]
fn grpc_call_delivers_metadata_message_and_close() {
    let (host, metrics) = host();
    tokio::task::LocalSet::new().block_on(&runtime(), async {
        let addr = grpc_upstream().await;
        let cluster: ClusterConfig = serde_json::from_value(serde_json::json!({
            "name": "grpc", "endpoints": [addr.to_string()], "protocol": "h2"
        }))
        .unwrap();
        let ups = upstreams(&[cluster], &metrics);
        let bytes = module(
            "",
            r#"(data (i32.const 100) "grpc") (data (i32.const 110) "svc.Echo") (data (i32.const 120) "Say") (data (i32.const 130) "ping")
               (data (i32.const 140) "call") (data (i32.const 150) "imd") (data (i32.const 160) "msg") (data (i32.const 170) "tmd")
               (data (i32.const 180) "close") (data (i32.const 190) "cancel") (data (i32.const 200) "x-md") (data (i32.const 210) "md")
               (data (i32.const 230) "to_root")
               (global $caller (mut i32) (i32.const 0))
               (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                 (global.set $caller (local.get 0))
                 (call $record (i32.const 140) (i32.const 4)
                   (call $grpc_call (i32.const 100) (i32.const 4) (i32.const 110) (i32.const 8) (i32.const 120) (i32.const 3)
                     (i32.const 0) (i32.const 0) (i32.const 130) (i32.const 4) (i32.const 5000) (i32.const 2100)))
                 (call $record (i32.const 190) (i32.const 6) (call $grpc_cancel (i32.const 9999)))
                 i32.const 1)
               (func (export "proxy_on_grpc_receive_initial_metadata") (param i32 i32 i32)
                 (call $record (i32.const 150) (i32.const 3) (local.get 2))
                 (drop (call $get_value (i32.const 4) (i32.const 200) (i32.const 4) (i32.const 2000) (i32.const 2004)))
                 (call $record (i32.const 210) (i32.const 2) (i32.load8_u (i32.load (i32.const 2000)))))
               (func (export "proxy_on_grpc_receive") (param i32 i32 i32)
                 (drop (call $get_buffer (i32.const 5) (i32.const 0) (local.get 2) (i32.const 2000) (i32.const 2004)))
                 (drop (call $set_shared (i32.const 160) (i32.const 3) (i32.load (i32.const 2000)) (i32.load (i32.const 2004)) (i32.const 0))))
               (func (export "proxy_on_grpc_receive_trailing_metadata") (param i32 i32 i32)
                 (call $record (i32.const 170) (i32.const 3) (local.get 2)))
               (func (export "proxy_on_grpc_close") (param $ctx i32) (param $token i32) (param $status i32)
                 (call $record (i32.const 180) (i32.const 5) (local.get $status))
                 (call $record (i32.const 230) (i32.const 7) (i32.ne (local.get $ctx) (global.get $caller)))
                 (drop (call $set_effective (global.get $caller)))
                 (drop (call $continue_stream (i32.const 0))))"#,
        );
        let plugin = host.load_plugin_bytes(&config(serde_json::json!({})), &bytes, ups).unwrap();
        let s = stream("/");
        let mut f = filter(&plugin, &s);
        assert_eq!(f.on_request_headers(&s, true), FilterStatus::StopIteration);
        assert_eq!(recorded(&host, "call"), Some(0));
        assert_eq!(recorded(&host, "cancel"), Some(Status::NotFound.code()));
        let resumed = s.borrow().resumed();
        tokio::time::timeout(Duration::from_secs(10), resumed.notified()).await.expect("resumed on close");
        assert_eq!(recorded(&host, "close"), Some(0));
        assert_eq!(recorded(&host, "to_root"), Some(1), "closed on the root context");
        assert_eq!(&host.shared_data().get(b"msg").unwrap().0[..], b"ping");
        assert!(recorded(&host, "imd").unwrap() >= 1);
        assert_eq!(recorded(&host, "md"), Some(i32::from(b'1')));
        assert!(recorded(&host, "tmd").unwrap() >= 1);
    });
}

#[test]
fn grpc_stream_send_and_close() {
    let (host, metrics) = host();
    tokio::task::LocalSet::new().block_on(&runtime(), async {
        let addr = grpc_upstream().await;
        let cluster: ClusterConfig = serde_json::from_value(serde_json::json!({
            "name": "grpc", "endpoints": [addr.to_string()], "protocol": "h2"
        }))
        .unwrap();
        let ups = upstreams(&[cluster], &metrics);
        let bytes = module(
            "",
            r#"(data (i32.const 100) "grpc") (data (i32.const 110) "svc.Echo") (data (i32.const 120) "Say") (data (i32.const 130) "pong")
               (data (i32.const 140) "open") (data (i32.const 150) "send") (data (i32.const 160) "msg") (data (i32.const 170) "halfclose")
               (data (i32.const 180) "close")
               (data (i32.const 230) "to_root")
               (global $caller (mut i32) (i32.const 0))
               (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                 (global.set $caller (local.get 0))
                 (call $record (i32.const 140) (i32.const 4)
                   (call $grpc_stream (i32.const 100) (i32.const 4) (i32.const 110) (i32.const 8) (i32.const 120) (i32.const 3)
                     (i32.const 0) (i32.const 0) (i32.const 2100)))
                 (call $record (i32.const 150) (i32.const 4)
                   (call $grpc_send (i32.load (i32.const 2100)) (i32.const 130) (i32.const 4) (i32.const 0)))
                 (call $record (i32.const 170) (i32.const 9) (call $grpc_close (i32.load (i32.const 2100))))
                 i32.const 1)
               (func (export "proxy_on_grpc_receive") (param i32 i32 i32)
                 (drop (call $get_buffer (i32.const 5) (i32.const 0) (local.get 2) (i32.const 2000) (i32.const 2004)))
                 (drop (call $set_shared (i32.const 160) (i32.const 3) (i32.load (i32.const 2000)) (i32.load (i32.const 2004)) (i32.const 0))))
               (func (export "proxy_on_grpc_close") (param $ctx i32) (param $token i32) (param $status i32)
                 (call $record (i32.const 180) (i32.const 5) (local.get $status))
                 (call $record (i32.const 230) (i32.const 7) (i32.ne (local.get $ctx) (global.get $caller)))
                 (drop (call $set_effective (global.get $caller)))
                 (drop (call $continue_stream (i32.const 0))))"#,
        );
        let plugin = host.load_plugin_bytes(&config(serde_json::json!({})), &bytes, ups).unwrap();
        let s = stream("/");
        let mut f = filter(&plugin, &s);
        assert_eq!(f.on_request_headers(&s, true), FilterStatus::StopIteration);
        assert_eq!(recorded(&host, "open"), Some(0));
        assert_eq!(recorded(&host, "send"), Some(0));
        assert_eq!(recorded(&host, "halfclose"), Some(0));
        let resumed = s.borrow().resumed();
        tokio::time::timeout(Duration::from_secs(10), resumed.notified()).await.expect("resumed on close");
        assert_eq!(recorded(&host, "close"), Some(0));
        assert_eq!(recorded(&host, "to_root"), Some(1), "closed on the root context");
        assert_eq!(&host.shared_data().get(b"msg").unwrap().0[..], b"pong");
    });
}
