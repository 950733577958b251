//! proxy-wasm conformance through a real proxy: the `conformance-filter` and
//! `tcp-filter` test modules (built with the official `proxy-wasm` crate) and
//! hand-written ABI 0.1.0 / 0.2.0 modules, between real clients and real
//! upstreams. Each test covers one host-function area or callback group and
//! asserts what a client sees: the module reports every outcome in response
//! headers (see `tests/modules/conformance-filter/src/http.rs` for the cases).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use http_body::Frame;
use http_body_util::{Full, StreamBody};
use lacewing_proxy::ProxyHandle;
use lacewing_tests::body::GeneratedBody;
use lacewing_tests::client::{self, Response};
use lacewing_tests::envoy::{self, Envoy};
use lacewing_tests::grpc::{EchoReply, EchoRequest, NOT_FOUND_MESSAGE};
use lacewing_tests::servers::{self, TestServer};
use lacewing_tests::wasm::{self, EchoProxy, PluginRoutes, WatShape, get_with, yaml_path};
use lacewing_tests::{eventually, proxy};
use prost::Message;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// The name of the conformance plugin in [`conformance_yaml`].
const PLUGIN: &str = "conformance";
/// Its `root_id`.
const ROOT_ID: &str = "conformance-root";
/// Its `vm_id`.
const VM_ID: &str = "conformance";
/// Its VM configuration.
const VM_CONFIGURATION: &str = "vm-config-text";
/// sha256("lacewing"), what the host's `sha256` foreign function must return.
const SHA256_OF_LACEWING: &str = "820653469d93b28f3012e6c09f9142051a9df5c120cc1e29cc4e37520a987e9b";

/// A proxy running the conformance module on route `/` of listener `main`
/// (and no plugin on `/plain`), with its upstreams kept alive.
struct Conformance {
    proxy: ProxyHandle,
    _echo: TestServer,
    _grpc: TestServer,
}

impl Conformance {
    /// Starts echo and gRPC upstreams and a proxy whose plugin gets `configuration`.
    async fn start(configuration: &str) -> Self {
        let echo = servers::http_echo().await;
        let grpc = servers::grpc_echo().await;
        let yaml = conformance_yaml(echo.addr, grpc.addr, configuration);
        Self {
            proxy: proxy::start(&yaml),
            _echo: echo,
            _grpc: grpc,
        }
    }

    fn url(&self, path: &str) -> String {
        proxy::url(&self.proxy, "main", path)
    }

    /// GET `path` with `headers`.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        get_with(&self.url(path), headers).await
    }

    /// Runs the `x-test` cases and returns the response.
    async fn case(&self, cases: &str, headers: &[(&str, &str)]) -> Response {
        let mut all = vec![("x-test", cases)];
        all.extend_from_slice(headers);
        self.get("/conformance", &all).await
    }

    /// The shared-data value of `key`, read through the module (`None` when NotFound).
    async fn shared(&self, key: &str) -> Option<String> {
        let response = self.case("shared-get", &[("x-shared-key", key)]).await;
        assert_eq!(response.status, StatusCode::OK, "shared-get {key}");
        response.header("x-shared-value").map(str::to_string)
    }

    async fn metrics(&self) -> String {
        client::metrics(proxy::admin_addr(&self.proxy)).await
    }

    /// The route without the plugin answers normally.
    async fn assert_plain_route_serves(&self) {
        let response = self.get("/plain/ping", &[]).await;
        assert_eq!(response.status, StatusCode::OK, "route without the plugin");
        assert_eq!(response.header(servers::UPSTREAM_HEADER), Some("echo"));
    }
}

/// The conformance module's path, quoted for YAML.
fn conformance_module() -> String {
    yaml_path(&wasm::module("conformance-filter"))
}

/// Listener `main`: `/plain` without plugins, `/trailers` to the echo server over
/// h2 with the plugin, everything else to the echo server with the plugin.
pub(super) fn conformance_yaml(echo: SocketAddr, grpc: SocketAddr, configuration: &str) -> String {
    wasm::echo_proxy_yaml(
        echo,
        PluginRoutes {
            listener_fields: "",
            routes: &[
                "{ name: plain, match: { path: { prefix: /plain } }, cluster: echo }",
                "{ name: trailers, match: { path: { prefix: /trailers } }, cluster: echo_h2, filters: [conformance] }",
                "{ name: wasm, match: { path: { prefix: / } }, cluster: echo, filters: [conformance] }",
            ],
            clusters: &[
                "{ name: echo_h2, endpoints: [\"{echo}\"], protocol: h2 }",
                "{ name: callout, endpoints: [\"{echo}\"] }",
                "{ name: grpc, endpoints: [\"{grpc}\"], protocol: h2 }",
            ],
            plugins: &[concat!(
                "{ name: conformance, module: {module}, root_id: conformance-root, vm_id: conformance, ",
                "configuration: \"{configuration}\", vm_configuration: \"vm-config-text\", ",
                "env: { LACEWING_TEST_ENV: \"from-config\" } }",
            )],
        },
        &[
            ("echo", &echo),
            ("grpc", &grpc),
            ("module", &conformance_module()),
            ("configuration", &configuration),
        ],
    )
}

fn request_with(method: &str, url: &str, headers: &[(&str, &str)]) -> http::request::Builder {
    let mut builder = Request::builder().method(method).uri(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    builder
}

/// Starts a conformance proxy with an empty plugin configuration and runs the
/// `x-test` cases once; the proxy stops once the response is in.
async fn request_case(cases: &str) -> Response {
    Conformance::start("").await.case(cases, &[]).await
}

/// Asserts each `(name, value)` response header; prints the whole response on failure.
#[track_caller]
fn assert_headers(response: &Response, expected: &[(&str, &str)]) {
    for (name, value) in expected {
        assert_eq!(
            response.header(name),
            Some(*value),
            "response header `{name}`; whole response: {response:#?}"
        );
    }
}

/// Asserts status 200 and each `(name, value)` response header; prints the
/// whole response on failure.
#[track_caller]
fn assert_ok_with_headers(response: &Response, expected: &[(&str, &str)]) {
    assert_eq!(
        response.status,
        StatusCode::OK,
        "status; whole response: {response:#?}"
    );
    assert_headers(response, expected);
}

fn header<'a>(response: &'a Response, name: &str) -> &'a str {
    response.header(name).unwrap_or_else(|| {
        panic!(
            "response has no `{name}` header; status {}, headers {:?}",
            response.status, response.headers
        )
    })
}

fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!("{prefix}-{}-{nanos}", std::process::id())
}

fn plugin_metric(text: &str, family: &str, plugin: &str, name: &str) -> Option<f64> {
    client::metric_sum(text, family, &[("plugin", plugin), ("name", name)])
}

#[tokio::test]
async fn log_and_get_log_level_report_ok_and_the_host_level() {
    let response = request_case("log").await;
    assert_ok_with_headers(
        &response,
        &[("x-log-status", "Ok"), ("x-log-level", "Info")],
    );
}

#[tokio::test]
async fn get_current_time_is_the_wall_clock() {
    let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let response = request_case("time").await;
    let after = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let nanos: u128 = header(&response, "x-current-time-ns").parse().unwrap();
    // The ABI allows an approximate clock; a minute either side rules out a wrong epoch or unit.
    let slack = Duration::from_secs(60).as_nanos();
    assert!(
        nanos + slack >= before.as_nanos() && nanos <= after.as_nanos() + slack,
        "module time {nanos} ns is not near the test's clock {}..{}",
        before.as_nanos(),
        after.as_nanos()
    );
}

#[tokio::test]
async fn on_vm_start_and_on_configure_read_their_configuration() {
    let conformance = Conformance::start("tag=Z").await;
    let response = conformance.case("config", &[]).await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-vm-config", VM_CONFIGURATION),
            ("x-plugin-config", "tag=Z"),
        ],
    );
}

#[tokio::test]
async fn wasi_environment_clock_arguments_and_stdout() {
    let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    let response = request_case("wasi").await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-wasi-env", "from-config"),
            ("x-wasi-args", "0"),
            ("x-wasi-stdout", "Ok"),
        ],
    );
    let nanos: u128 = header(&response, "x-wasi-clock-ns").parse().unwrap();
    let slack = Duration::from_secs(60).as_nanos();
    assert!(
        nanos + slack >= before.as_nanos() && nanos <= before.as_nanos() + 2 * slack,
        "WASI realtime clock {nanos} ns is not near the test's clock {}",
        before.as_nanos()
    );
}

#[tokio::test]
async fn header_map_size_and_body_buffer_status() {
    let conformance = Conformance::start("").await;
    let request = request_with(
        "POST",
        &conformance.url("/conformance"),
        &[
            ("x-test", "sizes,request-body"),
            ("x-padding", "some value"),
        ],
    )
    .body(GeneratedBody::chunked(1000))
    .expect("valid request");
    let response = client::send(request).await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-map-size-matches", "true"),
            ("x-request-body-status-size", "1000"),
        ],
    );
}

#[tokio::test]
async fn request_header_get_set_add_replace_remove() {
    let conformance = Conformance::start("").await;
    let response = conformance
        .case(
            "headers",
            &[
                ("x-in", "hello"),
                ("x-replace", "original"),
                ("x-remove", "bye"),
                ("x-multi", "one"),
            ],
        )
        .await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-got-in", "hello"),
            ("x-status-missing-header", "NotFound"),
            ("x-check-replace", "replaced"),
            ("x-check-add", "added"),
            ("x-check-remove", "NotFound"),
            ("x-check-multi-count", "2"),
        ],
    );
    let pseudo = header(&response, "x-request-pseudo");
    for name in [":authority", ":method", ":path"] {
        assert!(
            pseudo.split(',').any(|p| p == name),
            "{name} missing from {pseudo}"
        );
    }
    // What the upstream received.
    assert_eq!(
        response.echoed_header("x-replace").as_deref(),
        Some("replaced")
    );
    assert_eq!(response.echoed_header("x-add").as_deref(), Some("added"));
    assert_eq!(
        response.echoed_header("x-multi").as_deref(),
        Some("one, two")
    );
    assert_eq!(response.echoed_header("x-remove"), None);
}

#[tokio::test]
async fn whole_request_header_map_get_and_set() {
    let conformance = Conformance::start("").await;
    let response = conformance
        .get(
            "/map/path?q=1",
            &[
                ("x-test", "request-map"),
                ("x-drop-a", "1"),
                ("x-drop-b", "2"),
                ("x-keep", "kept"),
            ],
        )
        .await;
    assert_ok_with_headers(
        &response,
        &[("x-map-dropped", "2"), ("x-check-map-set", "1")],
    );
    let echo = response.json();
    assert_eq!(
        echo["method"], "GET",
        "pseudo-headers survive a whole-map set"
    );
    assert_eq!(echo["path"], "/map/path");
    assert_eq!(echo["query"], "q=1");
    assert_eq!(response.echoed_header("x-keep").as_deref(), Some("kept"));
    assert_eq!(response.echoed_header("x-map-set").as_deref(), Some("1"));
    assert_eq!(response.echoed_header("x-drop-a"), None);
    assert_eq!(response.echoed_header("x-drop-b"), None);
}

#[tokio::test]
async fn response_header_get_set_add_replace_remove() {
    let response = request_case("response-headers").await;
    assert_ok_with_headers(&response, &[("x-resp-add", "added")]);
    let replaced: Vec<_> = response.headers.get_all("x-resp-replace").iter().collect();
    assert_eq!(replaced, vec![HeaderValue::from_static("replaced")]);
    assert_eq!(response.header("x-resp-temp"), None);
    assert_headers(
        &response,
        &[
            ("x-resp-removed", "NotFound"),
            ("x-resp-status-seen", "200"),
            (servers::UPSTREAM_HEADER, "echo"),
        ],
    );
}

#[tokio::test]
async fn whole_response_header_map_set_keeps_status_and_headers() {
    let response = request_case("response-map").await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-resp-map-set", "1"),
            (servers::UPSTREAM_HEADER, "echo"),
            ("content-type", "application/json"),
        ],
    );
    assert_eq!(response.json()["path"], "/conformance");
}

