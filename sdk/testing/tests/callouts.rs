//! SDK callout continuations and ticks, through the real host and a real
//! loopback upstream (the `ext-auth` test filter).

use std::time::Duration;

use bytes::Bytes;
use lacewing_filter_test::{FilterTest, TestUpstream, Verdict, module};
use serde_json::json;

fn checker() -> TestUpstream {
    TestUpstream::start(|req| {
        let path = req
            .headers
            .get("x-check-path")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let status = if path.starts_with("/public") {
            200
        } else {
            401
        };
        http::Response::builder()
            .status(status)
            .header("x-verdict", "ok-by-checker")
            .body(Bytes::new())
            .unwrap()
    })
    .unwrap()
}

#[test]
fn a_callout_reply_resumes_or_denies_the_request() {
    let upstream = checker();
    let test = FilterTest::builder(module("ext-auth").unwrap())
        .configuration(json!({"cluster": "checker"}))
        .cluster("checker", upstream.addr())
        .load()
        .unwrap();

    let mut allowed = test.stream(http::Request::get("/public/a").body(()).unwrap());
    assert_eq!(allowed.request_headers(true), Verdict::Paused);
    assert_eq!(
        allowed.wait_resumed(Duration::from_secs(10)),
        Verdict::Continue
    );
    assert_eq!(
        allowed.request_header("x-auth").as_deref(),
        Some("ok-by-checker")
    );

    let mut denied = test.stream(http::Request::get("/private").body(()).unwrap());
    assert_eq!(denied.request_headers(true), Verdict::Paused);
    let Verdict::Replied(reply) = denied.wait_resumed(Duration::from_secs(10)) else {
        panic!("expected a local reply");
    };
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body, Bytes::from_static(b"check said 401\n"));

    let seen: Vec<String> = upstream.received().iter().map(|r| r.path.clone()).collect();
    assert_eq!(seen, vec!["/check", "/check"]);
}

#[test]
fn no_reply_is_a_failed_callout() {
    // A port with nothing listening: the callout fails, the continuation sees Err.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let test = FilterTest::builder(module("ext-auth").unwrap())
        .configuration(json!({"cluster": "checker"}))
        .cluster("checker", addr)
        .load()
        .unwrap();
    let mut s = test.stream(http::Request::get("/public").body(()).unwrap());
    assert_eq!(s.request_headers(true), Verdict::Paused);
    let Verdict::Replied(reply) = s.wait_resumed(Duration::from_secs(10)) else {
        panic!("expected a local reply");
    };
    assert_eq!(reply.status, 403);
    assert!(String::from_utf8_lossy(&reply.body).contains("callout failed"));
}

#[test]
fn an_unknown_cluster_is_an_error_not_a_panic() {
    let test = FilterTest::builder(module("ext-auth").unwrap())
        .configuration(json!({"cluster": "nowhere"}))
        .load()
        .unwrap();
    let mut s = test.stream(http::Request::get("/public").body(()).unwrap());
    let Verdict::Replied(reply) = s.request_headers(true) else {
        panic!("expected a local reply");
    };
    assert!(
        String::from_utf8_lossy(&reply.body)
            .contains("cannot call the checker: proxy_http_call failed")
    );
}

#[test]
fn ticks_run_on_the_worker() {
    let test = FilterTest::builder(module("ext-auth").unwrap())
        .configuration(json!({"cluster": "checker", "tick_ms": 10}))
        .load()
        .unwrap();
    // As in the proxy, a worker's VM (and its timer) starts with its first stream.
    let mut first = test.stream(http::Request::get("/").body(()).unwrap());
    first.request_headers(true);
    drop(first);
    let mut ticks = 0.0;
    for _ in 0..100 {
        test.run_for(Duration::from_millis(50));
        ticks = test.metric("ext_auth_ticks").unwrap_or(0.0);
        if ticks >= 3.0 {
            break;
        }
    }
    assert!(ticks >= 3.0, "ticks seen: {ticks}");
}

#[test]
fn a_grpc_reply_resumes_or_denies_the_request() {
    let upstream = TestUpstream::start_grpc(|message| {
        if message.starts_with(b"/public") {
            (0, Bytes::from_static(b"grpc-ok"))
        } else {
            (7, Bytes::new())
        }
    })
    .unwrap();
    let test = FilterTest::builder(module("ext-auth").unwrap())
        .configuration(json!({"cluster": "checker", "grpc": true}))
        .grpc_cluster("checker", upstream.addr())
        .load()
        .unwrap();

    let mut allowed = test.stream(http::Request::get("/public/a").body(()).unwrap());
    assert_eq!(allowed.request_headers(true), Verdict::Paused);
    assert_eq!(
        allowed.wait_resumed(Duration::from_secs(10)),
        Verdict::Continue
    );
    assert_eq!(allowed.request_header("x-auth").as_deref(), Some("grpc-ok"));

    let mut denied = test.stream(http::Request::get("/private").body(()).unwrap());
    assert_eq!(denied.request_headers(true), Verdict::Paused);
    let Verdict::Replied(reply) = denied.wait_resumed(Duration::from_secs(10)) else {
        panic!("expected a local reply");
    };
    assert_eq!(reply.body, Bytes::from_static(b"grpc check said 7\n"));
    assert_eq!(upstream.received()[0].path, "/auth.Checker/Check");
}
