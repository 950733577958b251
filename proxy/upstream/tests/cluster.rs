//! Cluster behaviour against real HTTP servers on loopback.

mod support;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Request;
use lacewing_config::units::Dur;
use lacewing_config::{LbPolicy, OutlierDetection, UpstreamProtocol};
use lacewing_core::ProxyError;
use lacewing_core::body;
use lacewing_upstream::{Cluster, RequestPolicy, UpstreamResponse, Upstreams};
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// An HTTP/1.1 server answering 200 `body`; requests for `/hold` first wait
/// until `release` is notified.
async fn http1_holding_on(release: &Arc<Notify>, body: &'static str) -> Server {
    let gate = release.clone();
    http1(move |request: Request<hyper::body::Incoming>| {
        let gate = gate.clone();
        async move {
            if request.uri().path() == "/hold" {
                gate.notified().await;
            }
            reply(200, body)
        }
    })
    .await
}

/// Sends `GET /hold` without retries from a spawned task.
fn spawn_held_request(cluster: &Arc<Cluster>) -> JoinHandle<Result<UpstreamResponse, ProxyError>> {
    let cluster = cluster.clone();
    tokio::spawn(async move { cluster.send(get("/hold"), &policy(0)).await })
}

fn assert_overflow(error: &ProxyError, expected_limit: &str) {
    assert!(
        matches!(error, ProxyError::Overflow { limit, .. } if *limit == expected_limit),
        "{error}"
    );
}

/// Outlier detection ejecting an endpoint after `consecutive_failures`.
fn ejecting_after(
    consecutive_failures: u32,
    base_ejection_time: Duration,
    max_ejection_percent: u32,
) -> OutlierDetection {
    OutlierDetection {
        consecutive_failures,
        base_ejection_time: Dur(base_ejection_time),
        max_ejection_percent,
    }
}

/// The `upstream_connections_active` gauge of cluster `name`.
fn active_connections(metrics: &lacewing_core::metrics::Metrics, name: &str) -> i64 {
    metrics
        .upstream_connections_active
        .with_label_values(&[name])
        .get()
}

/// [`config`] for an h2 cluster.
fn h2_config(name: &str, endpoints: &[std::net::SocketAddr]) -> lacewing_config::ClusterConfig {
    let mut cfg = config(name, endpoints);
    cfg.protocol = UpstreamProtocol::H2;
    cfg
}