#[tokio::test]
async fn request_trailers_are_read_and_rewritten() {
    let conformance = Conformance::start("").await;
    let mut trailers = HeaderMap::new();
    trailers.insert("x-trailer-in", HeaderValue::from_static("t1"));
    let frames = vec![
        Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"body with trailers"))),
        Ok(Frame::trailers(trailers)),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let request = request_with(
        "POST",
        &conformance.url("/conformance"),
        &[("x-test", "request-trailers")],
    )
    .body(body)
    .expect("valid request");
    let response = client::send_h2(request).await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-request-trailer", "t1"),
            ("x-request-trailer-count", "1"),
        ],
    );
    assert_eq!(response.json()["body_len"], 18);
}

#[tokio::test]
async fn response_trailers_are_read_and_extended() {
    let conformance = Conformance::start("").await;
    let request = request_with(
        "GET",
        &conformance.url("/trailers"),
        &[("x-test", "response-trailers")],
    )
    .body(Full::new(Bytes::new()))
    .expect("valid request");
    let response = client::send_h2(request).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.text(), "body before trailers");
    let trailers = response
        .trailers
        .as_ref()
        .expect("the response has trailers");
    assert_eq!(
        trailers.get("x-trailer").and_then(|v| v.to_str().ok()),
        Some("yes")
    );
    assert_eq!(
        trailers
            .get("x-resp-trailer-added")
            .and_then(|v| v.to_str().ok()),
        Some("x-trailer"),
        "the module saw the upstream's trailers and added one; trailers: {trailers:?}"
    );
}

#[tokio::test]
async fn request_body_is_buffered_to_the_end_then_rewritten() {
    let conformance = Conformance::start("").await;
    // Four 64 KiB chunks and a remainder: several body callbacks, each paused.
    let length = 200_000u64;
    let request = request_with(
        "POST",
        &conformance.url("/conformance"),
        &[("x-test", "request-body")],
    )
    .body(GeneratedBody::chunked(length))
    .expect("valid request");
    let response = client::send(request).await;
    assert_ok_with_headers(&response, &[("x-request-body-len", &length.to_string())]);
    let rewritten = length + "-REWRITTEN".len() as u64;
    assert_eq!(
        response.json()["body_len"],
        rewritten,
        "the upstream received the body the module wrote"
    );
}

#[tokio::test]
async fn response_body_is_buffered_to_the_end_then_replaced() {
    let conformance = Conformance::start("").await;
    let response = conformance
        .get("/bytes/200000", &[("x-test", "response-body")])
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.text(), "response-rewritten:200000");
}

#[tokio::test]
async fn buffering_a_body_beyond_max_buffered_body_answers_413() {
    let fixture = EchoProxy::start(
        PluginRoutes {
            listener_fields: "limits: { max_buffered_body: 64KiB }",
            routes: &[
                "{ name: plain, match: { path: { prefix: /plain } }, cluster: echo }",
                "{ name: wasm, cluster: echo, filters: [conformance] }",
            ],
            clusters: &[],
            plugins: &["{ name: conformance, module: {module} }"],
        },
        &[("module", &conformance_module())],
    )
    .await;
    // The proxy answers 413 and closes while the client is still writing;
    // it reads and discards the rest for a while before closing, so the
    // client reads the answer rather than a reset.
    let request = request_with("POST", &fixture.url("/big"), &[("x-test", "request-body")])
        .body(GeneratedBody::chunked(1024 * 1024))
        .expect("valid request");
    let response = client::send_streaming(request).await;
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // A body within the limit is still buffered and rewritten.
    let request = request_with(
        "POST",
        &fixture.url("/small"),
        &[("x-test", "request-body")],
    )
    .body(GeneratedBody::chunked(1000))
    .expect("valid request");
    let response = client::send(request).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.json()["body_len"], 1010);
}

#[tokio::test]
async fn properties_of_request_connection_and_plugin_are_readable() {
    let conformance = Conformance::start("").await;
    let port = proxy::listener_addr(&conformance.proxy, "main").port();
    let response = conformance
        .get(
            "/props/path?q=1",
            &[("x-test", "properties"), ("x-prop-probe", "probe-value")],
        )
        .await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-prop-path", "/props/path?q=1"),
            ("x-prop-method", "GET"),
            ("x-prop-header", "probe-value"),
        ],
    );
    let source = header(&response, "x-prop-source-address");
    let (ip, source_port) = source
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("source.address `{source}` is not ip:port"));
    assert_eq!(ip, "127.0.0.1");
    assert!(
        source_port.parse::<u16>().is_ok(),
        "source.address `{source}`"
    );
    assert_headers(
        &response,
        &[
            ("x-prop-destination-port", &port.to_string()),
            ("x-prop-plugin-name", PLUGIN),
            ("x-prop-plugin-root-id", ROOT_ID),
            ("x-status-unknown-property", "NotFound"),
        ],
    );
}

#[tokio::test]
async fn set_property_then_get_property_round_trips() {
    let response = request_case("set-property").await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-status-set-property", "Ok"),
            ("x-prop-roundtrip", "marked"),
        ],
    );
}

#[tokio::test]
async fn on_log_reads_response_code_and_on_done_runs() {
    let conformance = Conformance::start("").await;
    let tag = unique("log");
    let response = conformance
        .get("/status/404", &[("x-log-tag", tag.as_str())])
        .await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    let log_key = format!("conformance-log-{tag}");
    let done_key = format!("conformance-done-{tag}");
    eventually("on_log stored response.code", || async {
        conformance.shared(&log_key).await.as_deref() == Some("404")
    })
    .await;
    eventually("on_done ran", || async {
        conformance.shared(&done_key).await.as_deref() == Some("1")
    })
    .await;
}

#[tokio::test]
async fn on_done_false_then_proxy_done_from_the_root_context() {
    let conformance = Conformance::start("").await;
    let tag = unique("deferred");
    let response = conformance
        .case("deferred-done", &[("x-log-tag", tag.as_str())])
        .await;
    assert_eq!(response.status, StatusCode::OK);
    let key = format!("conformance-deferred-done-{tag}");
    eventually(
        "the root context called set_effective_context and proxy_done",
        || async { conformance.shared(&key).await.as_deref() == Some("Ok,Ok") },
    )
    .await;
    // The VM is intact afterwards.
    let next = conformance.case("global", &[]).await;
    assert_eq!(next.status, StatusCode::OK);
}

