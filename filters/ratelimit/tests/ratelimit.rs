//! ratelimit in the real host: 429 with Retry-After once a key's bucket is
//! empty, separate buckets per key, the bucket kept in the host's shared data.

use lacewing_filter_test::{FilterTest, Verdict, module};
use serde_json::json;

fn load(key: serde_json::Value) -> FilterTest {
    FilterTest::builder(module("ratelimit").unwrap())
        .name("limits")
        .configuration(json!({
            "key": key, "capacity": 2, "refill_tokens": 1, "interval_seconds": 3600
        }))
        .load()
        .unwrap()
}

fn call(test: &FilterTest, path: &str, api_key: &str) -> Verdict {
    let mut s = test.stream(
        http::Request::get(path)
            .header("x-api-key", api_key)
            .body(())
            .unwrap(),
    );
    s.request_headers(true)
}

#[test]
fn a_key_over_its_budget_gets_429_with_retry_after() {
    let test = load(json!({"header": "x-api-key"}));
    assert_eq!(call(&test, "/", "alice"), Verdict::Continue);
    assert_eq!(call(&test, "/", "alice"), Verdict::Continue);
    let Verdict::Replied(reply) = call(&test, "/", "alice") else {
        panic!("expected 429");
    };
    assert_eq!(reply.status, 429);
    let retry: u64 = reply.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=3600).contains(&retry), "{retry}");
    // Another key has its own bucket.
    assert_eq!(call(&test, "/", "bob"), Verdict::Continue);
    assert_eq!(test.metric("ratelimit_allowed"), Some(3.0));
    assert_eq!(test.metric("ratelimit_limited"), Some(1.0));
    // The bucket lives in the host's shared data, where every worker's VM finds it.
    let bucket = test
        .shared_data("ratelimit/limits/alice")
        .expect("bucket in shared data");
    assert_eq!(bucket.len(), 16);
}

#[test]
fn path_keys_ignore_the_query() {
    let test = load(json!("path"));
    assert_eq!(call(&test, "/a?x=1", "k"), Verdict::Continue);
    assert_eq!(call(&test, "/a?x=2", "k"), Verdict::Continue);
    assert!(matches!(call(&test, "/a", "k"), Verdict::Replied(r) if r.status == 429));
    assert_eq!(call(&test, "/b", "k"), Verdict::Continue);
}

#[test]
fn principal_keys_use_the_callers_identity() {
    let test = load(json!("principal"));
    for _ in 0..2 {
        let mut s = test.stream(http::Request::get("/").body(()).unwrap());
        s.set_property("source.principal", "spiffe://mesh.local/ns/a/sa/b");
        assert_eq!(s.request_headers(true), Verdict::Continue);
    }
    let mut s = test.stream(http::Request::get("/").body(()).unwrap());
    s.set_property("source.principal", "spiffe://mesh.local/ns/a/sa/b");
    assert!(matches!(s.request_headers(true), Verdict::Replied(r) if r.status == 429));
}

#[test]
fn bad_configurations_are_refused() {
    for (config, reason) in [
        (
            json!({"key": "path", "capacity": 0, "refill_tokens": 1, "interval_seconds": 1}),
            "at least 1",
        ),
        (
            json!({"key": "ip", "capacity": 1, "refill_tokens": 1, "interval_seconds": 1}),
            "unknown variant `ip`",
        ),
        (
            json!({"key": "path", "capacity": 1}),
            "missing field `refill_tokens`",
        ),
    ] {
        let err = FilterTest::builder(module("ratelimit").unwrap())
            .configuration(config)
            .load()
            .unwrap_err();
        assert!(err.to_string().contains(reason), "{err}");
    }
}