#[tokio::test(flavor = "current_thread")]
async fn round_robin_spreads_across_three_live_endpoints() {
    let a = http1(|_| async { reply(200, "a") }).await;
    let b = http1(|_| async { reply(200, "b") }).await;
    let c = http1(|_| async { reply(200, "c") }).await;
    let (cluster, _) = build(config("rr", &[a.addr, b.addr, c.addr]));
    let mut seen = HashMap::new();
    for _ in 0..9 {
        let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
        assert_eq!(answer.attempts, 1);
        *seen.entry(body_text(answer.response).await).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
    assert!(seen.values().all(|&n| n == 3), "{seen:?}");
}

#[tokio::test(flavor = "current_thread")]
async fn least_request_prefers_the_idle_endpoint() {
    let release = Arc::new(Notify::new());
    let a = http1_holding_on(&release, "ok").await;
    let b = http1_holding_on(&release, "ok").await;
    let mut cfg = config("lr", &[a.addr, b.addr]);
    cfg.lb = LbPolicy::LeastRequest;
    let (cluster, _) = build(cfg);

    let held = spawn_held_request(&cluster);
    eventually("the held request reaches a server", || {
        a.requests() + b.requests() == 1
    })
    .await;
    let (busy, idle) = if a.requests() == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    for _ in 0..20 {
        let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
        assert_eq!(answer.endpoint, idle.addr);
        body_text(answer.response).await;
    }
    assert_eq!(busy.requests(), 1);
    assert_eq!(idle.requests(), 20);
    release.notify_waiters();
    assert_eq!(held.await.unwrap().unwrap().endpoint, busy.addr);
}

#[tokio::test(flavor = "current_thread")]
async fn connect_failure_is_retried_on_a_live_endpoint() {
    let live = http1(|_| async { reply(200, "live") }).await;
    let dead = dead_addr();
    let (cluster, metrics) = build(config("retry", &[dead, live.addr]));
    for _ in 0..4 {
        let answer = cluster.send(get("/"), &policy(2)).await.unwrap();
        assert_eq!(answer.endpoint, live.addr);
        assert_eq!(body_text(answer.response).await, "live");
    }
    let retries = metrics.upstream_retries.with_label_values(&["retry"]).get();
    let failures = metrics
        .upstream_connect_failures
        .with_label_values(&["retry"])
        .get();
    assert!(
        retries >= 1 && failures >= 1,
        "retries {retries}, failures {failures}"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn all_dead_endpoints_fail_with_a_connect_error() {
    let (cluster, _) = build(config("dead", &[dead_addr(), dead_addr()]));
    let error = cluster.send(get("/"), &policy(3)).await.unwrap_err();
    assert!(matches!(error, ProxyError::Connect { .. }), "{error}");
    assert_eq!(error.status(), 502);
    let error = cluster.connect_tcp().await.unwrap_err();
    assert!(matches!(error, ProxyError::Connect { .. }), "{error}");
}

#[tokio::test(flavor = "current_thread")]
async fn every_endpoint_ejected_for_refusing_connections_is_no_healthy_upstream() {
    let mut cfg = config("down", &[dead_addr()]);
    cfg.outlier_detection = ejecting_after(1, Duration::from_secs(30), 100);
    let (cluster, metrics) = build(cfg);
    let first = cluster.send(get("/"), &policy(0)).await.unwrap_err();
    assert!(matches!(first, ProxyError::Connect { .. }), "{first}");
    let second = cluster.send(get("/"), &policy(0)).await.unwrap_err();
    assert!(
        matches!(second, ProxyError::NoHealthyUpstream(_)),
        "{second}"
    );
    assert_eq!(
        metrics
            .upstream_ejections
            .with_label_values(&["down"])
            .get(),
        1
    );
}

#[tokio::test(flavor = "current_thread")]
async fn empty_cluster_is_no_healthy_upstream() {
    let (cluster, _) = build(config("empty", &[]));
    let error = cluster.send(get("/"), &policy(1)).await.unwrap_err();
    assert!(matches!(error, ProxyError::NoHealthyUpstream(_)), "{error}");
}

#[tokio::test(flavor = "current_thread")]
async fn slow_upstream_times_out() {
    let slow = http1(|_| async {
        std::future::pending::<()>().await;
        reply(200, "never")
    })
    .await;
    let (cluster, _) = build(config("slow", &[slow.addr]));
    let mut policy = policy(0);
    policy.timeout = Duration::from_millis(200);
    let error = cluster.send(get("/"), &policy).await.unwrap_err();
    assert!(matches!(error, ProxyError::UpstreamTimeout(_)), "{error}");
    assert_eq!(error.status(), 504);
    eventually("the in-flight count drops", || {
        cluster.requests_in_flight() == 0
    })
    .await;
}

#[tokio::test(flavor = "current_thread")]
async fn bodiless_request_is_retried_on_503() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let flaky = http1(move |_| {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                reply(503, "busy")
            } else {
                reply(200, "fine")
            }
        }
    })
    .await;
    let (cluster, metrics) = build(config("flaky", &[flaky.addr]));
    let answer = cluster.send(get("/"), &policy(2)).await.unwrap();
    assert_eq!(answer.response.status(), 200);
    assert_eq!(answer.attempts, 2);
    assert_eq!(body_text(answer.response).await, "fine");
    assert_eq!(
        metrics.upstream_retries.with_label_values(&["flaky"]).get(),
        1
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_retry_sends_the_request_its_caller_keeps() {
    // Each request's target and its `x-kept` header, as the server saw them.
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(String, Option<String>)>::new()));
    let log = seen.clone();
    let flaky = http1(move |request| {
        let mut log = log.lock().unwrap();
        log.push((
            request.uri().to_string(),
            request
                .headers()
                .get("x-kept")
                .map(|v| v.to_str().unwrap().to_owned()),
        ));
        let first = log.len() == 1;
        async move {
            if first {
                reply(503, "busy")
            } else {
                reply(200, "fine")
            }
        }
    })
    .await;
    let (cluster, _) = build(config("kept", &[flaky.addr]));
    let resend = || {
        let mut request = get("/kept");
        request
            .headers_mut()
            .insert("x-kept", http::HeaderValue::from_static("yes"));
        request
    };
    let answer = cluster
        .send_with(get("/first"), &policy(2), None, Some(&resend))
        .await
        .unwrap();
    assert_eq!(answer.response.status(), 200);
    assert_eq!(answer.attempts, 2);
    assert_eq!(
        *seen.lock().unwrap(),
        [
            ("/first".to_owned(), None),
            ("/kept".to_owned(), Some("yes".to_owned()))
        ]
    );
}