#[tokio::test]
async fn send_http_response_answers_locally() {
    let response = request_case("local-reply").await;
    assert_eq!(response.status, StatusCode::IM_A_TEAPOT);
    assert_headers(&response, &[("x-local", "yes")]);
    assert_eq!(response.text(), "short-circuit");
    assert_eq!(response.header(servers::UPSTREAM_HEADER), None);
}

#[tokio::test]
async fn http_callout_pauses_the_request_then_resumes_it() {
    let conformance = Conformance::start("").await;
    let response = conformance
        .case("callout", &[("x-callout-path", "/callout/probe")])
        .await;
    assert_ok_with_headers(&response, &[("x-callout-status", "200")]);
    let body_len: usize = header(&response, "x-callout-body-len").parse().unwrap();
    assert!(body_len > 0, "the callout response body was readable");
    assert!(
        header(&response, "x-callout-header-count")
            .parse::<usize>()
            .unwrap()
            > 0,
        "the callout response headers were readable"
    );
    // The request went on upstream only after the callout, with the header set in its callback.
    assert_eq!(
        response.echoed_header("x-callout-done").as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn http_callout_response_can_answer_the_request_locally() {
    let conformance = Conformance::start("").await;
    let response = conformance
        .case("callout-local", &[("x-callout-path", "/status/202")])
        .await;
    assert_ok_with_headers(
        &response,
        &[("x-local", "callout"), ("x-callout-status", "202")],
    );
    assert_eq!(response.text(), "status 202");
}

#[tokio::test]
async fn http_callout_to_unknown_cluster_is_bad_argument() {
    let response = request_case("callout-unknown").await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-callout-error", "BadArgument"),
            (servers::UPSTREAM_HEADER, "echo"),
        ],
    );
}

fn grpc_headers(method: &str, request: &EchoRequest) -> Vec<(&'static str, String)> {
    let hex: String = request
        .encode_to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    vec![
        ("x-grpc-cluster", "grpc".to_string()),
        ("x-grpc-service", "lacewing.test.Echo".to_string()),
        ("x-grpc-method", method.to_string()),
        ("x-grpc-message", hex),
    ]
}

impl Conformance {
    /// Runs the gRPC case `cases`, whose module calls `method` with `request`
    /// on cluster `grpc`.
    async fn grpc_case(&self, cases: &str, method: &str, request: &EchoRequest) -> Response {
        let headers = grpc_headers(method, request);
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        self.case(cases, &headers).await
    }
}

fn echo_request(message: &str, count: u32) -> EchoRequest {
    EchoRequest {
        message: message.to_string(),
        count,
    }
}

fn from_hex(text: &str) -> Vec<u8> {
    (0..text.len() / 2)
        .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).expect("hex from the module"))
        .collect()
}

#[tokio::test]
async fn grpc_callout_delivers_the_reply_message() {
    let conformance = Conformance::start("").await;
    let response = conformance
        .grpc_case("grpc", "Echo", &echo_request("ping", 0))
        .await;
    assert_ok_with_headers(&response, &[("x-grpc-status", "0")]);
    let reply = EchoReply::decode(from_hex(header(&response, "x-grpc-response")).as_slice())
        .expect("the module got an EchoReply");
    assert_eq!(reply.message, "ping");

    let response = conformance
        .grpc_case("grpc", "Echo", &echo_request(NOT_FOUND_MESSAGE, 0))
        .await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(header(&response, "x-grpc-status"), "5", "gRPC NOT_FOUND");
    assert_eq!(
        header(&response, "x-grpc-status-message"),
        format!("nothing called `{NOT_FOUND_MESSAGE}`")
    );
}

#[tokio::test]
async fn grpc_stream_delivers_metadata_messages_and_close() {
    let conformance = Conformance::start("").await;
    let response = conformance
        .grpc_case("grpc-stream", "Repeat", &echo_request("tick", 3))
        .await;
    assert_ok_with_headers(&response, &[("x-grpc-stream-send", "Ok")]);
    assert!(
        header(&response, "x-grpc-stream-content-type").starts_with("application/grpc"),
        "initial metadata was readable"
    );
    assert_headers(
        &response,
        &[("x-grpc-stream-status", "0"), ("x-grpc-stream-count", "3")],
    );
    let replies: Vec<EchoReply> = header(&response, "x-grpc-stream-messages")
        .split(',')
        .map(|hex| EchoReply::decode(from_hex(hex).as_slice()).expect("an EchoReply"))
        .collect();
    let indexes: Vec<u32> = replies.iter().map(|r| r.index).collect();
    assert_eq!(indexes, [0, 1, 2]);
    assert!(replies.iter().all(|r| r.message == "tick"));
    assert_eq!(header(&response, servers::UPSTREAM_HEADER), "echo");
}

#[tokio::test]
async fn grpc_cancel_and_close_of_unknown_calls() {
    let conformance = Conformance::start("").await;
    let response = conformance
        .grpc_case("grpc-cancel", "Echo", &echo_request("ping", 0))
        .await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-grpc-cancel", "Ok"),
            ("x-grpc-cancel-again", "NotFound"),
            ("x-grpc-close-unknown", "NotFound"),
        ],
    );
    // The cancelled call delivers nothing later: the VM keeps serving.
    let next = conformance.case("global", &[]).await;
    assert_eq!(next.status, StatusCode::OK);
}

