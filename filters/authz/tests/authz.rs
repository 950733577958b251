//! authz in the real host: what a caller sees (403 with a reason, or the
//! request going on), the counters on /metrics, and refused configurations.

use lacewing_filter_test::{FilterTest, HarnessError, Verdict, module};
use serde_json::json;

const WEB: &str = "spiffe://mesh.local/ns/shop/sa/web";
const BATCH: &str = "spiffe://mesh.local/ns/shop/sa/batch";

fn load() -> FilterTest {
    FilterTest::builder(module("authz").unwrap())
        .configuration(json!({
            "trust_domain": "mesh.local",
            "rules": [
                {
                    "name": "web-reads-orders",
                    "sources": ["shop/web"],
                    "routes": [
                        {"path": "/orders(/.*)?", "methods": ["GET"]},
                        {"path": "/orders", "methods": ["POST"], "headers": {"content-type": "application/json"}}
                    ]
                },
                {"name": "batch-anything", "sources": [BATCH]}
            ]
        }))
        .load()
        .unwrap()
}

fn call(test: &FilterTest, principal: Option<&str>, req: http::Request<()>) -> Verdict {
    let mut s = test.stream(req);
    if let Some(p) = principal {
        s.set_property("source.principal", p);
    }
    s.request_headers(true)
}

#[test]
fn a_listed_caller_on_a_listed_route_goes_through() {
    let test = load();
    let get = http::Request::get("/orders/42").body(()).unwrap();
    assert_eq!(call(&test, Some(WEB), get), Verdict::Continue);
    let post = http::Request::post("/orders")
        .header("content-type", "application/json")
        .body(())
        .unwrap();
    assert_eq!(call(&test, Some(WEB), post), Verdict::Continue);
    let any = http::Request::delete("/admin").body(()).unwrap();
    assert_eq!(call(&test, Some(BATCH), any), Verdict::Continue);
    assert_eq!(
        test.metric(&format!("authz_allowed.source.{WEB}.rule.web-reads-orders")),
        Some(2.0)
    );
    assert_eq!(
        test.metric(&format!("authz_allowed.source.{BATCH}.rule.batch-anything")),
        Some(1.0)
    );
}

#[test]
fn everything_else_gets_403_with_the_reason() {
    let test = load();
    let wrong_method = http::Request::delete("/orders/42").body(()).unwrap();
    let Verdict::Replied(reply) = call(&test, Some(WEB), wrong_method) else {
        panic!("expected a 403");
    };
    assert_eq!(reply.status, 403);
    assert_eq!(reply.header("x-lacewing-authz"), Some("denied"));
    assert_eq!(
        String::from_utf8_lossy(&reply.body),
        format!("403 Forbidden: no route allows {WEB} to DELETE /orders/42\n")
    );

    let wrong_header = http::Request::post("/orders")
        .header("content-type", "text/plain")
        .body(())
        .unwrap();
    assert!(matches!(call(&test, Some(WEB), wrong_header), Verdict::Replied(r) if r.status == 403));

    let stranger = http::Request::get("/orders").body(()).unwrap();
    let Verdict::Replied(reply) = call(&test, Some("spiffe://mesh.local/ns/x/sa/y"), stranger)
    else {
        panic!("expected a 403");
    };
    assert!(
        String::from_utf8_lossy(&reply.body)
            .contains("no rule allows spiffe://mesh.local/ns/x/sa/y")
    );

    let anonymous = http::Request::get("/orders").body(()).unwrap();
    let Verdict::Replied(reply) = call(&test, None, anonymous) else {
        panic!("expected a 403");
    };
    assert!(String::from_utf8_lossy(&reply.body).contains("no identity"));
    assert_eq!(
        test.metric(&format!("authz_denied.source.{WEB}")),
        Some(2.0)
    );
    assert_eq!(
        test.metric("authz_denied.source.unauthenticated"),
        Some(1.0)
    );
}

#[test]
fn an_empty_rule_list_denies_everyone() {
    let test = FilterTest::builder(module("authz").unwrap())
        .configuration(json!({"rules": []}))
        .load()
        .unwrap();
    let get = http::Request::get("/").body(()).unwrap();
    assert!(matches!(call(&test, Some(WEB), get), Verdict::Replied(r) if r.status == 403));
}

fn rejected(configuration: serde_json::Value) -> String {
    let err = FilterTest::builder(module("authz").unwrap())
        .configuration(configuration)
        .load()
        .unwrap_err();
    assert!(matches!(err, HarnessError::Rejected { .. }), "{err}");
    err.to_string()
}

#[test]
fn bad_configurations_are_refused_with_the_reason() {
    let bad_regex =
        rejected(json!({"rules": [{"name": "r", "sources": ["*"], "routes": [{"path": "/a(["}]}]}));
    assert!(
        bad_regex.contains("rules[0].routes[0].path: invalid regex"),
        "{bad_regex}"
    );
    let unknown = rejected(json!({"rules": [{"name": "r", "sources": ["*"], "verbs": ["GET"]}]}));
    assert!(unknown.contains("unknown field `verbs`"), "{unknown}");
    let missing = rejected(json!({}));
    assert!(missing.contains("missing field `rules`"), "{missing}");
}
