//! Hostile and broken wasm modules: the proxy refuses to load what cannot run,
//! confines what misbehaves at run time (CPU deadline, memory cap, bounds-checked
//! pointers) and keeps serving routes without the plugin throughout.

use std::path::{Path, PathBuf};
use std::time::Duration;

use http::StatusCode;
use lacewing_proxy::Proxy;
use lacewing_tests::client::{self, Response};
use lacewing_tests::proxy;
use lacewing_tests::servers;
use lacewing_tests::wasm::{self, EchoProxy, PluginRoutes, WatShape, yaml_path};

/// Routes of [`Hostile`]: plugin `guarded` on `/hostile`, none on every other path.
const HOSTILE_ROUTES: &[&str] = &[
    "{ name: hostile, match: { path: { prefix: /hostile } }, cluster: echo, filters: [guarded] }",
    "{ name: plain, cluster: echo }",
];

/// Plugin `guarded` from `{module}`, failing `{policy}`, with `{limits}`.
const GUARDED_PLUGIN: &str =
    "{ name: guarded, module: {module}, fail: {policy}, limits: {limits} }";

/// Where the plugin `guarded` runs [`HOSTILE_ROUTES`].
fn hostile_routes() -> PluginRoutes<'static> {
    PluginRoutes {
        listener_fields: "",
        routes: HOSTILE_ROUTES,
        clusters: &[],
        plugins: &[GUARDED_PLUGIN],
    }
}

/// Default plugin limits, written out.
const DEFAULT_LIMITS: &str = "{}";

/// A proxy whose plugin `guarded` runs `module` on route `/hostile` (failing
/// `policy`: `closed` or `open`), and no plugin on every other path.
struct Hostile {
    fixture: EchoProxy,
}

impl Hostile {
    async fn start(module: &Path, policy: &str, limits: &str) -> Self {
        Self {
            fixture: EchoProxy::start(
                hostile_routes(),
                &[
                    ("module", &yaml_path(module)),
                    ("policy", &policy),
                    ("limits", &limits),
                ],
            )
            .await,
        }
    }

    /// GET `path` with `headers`.
    async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.fixture.get(path, headers).await
    }

    /// The route without the plugin answers normally.
    async fn assert_plain_route_serves(&self) {
        let response = self.get("/plain", &[]).await;
        assert_eq!(response.status, StatusCode::OK, "route without the plugin");
        assert_eq!(response.json()["path"], "/plain");
    }
}

/// The error `Proxy::start` gives for `yaml`, a config that loads; panics
/// with "the proxy started `started_how`" when the proxy starts.
fn start_error_of(yaml: &str, started_how: &str) -> String {
    let config = lacewing_config::load::from_yaml_str(yaml, proxy::TEST_CONFIG_NAME)
        .unwrap_or_else(|e| panic!("the config itself is valid: {e}"));
    match Proxy::start(config) {
        Ok(_) => panic!("the proxy started {started_how}\n--- config ---\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

/// The error `Proxy::start` gives for a config whose plugin `guarded` is `module`.
async fn start_error(module: &Path) -> String {
    let echo = servers::http_echo().await;
    let yaml = wasm::echo_proxy_yaml(
        echo.addr,
        hostile_routes(),
        &[
            ("module", &yaml_path(module)),
            ("policy", &"closed"),
            ("limits", &DEFAULT_LIMITS),
        ],
    );
    start_error_of(&yaml, &format!("with module {}", module.display()))
}

/// The imports every hostile module here may use.
const IMPORTS: &str = r#"
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $log (param i32 i32 i32) (result i32)))"#;

fn module(name: &str, shape: WatShape<'_>, imports: &str, body: &str) -> PathBuf {
    wasm::wat_file(name, &wasm::proxy_wat(imports, shape, body))
}

/// A module whose `proxy_on_request_headers` never returns.
fn looping_module(name: &str) -> PathBuf {
    module(
        name,
        WatShape::V0_2_1,
        IMPORTS,
        r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (loop $forever (br $forever))
    (i32.const 0))"#,
    )
}

/// Limits that stop a looping callback quickly.
const SHORT_CALLBACK_TIMEOUT: &str = "{ callback_timeout: 50ms }";

#[tokio::test]
async fn infinite_loop_is_stopped_at_the_callback_timeout() {
    let hostile = Hostile::start(
        &looping_module("hostile-loop"),
        "closed",
        SHORT_CALLBACK_TIMEOUT,
    )
    .await;
    for attempt in 0..3 {
        let response = hostile.get("/hostile", &[]).await;
        assert_eq!(
            response.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {attempt}: the looping plugin fails closed"
        );
        hostile.assert_plain_route_serves().await;
    }
    let text = client::metrics(proxy::admin_addr(&hostile.fixture.proxy)).await;
    let stopped = client::metric_sum(
        &text,
        "lacewing_wasm_deadline_exceeded_total",
        &[("plugin", "guarded")],
    );
    assert!(
        stopped.is_some_and(|n| n >= 3.0),
        "lacewing_wasm_deadline_exceeded_total{{plugin=\"guarded\"}} is {stopped:?}\n{text}"
    );
}

