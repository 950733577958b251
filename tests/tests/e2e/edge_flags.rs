//! Filters learn how an exchange ended: a body cut after its head (the
//! upstream stalled, `UT`; the upstream broke its framing, `UPE`) is known to
//! a filter's `on_log` as `response.flags`, with Envoy's bit for the flag,
//! and in words as `response.code_details`.

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use lacewing_tests::servers;
use lacewing_tests::wasm::{self, EchoProxy, PluginRoutes, yaml_path};
use lacewing_tests::{client, eventually};

use super::edge_timers::{HANG_GUARD, Upstream};

/// The value of shared key `key`, read through the conformance filter.
async fn shared(fixture: &EchoProxy, key: &str) -> Option<String> {
    let response = fixture
        .get("/", &[("x-test", "shared-get"), ("x-shared-key", key)])
        .await;
    assert_eq!(response.status, StatusCode::OK, "shared-get {key}");
    response.header("x-shared-value").map(str::to_string)
}

#[tokio::test]
async fn a_filters_on_log_sees_the_flag_of_a_body_cut_after_its_head() {
    // A head promising 1 MB, 10 bytes of it, then nothing (cut by
    // `upstream_body_timeout`); and a body 90 bytes short of its length.
    let stalling = Upstream::stalling().await;
    let short = servers::raw_http(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b");
    let fixture = EchoProxy::start(
        PluginRoutes {
            listener_fields: "limits: { upstream_body_timeout: 300ms }",
            routes: &[
                "{ name: stall, match: { path: { prefix: /stall } }, cluster: stall, filters: [conformance] }",
                "{ name: short, match: { path: { prefix: /short } }, cluster: short, filters: [conformance] }",
                "{ name: wasm, cluster: echo, filters: [conformance] }",
            ],
            clusters: &[
                "{ name: stall, endpoints: ['{stall}'] }",
                "{ name: short, endpoints: ['{short}'] }",
            ],
            plugins: &["{ name: conformance, module: {module} }"],
        },
        &[
            ("module", &yaml_path(&wasm::module("conformance-filter"))),
            ("stall", &stalling.addr),
            ("short", &short.addr),
        ],
    )
    .await;
    // Envoy's bits: UpstreamRequestTimeout 0x4, UpstreamProtocolError 0x800000.
    for (path, flags, details) in [
        ("/stall", 0x4, "upstream response body stalled"),
        ("/short", 0x80_0000, "upstream response body: "),
    ] {
        let tag = format!("flags{}", &path[1..]);
        let request = Request::get(fixture.url(path))
            .header("x-log-tag", &tag)
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = client::send_streaming(request).await;
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let body = tokio::time::timeout(HANG_GUARD, response.into_body().collect())
            .await
            .expect("the body ends");
        assert!(body.is_err(), "{path}: a cut body is an error");
        let code_key = format!("conformance-log-{tag}");
        let flags_key = format!("conformance-log-flags-{tag}");
        eventually(&format!("{path}: on_log ran"), || async {
            shared(&fixture, &code_key).await.as_deref() == Some("200")
        })
        .await;
        assert_eq!(
            shared(&fixture, &flags_key).await,
            Some(flags.to_string()),
            "{path}: response.flags in on_log"
        );
        let logged = shared(&fixture, &format!("conformance-log-details-{tag}")).await;
        assert!(
            logged.as_deref().is_some_and(|d| d.contains(details)),
            "{path}: response.code_details in on_log: {logged:?}"
        );
    }
}