#[tokio::test]
async fn plugin_metrics_define_increment_record_get_and_export() {
    let conformance = Conformance::start("").await;
    let first = conformance.case("metrics", &[]).await;
    assert_headers(
        &first,
        &[
            ("x-metric-increment", "Ok"),
            ("x-metric-record-gauge", "Ok"),
            ("x-metric-record-histogram", "Ok"),
            ("x-metric-counter", "1"),
            ("x-metric-gauge", "42"),
            ("x-metric-unknown", "NotFound"),
        ],
    );
    let second = conformance.case("metrics", &[]).await;
    assert_headers(&second, &[("x-metric-counter", "2")]);

    let text = conformance.metrics().await;
    let counter = "lacewing_wasm_plugin_counter";
    let gauge = "lacewing_wasm_plugin_gauge";
    let histogram_count = "lacewing_wasm_plugin_histogram_count";
    assert_eq!(
        plugin_metric(&text, counter, PLUGIN, "conformance_requests_total"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        plugin_metric(&text, gauge, PLUGIN, "conformance_gauge"),
        Some(42.0),
        "{text}"
    );
    assert_eq!(
        plugin_metric(&text, histogram_count, PLUGIN, "conformance_sample"),
        Some(2.0),
        "{text}"
    );
}

#[tokio::test]
async fn shared_data_set_get_and_stale_cas_is_cas_mismatch() {
    let conformance = Conformance::start("").await;
    let key = unique("cas");
    let response = conformance
        .case("shared", &[("x-shared-key", key.as_str())])
        .await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-shared-first-set", "Ok"),
            ("x-shared-after-first", "first"),
            ("x-shared-second-set", "Ok"),
            ("x-shared-stale-cas", "CasMismatch"),
            ("x-shared-value", "second"),
            ("x-shared-cas-changed", "true"),
        ],
    );

    // Values outlive the request that wrote them; missing keys are NotFound.
    let other = unique("kv");
    let set = conformance
        .case(
            "shared-set",
            &[("x-shared-key", other.as_str()), ("x-shared-value", "v1")],
        )
        .await;
    assert_headers(&set, &[("x-shared-set", "Ok")]);
    assert_eq!(conformance.shared(&other).await.as_deref(), Some("v1"));
    let missing = conformance
        .case("shared-get", &[("x-shared-key", &unique("missing"))])
        .await;
    assert_headers(&missing, &[("x-shared-status", "NotFound")]);
}

#[tokio::test]
async fn shared_queue_enqueue_wakes_on_queue_ready() {
    let conformance = Conformance::start("").await;
    let item = unique("item");
    let response = conformance
        .case(
            "queue",
            &[("x-queue-vm-id", VM_ID), ("x-queue-value", item.as_str())],
        )
        .await;
    assert_ok_with_headers(&response, &[("x-queue-enqueue", "Ok")]);
    eventually("on_queue_ready dequeued the item", || async {
        conformance
            .shared("conformance-queue-last")
            .await
            .as_deref()
            == Some(item.as_str())
    })
    .await;

    let response = conformance
        .case("queue-empty", &[("x-queue-vm-id", VM_ID)])
        .await;
    assert_headers(
        &response,
        &[
            ("x-queue-dequeue", "Empty"),
            ("x-queue-resolve-unknown", "NotFound"),
            ("x-queue-enqueue-unknown", "NotFound"),
        ],
    );
}

#[tokio::test]
async fn tick_period_drives_on_tick() {
    let conformance = Conformance::start("tick_ms=20").await;
    eventually("on_tick ran at least twice", || async {
        conformance
            .shared("conformance-ticks")
            .await
            .and_then(|v| v.parse::<u64>().ok())
            .is_some_and(|ticks| ticks >= 2)
    })
    .await;
}

#[tokio::test]
async fn foreign_function_sha256_and_unknown_name_is_not_found() {
    let response = request_case("foreign").await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-foreign-sha256", SHA256_OF_LACEWING),
            ("x-foreign-unknown", "NotFound"),
        ],
    );
}

#[tokio::test]
async fn out_of_bounds_pointers_get_invalid_memory_access() {
    let conformance = Conformance::start("").await;
    let response = conformance.case("oob", &[]).await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-status-oob-key", "InvalidMemoryAccess"),
            ("x-status-oob-return", "InvalidMemoryAccess"),
            ("x-status-oob-log", "InvalidMemoryAccess"),
        ],
    );
    // The VM is intact: the next request works.
    let next = conformance.case("global", &[]).await;
    assert_eq!(next.status, StatusCode::OK);
    assert!(next.header("x-global-counter").is_some());
}

#[tokio::test]
async fn unknown_map_and_buffer_types_are_bad_argument() {
    let response = request_case("bad-map").await;
    assert_ok_with_headers(
        &response,
        &[
            ("x-status-bad-map", "BadArgument"),
            ("x-status-bad-buffer", "BadArgument"),
        ],
    );
}

#[tokio::test]
async fn reset_http_request_closes_the_stream_without_a_response() {
    let conformance = Conformance::start("").await;
    let addr = proxy::listener_addr(&conformance.proxy, "main");
    let exchange = client::raw_exchange(
        addr,
        b"GET /conformance HTTP/1.1\r\nhost: test\r\nx-test: reset\r\n\r\n",
    )
    .await;
    assert!(exchange.closed, "the proxy closed the connection");
    assert_ne!(exchange.status(), Some(200), "{}", exchange.text());
    conformance.assert_plain_route_serves().await;
}

/// Two plugins from the conformance module, `closed` and `open`, on `/closed` and `/open`.
async fn fail_policy_proxy() -> EchoProxy {
    EchoProxy::start(
        PluginRoutes {
            listener_fields: "",
            routes: &[
                "{ name: closed, match: { path: { prefix: /closed } }, cluster: echo, filters: [closed] }",
                "{ name: open, match: { path: { prefix: /open } }, cluster: echo, filters: [open] }",
                "{ name: plain, cluster: echo }",
            ],
            clusters: &[],
            plugins: &[
                "{ name: closed, module: {module}, vm_id: closed, fail: closed }",
                "{ name: open, module: {module}, vm_id: open, fail: open }",
            ],
        },
        &[("module", &conformance_module())],
    )
    .await
}

