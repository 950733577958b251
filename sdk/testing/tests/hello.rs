//! The harness against modules from both SDKs: hello-sdk (lacewing-sdk),
//! hello-proxy-wasm and header-echo (the official proxy-wasm crate).

use lacewing_filter_test::{FilterTest, HarnessError, Verdict, module};

fn ok_response() -> http::Response<()> {
    http::Response::builder().status(200).body(()).unwrap()
}

fn greets_the_caller(crate_name: &str) {
    let test = FilterTest::builder(module(crate_name).unwrap())
        .load()
        .unwrap();

    let mut s = test.stream(http::Request::get("/").body(()).unwrap());
    s.set_property("source.principal", "spiffe://mesh.local/ns/shop/sa/web");
    assert_eq!(s.request_headers(true), Verdict::Continue);
    assert_eq!(s.response_headers(ok_response(), true), Verdict::Continue);
    assert_eq!(
        s.response_header("x-hello").as_deref(),
        Some("hello, spiffe://mesh.local/ns/shop/sa/web")
    );

    let mut anonymous = test.stream(http::Request::get("/").body(()).unwrap());
    anonymous.request_headers(true);
    anonymous.response_headers(ok_response(), true);
    assert_eq!(
        anonymous.response_header("x-hello").as_deref(),
        Some("hello, anonymous")
    );
}

#[test]
fn hello_sdk_greets_the_caller() {
    greets_the_caller("hello-sdk");
}

#[test]
fn hello_proxy_wasm_greets_the_caller() {
    greets_the_caller("hello-proxy-wasm");
}

fn refuses_configuration(crate_name: &str) {
    let err = FilterTest::builder(module(crate_name).unwrap())
        .configuration(serde_json::json!({"greeting": "hi"}))
        .load()
        .unwrap_err();
    assert!(matches!(err, HarnessError::Rejected { .. }), "{err}");
    assert!(err.to_string().contains("takes no configuration"), "{err}");
}

#[test]
fn both_hellos_refuse_a_configuration_with_the_reason_logged() {
    refuses_configuration("hello-sdk");
    refuses_configuration("hello-proxy-wasm");
}

#[test]
fn header_echo_from_the_official_sdk_runs_in_the_harness() {
    let test = FilterTest::builder(module("header-echo").unwrap())
        .configuration(serde_json::json!("x-trace=x-echo-trace"))
        .load()
        .unwrap();
    let mut s = test.stream(
        http::Request::get("/a")
            .header("x-trace", "abc")
            .body(())
            .unwrap(),
    );
    assert_eq!(s.request_headers(true), Verdict::Continue);
    assert_eq!(s.response_headers(ok_response(), false), Verdict::Continue);
    assert_eq!(s.response_header("x-echo-trace").as_deref(), Some("abc"));
    assert_eq!(
        s.response_header("x-lacewing-filter").as_deref(),
        Some("header-echo")
    );
}

/// How many times the plugin's `callback` ran, from the host's callback counter.
fn callback_calls(test: &FilterTest, callback: &str) -> u64 {
    let label = format!("callback=\"{callback}\"");
    test.metrics_text()
        .lines()
        .find(|l| l.starts_with("lacewing_wasm_callbacks_total{") && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Runs `n` whole exchanges (request headers, response headers and body, log).
fn exchanges(test: &FilterTest, n: usize) {
    for _ in 0..n {
        let mut s = test.stream(http::Request::get("/").body(()).unwrap());
        assert_eq!(s.request_headers(true), Verdict::Continue);
        assert_eq!(s.response_headers(ok_response(), false), Verdict::Continue);
        assert_eq!(s.response_body(b"hello", true), Verdict::Continue);
        assert_eq!(s.forwarded_response_body(), b"hello");
        assert_eq!(
            s.response_header("x-hello").as_deref(),
            Some("hello, anonymous")
        );
        s.finish();
    }
}

#[test]
fn an_sdk_filter_is_not_called_again_in_the_callbacks_it_leaves_to_their_defaults() {
    // hello-sdk implements only `on_response_headers`.
    let test = FilterTest::builder(module("hello-sdk").unwrap())
        .load()
        .unwrap();
    exchanges(&test, 4);
    assert_eq!(callback_calls(&test, "proxy_on_response_headers"), 4);
    assert_eq!(callback_calls(&test, "proxy_on_delete"), 4);
    // Each default ran once, on the first stream, and told the host.
    for unused in [
        "proxy_on_request_headers",
        "proxy_on_response_body",
        "proxy_on_log",
    ] {
        assert_eq!(callback_calls(&test, unused), 1, "{unused}");
    }
    // `proxy_on_done` was declared unused when the plugin was configured.
    assert_eq!(callback_calls(&test, "proxy_on_done"), 0);
}

#[test]
fn a_module_from_the_official_sdk_gets_every_callback() {
    let test = FilterTest::builder(module("hello-proxy-wasm").unwrap())
        .load()
        .unwrap();
    exchanges(&test, 4);
    for callback in [
        "proxy_on_request_headers",
        "proxy_on_response_headers",
        "proxy_on_response_body",
        "proxy_on_log",
        "proxy_on_done",
        "proxy_on_delete",
    ] {
        assert_eq!(callback_calls(&test, callback), 4, "{callback}");
    }
}

/// An SDK module is a reactor, as the official crate's modules are: it
/// exports `_initialize`, which runs the static constructors once, so the
/// linker does not wrap every export in a call to the constructors and one
/// to the destructors (a command module's exports: about 700 instructions a
/// request for a filter).
#[test]
fn sdk_modules_export_initialize_as_official_crate_ones_do() {
    let engine = wasmtime::Engine::default();
    for crate_name in ["hello-sdk", "hello-proxy-wasm"] {
        let module = wasmtime::Module::from_file(&engine, module(crate_name).unwrap()).unwrap();
        assert!(
            module.exports().any(|e| e.name() == "_initialize"),
            "{crate_name} exports no _initialize"
        );
    }
}