#[tokio::test]
async fn infinite_loop_in_a_fail_open_plugin_passes_requests_through() {
    let hostile = Hostile::start(
        &looping_module("hostile-loop-open"),
        "open",
        SHORT_CALLBACK_TIMEOUT,
    )
    .await;
    let response = hostile.get("/hostile", &[]).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(response.json()["path"], "/hostile");
    hostile.assert_plain_route_serves().await;
}

#[tokio::test]
async fn memory_grow_bomb_stops_at_the_memory_limit() {
    // Grows 1 MiB at a time until memory.grow fails, then reports whether the
    // memory it ended with is within the 16 MiB (256 pages) limit.
    let bomb = module(
        "hostile-memory-bomb",
        WatShape::V0_2_1,
        IMPORTS,
        r#"
  (global $contained (mut i32) (i32.const 0))
  (data (i32.const 0) "x-memory-bomb")
  (data (i32.const 16) "contained")
  (data (i32.const 32) "exceeded")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (block $refused
      (loop $grow
        (br_if $refused (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
        (br $grow)))
    (global.set $contained (i32.le_u (memory.size) (i32.const 256)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (if (global.get $contained)
      (then (drop (call $add (i32.const 2) (i32.const 0) (i32.const 13) (i32.const 16) (i32.const 9))))
      (else (drop (call $add (i32.const 2) (i32.const 0) (i32.const 13) (i32.const 32) (i32.const 8)))))
    (i32.const 0))"#,
    );
    let hostile = Hostile::start(&bomb, "closed", "{ memory: 16MiB }").await;
    for attempt in 0..2 {
        let response = hostile.get("/hostile", &[]).await;
        // memory.grow fails (-1) at the limit and the module carries on with
        // the memory it has: the request succeeds and the module saw the cap.
        assert_eq!(response.status, StatusCode::OK, "attempt {attempt}");
        assert_eq!(
            response.header("x-memory-bomb"),
            Some("contained"),
            "attempt {attempt}: memory stayed within 16 MiB"
        );
        hostile.assert_plain_route_serves().await;
    }
}

#[tokio::test]
async fn out_of_bounds_pointer_gets_invalid_memory_access_status() {
    // Each status is written as one digit (`'0' + status`); InvalidMemoryAccess is 6.
    let oob = module(
        "hostile-oob",
        WatShape::V0_2_1,
        IMPORTS,
        r#"
  (data (i32.const 0) "x-oob-key")
  (data (i32.const 16) "x-oob-return")
  (data (i32.const 32) "x-oob-length")
  (data (i32.const 48) "x-oob-log")
  (data (i32.const 64) "x-test")
  (func $digit (param $at i32) (param $status i32)
    (i32.store8 (local.get $at) (i32.add (i32.const 48) (local.get $status))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    ;; key pointer past the end of memory
    (call $digit (i32.const 200)
      (call $get (i32.const 0) (i32.const 0xFFFFFF00) (i32.const 64) (i32.const 300) (i32.const 304)))
    ;; result pointers past the end of memory
    (call $digit (i32.const 201)
      (call $get (i32.const 0) (i32.const 64) (i32.const 6) (i32.const 0xFFFFFFF0) (i32.const 0xFFFFFFF8)))
    ;; valid pointer, length running past the end of memory
    (call $digit (i32.const 202)
      (call $get (i32.const 0) (i32.const 64) (i32.const 0x7FFFFFFF) (i32.const 300) (i32.const 304)))
    (call $digit (i32.const 203)
      (call $log (i32.const 2) (i32.const 0xFFFFFF00) (i32.const 1024)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $add (i32.const 2) (i32.const 0) (i32.const 9) (i32.const 200) (i32.const 1)))
    (drop (call $add (i32.const 2) (i32.const 16) (i32.const 12) (i32.const 201) (i32.const 1)))
    (drop (call $add (i32.const 2) (i32.const 32) (i32.const 12) (i32.const 202) (i32.const 1)))
    (drop (call $add (i32.const 2) (i32.const 48) (i32.const 9) (i32.const 203) (i32.const 1)))
    (i32.const 0))"#,
    );
    let hostile = Hostile::start(&oob, "closed", DEFAULT_LIMITS).await;
    // `x-test` is the key the module looks up with out-of-bounds result pointers.
    let response = hostile.get("/hostile", &[("x-test", "present")]).await;
    assert_eq!(response.status, StatusCode::OK);
    let invalid_memory_access = "6";
    for name in ["x-oob-key", "x-oob-return", "x-oob-length", "x-oob-log"] {
        assert_eq!(
            response.header(name),
            Some(invalid_memory_access),
            "{name}: status returned to the module"
        );
    }
    hostile.assert_plain_route_serves().await;
}

#[tokio::test]
async fn trap_in_on_configure_rejects_the_plugin_at_start() {
    let trapping = module(
        "hostile-configure-trap",
        WatShape::V0_2_1,
        IMPORTS,
        r#"
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (unreachable))"#,
    );
    let error = start_error(&trapping).await;
    assert!(error.contains("guarded"), "names the plugin: {error}");
    assert!(
        error.contains("on_configure") || error.contains("unreachable"),
        "gives the reason: {error}"
    );
}

#[tokio::test]
async fn on_configure_returning_false_rejects_the_plugin_at_start() {
    let echo = servers::http_echo().await;
    let yaml = wasm::echo_proxy_yaml(
        echo.addr,
        PluginRoutes {
            listener_fields: "",
            routes: &["{ name: all, cluster: echo, filters: [refusing] }"],
            clusters: &[],
            plugins: &["{ name: refusing, module: {module}, configuration: \"fail_configure\" }"],
        },
        &[("module", &yaml_path(&wasm::module("conformance-filter")))],
    );
    let error = start_error_of(&yaml, "although on_configure returned false");
    assert!(error.contains("refusing"), "names the plugin: {error}");
    assert!(error.contains("on_configure"), "gives the reason: {error}");
}

#[tokio::test]
async fn module_without_abi_version_marker_is_a_load_error() {
    let unmarked = module(
        "hostile-no-marker",
        WatShape {
            abi_marker: None,
            allocator: true,
        },
        IMPORTS,
        "",
    );
    let error = start_error(&unmarked).await;
    assert!(error.contains("guarded"), "names the plugin: {error}");
    assert!(
        error.contains("proxy_abi_version"),
        "gives the reason: {error}"
    );
}

#[tokio::test]
async fn module_without_allocator_is_a_load_error() {
    let no_allocator = module(
        "hostile-no-allocator",
        WatShape {
            abi_marker: Some("proxy_abi_version_0_2_1"),
            allocator: false,
        },
        IMPORTS,
        "",
    );
    let error = start_error(&no_allocator).await;
    assert!(error.contains("guarded"), "names the plugin: {error}");
    assert!(
        error.contains("proxy_on_memory_allocate") || error.contains("malloc"),
        "gives the reason: {error}"
    );
}

#[tokio::test]
async fn import_of_an_unknown_host_function_is_a_load_error_naming_it() {
    let imports = format!(
        "{IMPORTS}\n  (import \"env\" \"proxy_frobnicate_widget\" (func $frobnicate (param i32) (result i32)))"
    );
    let unknown = module("hostile-unknown-import", WatShape::V0_2_1, &imports, "");
    let error = start_error(&unknown).await;
    assert!(error.contains("guarded"), "names the plugin: {error}");
    assert!(
        error.contains("proxy_frobnicate_widget"),
        "names the import: {error}"
    );
}

#[tokio::test]
async fn bytes_that_are_not_wasm_are_a_load_error() {
    let garbage = wasm::bytes_file("hostile-not-wasm", b"this is not a wasm module");
    let error = start_error(&garbage).await;
    assert!(error.contains("guarded"), "names the plugin: {error}");
}

#[tokio::test]
async fn trap_on_every_request_keeps_failing_closed_while_other_routes_serve() {
    let trapping = module(
        "hostile-trap-always",
        WatShape::V0_2_1,
        IMPORTS,
        r#"
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (unreachable))"#,
    );
    let hostile = Hostile::start(&trapping, "closed", DEFAULT_LIMITS).await;
    for attempt in 0..5 {
        let response = hostile.get("/hostile", &[]).await;
        assert_eq!(
            response.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "attempt {attempt}"
        );
        hostile.assert_plain_route_serves().await;
    }
    // Concurrent clients on the plain route are not held up by the failing plugin.
    let plain = hostile.fixture.url("/plain");
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let plain = plain.clone();
            tokio::spawn(async move { client::get(&plain).await.status })
        })
        .collect();
    for joined in clients {
        let status = tokio::time::timeout(Duration::from_secs(30), joined)
            .await
            .expect("plain requests finish")
            .expect("client task");
        assert_eq!(status, StatusCode::OK);
    }
}
