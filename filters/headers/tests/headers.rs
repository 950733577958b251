//! headers in the real host: the request the upstream gets and the response
//! the client gets, and refused configurations.

use lacewing_filter_test::{FilterTest, Verdict, module};
use serde_json::json;

#[test]
fn request_and_response_headers_are_edited_with_properties() {
    let test = FilterTest::builder(module("headers").unwrap())
        .configuration(json!({
            "request": {
                "remove": ["x-internal"],
                "set": {"x-caller": "%{source.principal}", "x-missing": "%{no.such.property}"},
                "add": {"x-via": "lacewing"}
            },
            "response": {
                "set": {"x-served-path": "path=%{request.path}"},
                "remove": ["server"]
            }
        }))
        .load()
        .unwrap();
    let mut s = test.stream(
        http::Request::get("/shop?q=1")
            .header("x-internal", "secret")
            .header("x-via", "edge")
            .header("x-caller", "forged")
            .body(())
            .unwrap(),
    );
    s.set_property("source.principal", "spiffe://mesh.local/ns/shop/sa/web");
    assert_eq!(s.request_headers(true), Verdict::Continue);
    assert_eq!(s.request_header("x-internal"), None);
    assert_eq!(
        s.request_header("x-caller").as_deref(),
        Some("spiffe://mesh.local/ns/shop/sa/web")
    );
    assert_eq!(
        s.request_header("x-missing"),
        None,
        "absent property: header skipped"
    );
    assert_eq!(s.request_header_all("x-via"), vec!["edge", "lacewing"]);

    let response = http::Response::builder()
        .status(200)
        .header("server", "upstream/1.0")
        .body(())
        .unwrap();
    assert_eq!(s.response_headers(response, true), Verdict::Continue);
    assert_eq!(s.response_header("server"), None);
    assert_eq!(
        s.response_header("x-served-path").as_deref(),
        Some("path=/shop?q=1")
    );
}

#[test]
fn bad_configurations_are_refused() {
    for (config, reason) in [
        (
            json!({"request": {"set": {"x-a": "%{source"}}}),
            "request.set.x-a",
        ),
        (
            json!({"request": {"set": {"bad name": "v"}}}),
            "not a valid header name",
        ),
        (
            json!({"response": {"rename": {}}}),
            "unknown field `rename`",
        ),
    ] {
        let err = FilterTest::builder(module("headers").unwrap())
            .configuration(config)
            .load()
            .unwrap_err();
        assert!(err.to_string().contains(reason), "{err}");
    }
}
