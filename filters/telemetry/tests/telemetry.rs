//! telemetry in the real host: metrics on /metrics, the access-log line, and
//! the traceparent the upstream receives.

use lacewing_filter_test::{FilterTest, Verdict, module};
use serde_json::json;

const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";

fn respond(
    test: &FilterTest,
    path: &str,
    status: u16,
    traceparent: Option<&str>,
) -> Option<String> {
    let mut req = http::Request::get(path);
    if let Some(t) = traceparent {
        req = req.header("traceparent", t);
    }
    let mut s = test.stream(req.body(()).unwrap());
    s.set_property("source.principal", WEB);
    assert_eq!(s.request_headers(true), Verdict::Continue);
    let sent = s.request_header("traceparent");
    let response = http::Response::builder().status(status).body(()).unwrap();
    assert_eq!(s.response_headers(response, true), Verdict::Continue);
    s.finish();
    sent
}

#[test]
fn requests_are_counted_by_source_destination_route_and_class() {
    let test = FilterTest::builder(module("telemetry").unwrap())
        .configuration(json!({"destination": "orders"}))
        .load()
        .unwrap();
    respond(&test, "/a", 200, None);
    respond(&test, "/b", 204, None);
    respond(&test, "/c", 503, None);
    respond(&test, "/d", 404, None);
    let labels = format!("source.{WEB}.destination.orders.route.test-route");
    assert_eq!(
        test.metric(&format!("telemetry_requests.{labels}")),
        Some(4.0)
    );
    assert_eq!(
        test.metric(&format!("telemetry_responses.{labels}.class.2xx")),
        Some(2.0)
    );
    assert_eq!(
        test.metric(&format!("telemetry_responses.{labels}.class.5xx")),
        Some(1.0)
    );
    assert_eq!(
        test.metric(&format!("telemetry_responses.{labels}.class.4xx")),
        Some(1.0)
    );
    assert_eq!(
        test.metric(&format!("telemetry_successes.{labels}")),
        Some(3.0)
    );
    assert_eq!(
        test.metric(&format!("telemetry_failures.{labels}")),
        Some(1.0)
    );
    assert_eq!(
        test.metric(&format!("telemetry_latency_ms.{labels}")),
        Some(4.0),
        "histogram count"
    );
}

#[test]
fn an_access_log_line_is_json() {
    let test = FilterTest::builder(module("telemetry").unwrap())
        .load()
        .unwrap();
    let sent = respond(&test, "/orders/7?x=1", 201, None).unwrap();
    let line = test
        .logs()
        .into_iter()
        .find(|l| l.message.contains("\"type\":\"access\""))
        .expect("an access-log line");
    let v: serde_json::Value = serde_json::from_str(&line.message).unwrap();
    assert_eq!(v["method"], "GET");
    assert_eq!(v["path"], "/orders/7?x=1");
    assert_eq!(v["status"], 201);
    assert_eq!(v["source"], WEB);
    assert_eq!(v["destination"], "test-cluster");
    assert_eq!(v["route"], "test-route");
    assert_eq!(
        sent,
        format!(
            "00-{}-{}-01",
            v["trace_id"].as_str().unwrap(),
            v["span_id"].as_str().unwrap()
        )
    );
}

#[test]
fn traceparent_keeps_the_trace_and_gets_a_new_span() {
    let test = FilterTest::builder(module("telemetry").unwrap())
        .load()
        .unwrap();
    let incoming = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let sent = respond(&test, "/", 200, Some(incoming)).unwrap();
    let parts: Vec<&str> = sent.split('-').collect();
    assert_eq!(parts[0], "00");
    assert_eq!(parts[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(parts[2], "00f067aa0ba902b7");
    assert_eq!(parts[3], "01");

    let a = respond(&test, "/", 200, None).unwrap();
    let b = respond(&test, "/", 200, Some("garbage")).unwrap();
    assert!(
        TraceParentShape::ok(&a) && TraceParentShape::ok(&b),
        "{a} {b}"
    );
    assert_ne!(
        a.split('-').nth(1),
        b.split('-').nth(1),
        "new traces get distinct ids"
    );
}

#[test]
fn two_traceparent_headers_start_a_new_trace() {
    let test = FilterTest::builder(module("telemetry").unwrap())
        .load()
        .unwrap();
    let first = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let second = "00-11111111111111111111111111111111-2222222222222222-01";
    let req = http::Request::get("/")
        .header("traceparent", first)
        .header("traceparent", second)
        .body(())
        .unwrap();
    let mut s = test.stream(req);
    assert_eq!(s.request_headers(true), Verdict::Continue);
    let sent = s.request_header("traceparent").unwrap();
    assert!(TraceParentShape::ok(&sent), "{sent}");
    let trace = sent.split('-').nth(1).unwrap();
    assert!(
        trace != "4bf92f3577b34da6a3ce929d0e0e4736" && trace != "11111111111111111111111111111111",
        "no single parent: {sent}"
    );
    s.finish();
}

struct TraceParentShape;

impl TraceParentShape {
    fn ok(v: &str) -> bool {
        let p: Vec<&str> = v.split('-').collect();
        p.len() == 4 && p[0] == "00" && p[1].len() == 32 && p[2].len() == 16 && p[3] == "01"
    }
}

#[test]
fn unknown_fields_are_refused() {
    let err = FilterTest::builder(module("telemetry").unwrap())
        .configuration(json!({"destinaton": "x"}))
        .load()
        .unwrap_err();
    assert!(
        err.to_string().contains("unknown field `destinaton`"),
        "{err}"
    );
}

#[test]
fn values_longer_than_the_lent_buffer_and_escapes_reach_the_access_log_whole() {
    let test = FilterTest::builder(module("telemetry").unwrap())
        .load()
        .unwrap();
    // The SDK lends the host a 1 KiB buffer for values read at once; a
    // longer one takes an allocation of its own, and both must read alike.
    let long = format!("/{}?q=%22quoted%22", "segment/".repeat(400));
    for path in [long.as_str(), "/short", "/tab%09and\"quote\\"] {
        let before = test.logs().len();
        respond(&test, path, 200, None).unwrap();
        let line = test.logs()[before..]
            .iter()
            .find(|l| l.message.contains("\"type\":\"access\""))
            .expect("an access-log line")
            .message
            .clone();
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["path"], path, "{line}");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["source"], WEB);
    }
}