#[tokio::test(flavor = "current_thread")]
async fn request_with_body_is_not_retried_on_503() {
    let busy = http1(|_| async { reply(503, "busy") }).await;
    let (cluster, _) = build(config("busy", &[busy.addr]));
    let request = Request::builder()
        .method("POST")
        .uri("/submit")
        .header("host", "backend.test")
        .body(body::full("payload"))
        .unwrap();
    let answer = cluster.send(request, &policy(2)).await.unwrap();
    assert_eq!(answer.response.status(), 503);
    assert_eq!(answer.attempts, 1);
    assert_eq!(busy.requests(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn failing_endpoint_is_ejected_then_readmitted() {
    let bad = http1(|_| async { reply(500, "bad") }).await;
    let good = http1(|_| async { reply(200, "good") }).await;
    let mut cfg = config("outlier", &[bad.addr, good.addr]);
    cfg.outlier_detection = ejecting_after(3, Duration::from_millis(300), 50);
    let (cluster, metrics) = build(cfg);
    for _ in 0..6 {
        let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
        body_text(answer.response).await;
    }
    assert_eq!(bad.requests(), 3);
    assert!(cluster.is_ejected(bad.addr));
    assert!(!cluster.is_ejected(good.addr));
    assert_eq!(
        metrics
            .upstream_ejections
            .with_label_values(&["outlier"])
            .get(),
        1
    );
    let good_before = good.requests();
    for _ in 0..5 {
        let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
        assert_eq!(answer.endpoint, good.addr);
        body_text(answer.response).await;
    }
    assert_eq!(good.requests(), good_before + 5);
    eventually("the ejection expires", || !cluster.is_ejected(bad.addr)).await;
    for _ in 0..4 {
        let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
        body_text(answer.response).await;
    }
    assert!(
        bad.requests() > 3,
        "the re-admitted endpoint gets traffic again"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn max_requests_overflows() {
    let release = Arc::new(Notify::new());
    let held = http1_holding_on(&release, "done").await;
    let mut cfg = config("small", &[held.addr]);
    cfg.circuit_breaker.max_requests = 1;
    let (cluster, metrics) = build(cfg);
    let first = spawn_held_request(&cluster);
    eventually("the first request is in flight", || held.requests() == 1).await;
    let error = cluster.send(get("/"), &policy(0)).await.unwrap_err();
    assert_overflow(&error, "max_requests");
    assert_eq!(error.status(), 503);
    let overflows = metrics
        .upstream_overflows
        .with_label_values(&["small", "max_requests"])
        .get();
    assert_eq!(overflows, 1);
    release.notify_waiters();
    assert_eq!(first.await.unwrap().unwrap().response.status(), 200);
    assert!(cluster.send(get("/"), &policy(0)).await.is_ok());
}

#[tokio::test(flavor = "current_thread")]
async fn pooled_connection_is_reused() {
    let server = http1(|_| async { reply(200, "pooled") }).await;
    let (cluster, metrics) = build(config("pool", &[server.addr]));
    for _ in 0..5 {
        let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
        assert_eq!(body_text(answer.response).await, "pooled");
    }
    assert_eq!(server.requests(), 5);
    assert_eq!(server.accepted(), 1);
    assert_eq!(cluster.open_connections(), 1);
    assert_eq!(
        metrics
            .upstream_connections_total
            .with_label_values(&["pool"])
            .get(),
        1
    );
    assert_eq!(active_connections(&metrics, "pool"), 1);
}

/// A keep-alive server that answers one request per connection, then closes
/// the connection on the next request without answering (the idle-close race).
async fn one_shot_keep_alive_server() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                for answered in [false, true] {
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    head.clear();
                    if answered {
                        return;
                    }
                    let reply = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test(flavor = "current_thread")]
async fn idempotent_request_is_resent_when_a_reused_connection_was_closed() {
    let (addr, accepted) = one_shot_keep_alive_server().await;
    let (cluster, _) = build(config("race", &[addr]));
    let answer = cluster.send(get("/"), &policy(1)).await.unwrap();
    assert_eq!(body_text(answer.response).await, "ok");
    eventually("the connection is pooled", || {
        cluster.idle_connections() == 1
    })
    .await;
    let answer = cluster.send(get("/"), &policy(1)).await.unwrap();
    assert_eq!(answer.attempts, 2);
    assert_eq!(body_text(answer.response).await, "ok");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);

    eventually("the connection is pooled", || {
        cluster.idle_connections() == 1
    })
    .await;
    let post = Request::builder()
        .method("POST")
        .uri("/")
        .header("host", "backend.test")
        .body(body::empty())
        .unwrap();
    let error = cluster.send(post, &policy(1)).await.unwrap_err();
    assert!(matches!(error, ProxyError::UpstreamReset(_)), "{error}");
}

#[tokio::test(flavor = "current_thread")]
async fn idle_connections_close_after_the_idle_timeout() {
    let server = http1(|_| async { reply(200, "ok") }).await;
    let mut cfg = config("idle", &[server.addr]);
    cfg.idle_timeout = Dur(Duration::from_millis(100));
    let (cluster, metrics) = build(cfg);
    let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
    body_text(answer.response).await;
    eventually("the idle connection closes", || {
        cluster.open_connections() == 0
    })
    .await;
    assert_eq!(active_connections(&metrics, "idle"), 0);
    let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
    assert_eq!(answer.response.status(), 200);
    assert_eq!(server.accepted(), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn http1_sends_origin_form_and_keeps_host() {
    let server = http1(|request: Request<hyper::body::Incoming>| {
        let seen = format!(
            "{} {}",
            request.uri(),
            request
                .headers()
                .get("host")
                .and_then(|h| h.to_str().ok())
                .unwrap_or("-")
        );
        async move { reply(200, Box::leak(seen.into_boxed_str())) }
    })
    .await;
    let (cluster, _) = build(config("h1", &[server.addr]));
    let answer = cluster.send(get("/p?q=1"), &policy(0)).await.unwrap();
    assert_eq!(body_text(answer.response).await, "/p?q=1 backend.test");
    let absolute = Request::builder()
        .uri("http://other.test/abs")
        .body(body::empty())
        .unwrap();
    let answer = cluster.send(absolute, &policy(0)).await.unwrap();
    assert_eq!(body_text(answer.response).await, "/abs other.test");
}

#[tokio::test(flavor = "current_thread")]
async fn h2_upstream_multiplexes_one_connection() {
    let server = h2(|request: Request<hyper::body::Incoming>| {
        let seen = format!("{} {:?}", request.uri(), request.version());
        async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            reply(200, Box::leak(seen.into_boxed_str()))
        }
    })
    .await;
    let (cluster, _) = build(h2_config("grpc", &[server.addr]));
    let sends = (0..10).map(|i| {
        let cluster = cluster.clone();
        async move {
            let answer = cluster
                .send(get(&format!("/s/{i}")), &policy(0))
                .await
                .unwrap();
            body_text(answer.response).await
        }
    });
    let bodies = futures_util::future::join_all(sends).await;
    for (i, body) in bodies.iter().enumerate() {
        assert_eq!(body, &format!("http://backend.test/s/{i} HTTP/2.0"));
    }
    assert_eq!(server.requests(), 10);
    assert_eq!(server.accepted(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn unused_h2_connection_closes_after_the_idle_timeout() {
    let server = h2(|_| async { reply(200, "ok") }).await;
    let mut cfg = h2_config("h2idle", &[server.addr]);
    cfg.idle_timeout = Dur(Duration::from_millis(100));
    let (cluster, metrics) = build(cfg);
    let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
    body_text(answer.response).await;
    eventually("the idle h2 connection closes", || server.closed() == 1).await;
    eventually("the count drops", || cluster.open_connections() == 0).await;
    assert_eq!(active_connections(&metrics, "h2idle"), 0);
    let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
    assert_eq!(answer.response.status(), 200);
    assert_eq!(server.accepted(), 2);
}

#[tokio::test(flavor = "current_thread")]
async fn removed_cluster_pools_are_dropped_after_a_reload() {
    let old = h2(|_| async { reply(200, "old") }).await;
    let new = h2(|_| async { reply(200, "new") }).await;
    let (cluster, _) = build(h2_config("reloaded", &[old.addr]));
    let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
    assert_eq!(body_text(answer.response).await, "old");
    drop(cluster);
    let (cluster, _) = build(h2_config("reloaded", &[new.addr]));
    let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
    assert_eq!(body_text(answer.response).await, "new");
    // Creating the new cluster's pool on this thread dropped the old one.
    eventually("the old cluster's connection closes", || old.closed() == 1).await;
    assert_eq!(new.closed(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn connect_tcp_reaches_an_echo_server() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.unwrap();
        stream.write_all(&buf[..n]).await.unwrap();
    });
    let (cluster, _) = build(config("tcp", &[dead_addr(), addr]));
    let (mut stream, endpoint, _) = cluster.connect_tcp().await.unwrap();
    assert_eq!(endpoint, addr);
    stream.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"ping");
}

#[tokio::test(flavor = "current_thread")]
async fn upgraded_connection_carries_raw_bytes() {
    let server = http1(|mut request: Request<hyper::body::Incoming>| async move {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            let mut io = hyper_util::rt::TokioIo::new(upgrade.await.unwrap());
            let mut buf = [0u8; 5];
            io.read_exact(&mut buf).await.unwrap();
            io.write_all(&buf).await.unwrap();
        });
        let mut response = reply(101, "");
        response
            .headers_mut()
            .insert("upgrade", http::HeaderValue::from_static("echo"));
        response
            .headers_mut()
            .insert("connection", http::HeaderValue::from_static("upgrade"));
        response
    })
    .await;
    let (cluster, _) = build(config("ws", &[server.addr]));
    let request = Request::builder()
        .uri("/ws")
        .header("host", "backend.test")
        .header("connection", "upgrade")
        .header("upgrade", "echo")
        .body(body::empty())
        .unwrap();
    let mut answer = cluster.send(request, &policy(0)).await.unwrap();
    assert_eq!(answer.response.status(), 101);
    let upgraded = hyper::upgrade::on(&mut answer.response).await.unwrap();
    let mut io = hyper_util::rt::TokioIo::new(upgraded);
    io.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    io.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"hello");
    assert_eq!(cluster.idle_connections(), 0);
}

#[tokio::test(flavor = "current_thread")]
async fn callouts_go_through_the_trait() {
    use lacewing_core::callout::Upstreams as _;
    let server = http1(|_| async { reply(200, "callout") }).await;
    let metrics = lacewing_core::metrics::Metrics::new();
    let upstreams = Upstreams::new(&[config("auth", &[server.addr])], &metrics).unwrap();
    assert!(upstreams.has_cluster("auth"));
    assert!(!upstreams.has_cluster("nope"));
    let response = upstreams
        .send("auth", get("/check"), Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    use http_body_util::BodyExt;
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&bytes[..], b"callout");
    let error = upstreams
        .send("nope", get("/"), Duration::from_secs(1))
        .await
        .unwrap_err();
    assert!(matches!(error, ProxyError::NoHealthyUpstream(_)));
}

#[test]
fn build_errors_name_the_cluster_and_endpoint() {
    let metrics = lacewing_core::metrics::Metrics::new();
    let mut bad = config("web", &[]);
    bad.endpoints = vec!["no-port-here".into()];
    let message = Upstreams::new(&[bad], &metrics).unwrap_err().to_string();
    assert!(
        message.contains("web") && message.contains("no-port-here"),
        "{message}"
    );
    let twice = [config("dup", &[]), config("dup", &[])];
    let message = Upstreams::new(&twice, &metrics).unwrap_err().to_string();
    assert!(message.contains("dup"), "{message}");
}

#[test]
fn send_future_is_send() {
    fn assert_send<T: Send>(_: &T) {}
    let (cluster, _) = build(config("send", &[]));
    let policy = RequestPolicy::callout(Duration::from_secs(1));
    let future = cluster.send(get("/"), &policy);
    assert_send(&future);
    let tcp = cluster.connect_tcp();
    assert_send(&tcp);
}

#[tokio::test(flavor = "current_thread")]
async fn max_connections_overflows_when_no_connection_is_free() {
    let release = Arc::new(Notify::new());
    let server = http1_holding_on(&release, "done").await;
    let mut cfg = config("conns", &[server.addr]);
    cfg.circuit_breaker.max_connections = 1;
    let (cluster, metrics) = build(cfg);
    let first = spawn_held_request(&cluster);
    eventually("the first request holds the only connection", || {
        server.requests() == 1
    })
    .await;
    let error = cluster.send(get("/"), &policy(0)).await.unwrap_err();
    assert_overflow(&error, "max_connections");
    let overflows = metrics
        .upstream_overflows
        .with_label_values(&["conns", "max_connections"])
        .get();
    assert_eq!(overflows, 1);
    release.notify_waiters();
    assert!(first.await.unwrap().is_ok());
}

#[tokio::test(flavor = "current_thread")]
async fn concurrent_h2_requests_survive_a_dead_endpoint() {
    let live = h2(|_| async { reply(200, "live") }).await;
    let mut cfg = h2_config("h2dead", &[dead_addr(), live.addr]);
    // Every request may need its retry at once.
    cfg.retry_budget.min_concurrent = 10;
    let (cluster, _) = build(cfg);
    let sends = (0..10).map(|_| {
        let cluster = cluster.clone();
        async move {
            let answer = cluster.send(get("/"), &policy(2)).await.unwrap();
            body_text(answer.response).await
        }
    });
    for body in futures_util::future::join_all(sends).await {
        assert_eq!(body, "live");
    }
    assert_eq!(live.accepted(), 1);
}

/// Workers are current-thread runtimes on their own OS threads sharing one cluster.
#[tokio::test(flavor = "current_thread")]
async fn workers_on_several_threads_share_a_cluster() {
    let server = http1(|_| async { reply(200, "ok") }).await;
    let (cluster, metrics) = build(config("workers", &[server.addr]));
    let workers: Vec<_> = (0..3)
        .map(|_| {
            let cluster = cluster.clone();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async move {
                    for _ in 0..4 {
                        let sends = (0..5).map(|_| {
                            let cluster = cluster.clone();
                            async move {
                                let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
                                body_text(answer.response).await
                            }
                        });
                        for body in futures_util::future::join_all(sends).await {
                            assert_eq!(body, "ok");
                        }
                    }
                    // Each worker has its own pool; this one holds its own connections.
                    eventually("this worker's connections are pooled", || {
                        cluster.idle_connections() >= 1
                    })
                    .await;
                });
            })
        })
        .collect();
    for worker in workers {
        tokio::task::spawn_blocking(move || worker.join().unwrap())
            .await
            .unwrap();
    }
    assert_eq!(server.requests(), 60);
    assert_eq!(cluster.requests_in_flight(), 0);
    assert_eq!(
        cluster.idle_connections(),
        0,
        "the test thread has no pool of its own"
    );
    // The worker runtimes are gone, so their connections closed.
    eventually("worker connections close", || {
        cluster.open_connections() == 0
    })
    .await;
    assert_eq!(active_connections(&metrics, "workers"), 0);
    // Five concurrent requests per worker need five connections, reused across rounds.
    assert!(server.accepted() <= 15, "{} connections", server.accepted());
}

#[tokio::test(flavor = "current_thread")]
async fn every_endpoint_ejected_for_5xx_still_gets_traffic() {
    let failing = http1(|_| async { reply(500, "bad") }).await;
    let mut cfg = config("panic", &[failing.addr]);
    cfg.outlier_detection = ejecting_after(1, Duration::from_secs(30), 100);
    let (cluster, _) = build(cfg);
    let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
    assert_eq!(answer.response.status(), 500);
    assert!(cluster.is_ejected(failing.addr));
    // Panic routing: an answering endpoint is better than none.
    let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
    assert_eq!(answer.response.status(), 500);
    assert_eq!(failing.requests(), 2);
}