#[tokio::test]
async fn trap_fails_closed_with_503_or_open_with_passthrough() {
    let fixture = fail_policy_proxy().await;
    let trap = [("x-test", "trap")];

    let closed = get_with(&fixture.url("/closed"), &trap).await;
    assert_eq!(closed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(closed.header(servers::UPSTREAM_HEADER), None);

    let open = get_with(&fixture.url("/open"), &trap).await;
    assert_eq!(open.status, StatusCode::OK, "fail open skips the plugin");
    assert_eq!(open.header(servers::UPSTREAM_HEADER), Some("echo"));
    assert_eq!(open.json()["path"], "/open");

    let plain = client::get(&fixture.url("/plain")).await;
    assert_eq!(plain.status, StatusCode::OK);
}

#[tokio::test]
async fn vm_is_recreated_after_a_trap() {
    let conformance = Conformance::start("").await;
    let trapped = conformance.case("trap", &[]).await;
    assert_eq!(trapped.status, StatusCode::SERVICE_UNAVAILABLE);
    conformance.assert_plain_route_serves().await;

    let next = conformance.case("global", &[]).await;
    assert_eq!(
        next.status,
        StatusCode::OK,
        "the next request runs in a new VM"
    );
    assert_eq!(header(&next, "x-global-counter"), "1", "fresh VM memory");

    let text = conformance.metrics().await;
    let restarts = client::metric_sum(
        &text,
        "lacewing_wasm_vm_restarts_total",
        &[("plugin", PLUGIN)],
    );
    assert!(
        restarts.is_some_and(|n| n > 0.0),
        "lacewing_wasm_vm_restarts_total{{plugin=\"{PLUGIN}\"}} is {restarts:?}\n{text}"
    );
}

#[tokio::test]
async fn module_that_traps_once_then_behaves_serves_the_next_request() {
    let conformance = Conformance::start("").await;
    let key = unique("trap-once");
    let headers = [("x-shared-key", key.as_str())];
    let first = conformance.case("trap-once", &headers).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    let second = conformance.case("trap-once", &headers).await;
    assert_ok_with_headers(
        &second,
        &[
            ("x-trap-once", "recovered"),
            (servers::UPSTREAM_HEADER, "echo"),
        ],
    );
}

#[tokio::test]
async fn three_plugins_run_in_chain_order() {
    let fixture = EchoProxy::start(
        PluginRoutes {
            listener_fields: "filters: [first]",
            routes: &["{ name: all, cluster: echo, filters: [second, third] }"],
            clusters: &[],
            plugins: &[
                "{ name: first, module: {module}, vm_id: first, configuration: \"tag=A\" }",
                "{ name: second, module: {module}, vm_id: second, configuration: \"tag=B\" }",
                "{ name: third, module: {module}, vm_id: third, configuration: \"tag=C\" }",
            ],
        },
        &[("module", &conformance_module())],
    )
    .await;
    let response = client::get(&fixture.url("/chain")).await;
    // Request phase: listener plugin first, then the route's, in the order written.
    assert_ok_with_headers(
        &response,
        &[
            ("x-chain-request-a", "A"),
            ("x-chain-request-b", "A,B"),
            ("x-chain-request-c", "A,B,C"),
        ],
    );
    assert_eq!(response.echoed_header("x-chain").as_deref(), Some("A,B,C"));
    // Response phase: the reverse order.
    assert_headers(&response, &[("x-response-chain", "C,B,A")]);
}

#[tokio::test]
async fn plugins_with_the_same_vm_id_share_one_vm() {
    let fixture = EchoProxy::start(
        PluginRoutes {
            listener_fields: "",
            routes: &[
                "{ name: one, match: { path: { prefix: /one } }, cluster: echo, filters: [one] }",
                "{ name: two, match: { path: { prefix: /two } }, cluster: echo, filters: [two] }",
                "{ name: alone, match: { path: { prefix: /alone } }, cluster: echo, filters: [alone] }",
            ],
            clusters: &[],
            plugins: &[
                "{ name: one, module: {module}, vm_id: together }",
                "{ name: two, module: {module}, vm_id: together }",
                "{ name: alone, module: {module}, vm_id: apart }",
            ],
        },
        &[("module", &conformance_module())],
    )
    .await;
    let global = [("x-test", "global")];
    let mut counters = Vec::new();
    for path in ["/one", "/two", "/one", "/alone"] {
        let response = get_with(&fixture.url(path), &global).await;
        assert_eq!(response.status, StatusCode::OK, "{path}");
        counters.push(header(&response, "x-global-counter").to_string());
    }
    assert_eq!(
        counters,
        ["1", "2", "3", "1"],
        "`one` and `two` count in one VM's memory; `alone` has its own VM"
    );
}

/// A hand-written module for an older ABI: adds `x-abi-request: <version>` to
/// the request and `x-abi-version: <version>` to the response.
fn older_abi_module(version: &str) -> PathBuf {
    let (marker, params) = match version {
        "0.1.0" => ("proxy_abi_version_0_1_0", "(param i32 i32)"),
        "0.2.0" => ("proxy_abi_version_0_2_0", "(param i32 i32 i32)"),
        other => panic!("no module for ABI {other}"),
    };
    let body = format!(
        r#"
  (data (i32.const 0) "x-abi-request")
  (data (i32.const 16) "x-abi-version")
  (data (i32.const 32) "{version}")
  (func (export "proxy_on_request_headers") {params} (result i32)
    (drop (call $add (i32.const 0) (i32.const 0) (i32.const 13) (i32.const 32) (i32.const 5)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") {params} (result i32)
    (drop (call $add (i32.const 2) (i32.const 16) (i32.const 13) (i32.const 32) (i32.const 5)))
    (i32.const 0))
"#
    );
    let imports = r#"  (import "env" "proxy_add_header_map_value"
    (func $add (param i32 i32 i32 i32 i32) (result i32)))"#;
    let shape = WatShape {
        abi_marker: Some(marker),
        allocator: true,
    };
    wasm::wat_file(
        &format!("abi-{}", version.replace('.', "-")),
        &wasm::proxy_wat(imports, shape, &body),
    )
}

#[tokio::test]
async fn abi_0_1_0_and_0_2_0_modules_run() {
    let fixture = EchoProxy::start(
        PluginRoutes {
            listener_fields: "",
            routes: &[
                "{ name: v010, match: { path: { prefix: /v010 } }, cluster: echo, filters: [v010] }",
                "{ name: v020, match: { path: { prefix: /v020 } }, cluster: echo, filters: [v020] }",
            ],
            clusters: &[],
            plugins: &[
                "{ name: v010, module: {v010} }",
                "{ name: v020, module: {v020} }",
            ],
        },
        &[
            ("v010", &yaml_path(&older_abi_module("0.1.0"))),
            ("v020", &yaml_path(&older_abi_module("0.2.0"))),
        ],
    )
    .await;
    for (path, version) in [("/v010", "0.1.0"), ("/v020", "0.2.0")] {
        let response = client::get(&fixture.url(path)).await;
        assert_eq!(response.status, StatusCode::OK, "ABI {version}");
        assert_eq!(header(&response, "x-abi-version"), version);
        assert_eq!(
            response.echoed_header("x-abi-request").as_deref(),
            Some(version),
            "ABI {version}: request header reached the upstream"
        );
    }
}

/// Reads one `\n`-terminated line (or times out).
async fn read_line(reader: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    tokio::time::timeout(client::EXCHANGE_TIMEOUT, reader.read_line(&mut line))
        .await
        .expect("a reply line in time")
        .expect("read a reply line");
    line
}

#[tokio::test]
async fn tcp_filter_counts_rewrites_reads_source_address_and_closes() {
    let upstream = servers::tcp_echo().await;
    let yaml = proxy::fill(
        r#"
admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
listeners:
  - { name: raw, address: 127.0.0.1:0, protocol: tcp, cluster: echo, filters: [tcp] }
clusters:
  - { name: echo, endpoints: ["{echo}"] }
plugins:
  - { name: tcp, module: {module} }
"#,
        &[
            ("echo", &upstream.addr),
            ("module", &yaml_path(&wasm::module("tcp-filter"))),
        ],
    );
    let handle = proxy::start(&yaml);
    let addr = proxy::listener_addr(&handle, "raw");

    let stream = TcpStream::connect(addr)
        .await
        .expect("connect to the tcp listener");
    let local = stream.local_addr().expect("client address");
    let mut conn = BufReader::new(stream);
    let mut sent = 0usize;
    let mut exchange = |line: &'static str| {
        sent += line.len();
        line
    };
    let plain = exchange("hello\n");
    conn.get_mut().write_all(plain.as_bytes()).await.unwrap();
    assert_eq!(read_line(&mut conn).await, "hello\n");
    let rewrite = exchange("REWRITE-ME\n");
    conn.get_mut().write_all(rewrite.as_bytes()).await.unwrap();
    let mut rewritten = [0u8; 10];
    tokio::time::timeout(client::EXCHANGE_TIMEOUT, conn.read_exact(&mut rewritten))
        .await
        .expect("rewritten bytes in time")
        .unwrap();
    assert_eq!(&rewritten, b"REWRITTEN!");
    let whoami = exchange("WHOAMI\n");
    conn.get_mut().write_all(whoami.as_bytes()).await.unwrap();
    assert_eq!(read_line(&mut conn).await, format!("source={local}\n"));
    let upstream_rewrite = exchange("UPSTREAM-REWRITE\n");
    conn.get_mut()
        .write_all(upstream_rewrite.as_bytes())
        .await
        .unwrap();
    let mut upstream_rewritten = [0u8; 18];
    tokio::time::timeout(
        client::EXCHANGE_TIMEOUT,
        conn.read_exact(&mut upstream_rewritten),
    )
    .await
    .expect("rewritten upstream bytes in time")
    .unwrap();
    assert_eq!(&upstream_rewritten, b"UPSTREAM-REWRITTEN");
    conn.get_mut().shutdown().await.unwrap();
    drop(conn);

    // A magic payload makes the filter close the connection without forwarding it.
    let exchange = client::raw_exchange(addr, b"CLOSE-ME").await;
    assert!(exchange.closed, "the filter closed the connection");
    assert!(exchange.received.is_empty(), "{}", exchange.text());

    let admin = proxy::admin_addr(&handle);
    let counter = |text: &str, name: &str| {
        client::metric_sum(
            text,
            "lacewing_wasm_plugin_counter",
            &[("plugin", "tcp"), ("name", name)],
        )
        .unwrap_or(0.0)
    };
    eventually("both connections were logged", || async {
        counter(&client::metrics(admin).await, "tcp_filter_logged_total") >= 2.0
    })
    .await;
    let text = client::metrics(admin).await;
    assert_eq!(
        counter(&text, "tcp_filter_connections_total"),
        2.0,
        "{text}"
    );
    assert_eq!(
        counter(&text, "tcp_filter_source_address_ok_total"),
        2.0,
        "{text}"
    );
    assert!(
        counter(&text, "tcp_filter_downstream_bytes_total") >= (sent + "CLOSE-ME".len()) as f64,
        "{text}"
    );
    assert!(
        counter(&text, "tcp_filter_upstream_bytes_total") > 0.0,
        "{text}"
    );
    assert!(
        counter(&text, "tcp_filter_downstream_closed_total") >= 1.0,
        "{text}"
    );
    assert!(
        counter(&text, "tcp_filter_upstream_closed_total") >= 1.0,
        "{text}"
    );
}

/// Envoy with the conformance module as an HTTP filter in front of `echo`,
/// configured like [`conformance_yaml`]'s plugin.
pub(super) async fn start_envoy(binary: &Path, echo: SocketAddr) -> Envoy {
    let module = wasm::module("conformance-filter");
    let config = proxy::fill(
        r#"
admin:
  address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
static_resources:
  listeners:
  - name: main
    address: { socket_address: { address: 127.0.0.1, port_value: 0 } }
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          route_config:
            virtual_hosts:
            - { name: all, domains: ["*"], routes: [{ match: { prefix: "/" }, route: { cluster: echo } }] }
          http_filters:
          - name: envoy.filters.http.wasm
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {plugin}
                root_id: {root_id}
                configuration: { "@type": type.googleapis.com/google.protobuf.StringValue, value: "" }
                vm_config:
                  vm_id: {vm_id}
                  runtime: envoy.wasm.runtime.v8
                  configuration: { "@type": type.googleapis.com/google.protobuf.StringValue, value: {vm_configuration} }
                  code: { local: { filename: {module} } }
          - name: envoy.filters.http.router
            typed_config: { "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }
  clusters:
  - name: echo
    connect_timeout: 1s
    type: STATIC
    load_assignment:
      cluster_name: echo
      endpoints:
      - lb_endpoints:
        - endpoint: { address: { socket_address: { address: 127.0.0.1, port_value: {echo_port} } } }
"#,
        &[
            ("plugin", &PLUGIN),
            ("root_id", &ROOT_ID),
            ("vm_id", &VM_ID),
            ("vm_configuration", &VM_CONFIGURATION),
            ("module", &yaml_path(&module)),
            ("echo_port", &echo.port()),
        ],
    );
    Envoy::start(binary, &config).await
}

/// The same GET (`path`, `headers`) sent to Envoy and to Lacewing: `(from_envoy, from_lacewing)`.
pub(super) async fn get_from_both(
    envoy: SocketAddr,
    lacewing: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (Response, Response) {
    let from_envoy = get_with(&format!("http://{envoy}{path}"), headers).await;
    let from_lacewing = get_with(&format!("http://{lacewing}{path}"), headers).await;
    (from_envoy, from_lacewing)
}

/// Asserts that Envoy's response has each header of `names` and Lacewing's
/// has the same value; `context` starts each failure message.
#[track_caller]
fn assert_same_headers(
    from_envoy: &Response,
    from_lacewing: &Response,
    names: &[&str],
    context: &str,
) {
    for name in names {
        assert!(
            from_envoy.header(name).is_some(),
            "{context}Envoy's response lacks `{name}`: {:?}",
            from_envoy.headers
        );
        assert_eq!(
            from_lacewing.header(name),
            from_envoy.header(name),
            "{context}`{name}`: Lacewing vs Envoy"
        );
    }
}

#[tokio::test]
async fn envoy_gives_the_same_header_and_property_results() {
    let Some(binary) = envoy::binary() else {
        return;
    };
    let echo = servers::http_echo().await;
    let grpc = servers::grpc_echo().await;
    let lacewing = proxy::start(&conformance_yaml(echo.addr, grpc.addr, ""));
    let envoy = start_envoy(&binary, echo.addr).await;
    let envoy_addr = envoy.listener();
    let lacewing_addr = proxy::listener_addr(&lacewing, "main");

    let request_headers = [
        ("x-test", "headers,properties,set-property"),
        ("x-in", "hello"),
        ("x-replace", "original"),
        ("x-remove", "bye"),
        ("x-multi", "one"),
        ("x-prop-probe", "probe-value"),
    ];
    let path = "/props/path?q=1";
    let (from_envoy, from_lacewing) =
        get_from_both(envoy_addr, lacewing_addr, path, &request_headers).await;
    assert_eq!(from_envoy.status, StatusCode::OK, "Envoy: {:?}", from_envoy);
    assert_eq!(from_lacewing.status, StatusCode::OK);

    let same = [
        "x-got-in",
        "x-status-missing-header",
        "x-check-replace",
        "x-check-add",
        "x-check-remove",
        "x-check-multi-count",
        "x-prop-path",
        "x-prop-method",
        "x-prop-header",
        "x-prop-plugin-name",
        "x-prop-plugin-root-id",
        "x-status-unknown-property",
        "x-status-set-property",
        "x-prop-roundtrip",
    ];
    assert_same_headers(&from_envoy, &from_lacewing, &same, "");
    for (response, port) in [
        (&from_envoy, envoy_addr.port()),
        (&from_lacewing, lacewing_addr.port()),
    ] {
        assert_eq!(
            header(response, "x-prop-destination-port"),
            port.to_string()
        );
        let source = header(response, "x-prop-source-address");
        assert!(
            source.starts_with("127.0.0.1:"),
            "source.address `{source}`"
        );
    }
    for name in ["x-replace", "x-add", "x-multi", "x-remove"] {
        assert_eq!(
            from_lacewing.echoed_header(name),
            from_envoy.echoed_header(name),
            "upstream's `{name}`: Lacewing vs Envoy"
        );
    }

    // Status codes and module-side results of the other areas.
    let shared_key = unique("envoy-cas");
    let cases: [(&str, &[&str]); 7] = [
        (
            "oob",
            &[
                "x-status-oob-key",
                "x-status-oob-return",
                "x-status-oob-log",
            ],
        ),
        ("bad-map", &["x-status-bad-map", "x-status-bad-buffer"]),
        (
            "shared",
            &[
                "x-shared-first-set",
                "x-shared-after-first",
                "x-shared-second-set",
                "x-shared-stale-cas",
                "x-shared-value",
                "x-shared-cas-changed",
            ],
        ),
        ("callout-unknown", &["x-callout-error"]),
        (
            "queue-empty",
            &[
                "x-queue-dequeue",
                "x-queue-resolve-unknown",
                "x-queue-enqueue-unknown",
            ],
        ),
        (
            "metrics",
            &[
                "x-metric-increment",
                "x-metric-record-gauge",
                "x-metric-record-histogram",
                "x-metric-counter",
                "x-metric-gauge",
                "x-metric-unknown",
            ],
        ),
        ("config", &["x-vm-config", "x-plugin-config"]),
    ];
    for (case, names) in cases {
        let headers = [
            ("x-test", case),
            ("x-shared-key", shared_key.as_str()),
            ("x-queue-vm-id", VM_ID),
        ];
        let (from_envoy, from_lacewing) =
            get_from_both(envoy_addr, lacewing_addr, "/c", &headers).await;
        assert_eq!(from_lacewing.status, from_envoy.status, "case {case}");
        assert_same_headers(
            &from_envoy,
            &from_lacewing,
            names,
            &format!("case {case}: "),
        );
    }
    let local = [("x-test", "local-reply")];
    let (from_envoy, from_lacewing) = get_from_both(envoy_addr, lacewing_addr, "/l", &local).await;
    assert_eq!(
        from_lacewing.status, from_envoy.status,
        "local reply status"
    );
    assert_eq!(
        from_lacewing.header("x-local"),
        from_envoy.header("x-local")
    );
    assert_eq!(from_lacewing.text(), from_envoy.text(), "local reply body");

    let response_case = [("x-test", "response-headers")];
    let (from_envoy, from_lacewing) =
        get_from_both(envoy_addr, lacewing_addr, "/r", &response_case).await;
    assert_same_headers(
        &from_envoy,
        &from_lacewing,
        &[
            "x-resp-add",
            "x-resp-replace",
            "x-resp-removed",
            "x-resp-status-seen",
        ],
        "",
    );
}
