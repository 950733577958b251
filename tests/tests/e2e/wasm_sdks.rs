//! Modules built with proxy-wasm SDKs other than the official Rust crate, run
//! unmodified in Envoy 1.40 (the reference host) and in Lacewing in the same
//! test, with the same requests: what the client sees must match.
//!
//! - `assemblyscript-filter`: the AssemblyScript SDK (`@solo-io/proxy-runtime`,
//!   ABI 0.2.0, imports `wasi_unstable.proc_exit`), built by
//!   `cargo xtask build-filters` with npm and `asc`.
//! - `experimental-sdk-filter`: the `proxy-wasm-experimental` crate (ABI 0.1.0),
//!   an SDK maintained apart from the official one.
//!
//! Both modules implement the same cases, picked by the `x-case` request
//! header (see `tests/modules/assemblyscript-filter/assembly/index.ts`).
//! Without Envoy these tests are skipped with a note, except under `CI=true`,
//! where they fail.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use http::StatusCode;
use lacewing_proxy::ProxyHandle;
use lacewing_tests::client::Response;
use lacewing_tests::envoy::{self, Cluster, Envoy, WasmFilter};
use lacewing_tests::servers::{self, TestServer};
use lacewing_tests::wasm::{self, PluginRoutes, get_with, yaml_path};
use lacewing_tests::{eventually, proxy};

/// The root id both modules answer to.
const ROOT_ID: &str = "sdk_cases";

/// A module from another SDK.
struct Sdk {
    name: &'static str,
    module: fn() -> PathBuf,
}

const SDKS: [Sdk; 2] = [
    Sdk {
        name: "AssemblyScript",
        module: || wasm::assemblyscript_module("assemblyscript-filter"),
    },
    Sdk {
        name: "proxy-wasm-experimental",
        module: || wasm::module("experimental-sdk-filter"),
    },
];

/// Envoy and Lacewing, each running one module as the only filter in front
/// of the same echo upstream, which is also the callout cluster `echo`; a
/// gRPC echo upstream is cluster `grpc`.
struct SideBySide {
    envoy: Envoy,
    lacewing: ProxyHandle,
    _upstreams: [TestServer; 2],
}

impl SideBySide {
    /// Both proxies with `module`; `None` when there is no Envoy to compare with.
    async fn start(module: &Path) -> Option<Self> {
        let binary = envoy::binary()?;
        let echo = servers::http_echo().await;
        let grpc = servers::grpc_echo().await;
        let filter = WasmFilter {
            name: "sdk",
            root_id: ROOT_ID,
            vm_id: "sdk",
            configuration: "",
            vm_configuration: "",
            module,
        };
        let clusters = [
            Cluster {
                name: "echo",
                addr: echo.addr,
                http2: false,
            },
            Cluster {
                name: "grpc",
                addr: grpc.addr,
                http2: true,
            },
        ];
        let envoy = Envoy::start(
            &binary,
            &envoy::http_wasm_config(&[filter], "echo", &clusters),
        )
        .await;
        let lacewing = proxy::start(&wasm::echo_proxy_yaml(
            echo.addr,
            PluginRoutes {
                listener_fields: "",
                routes: &[
                    "{ name: all, match: { path: { prefix: / } }, cluster: echo, filters: [sdk] }",
                ],
                clusters: &["{ name: grpc, endpoints: [\"{grpc}\"], protocol: h2 }"],
                plugins: &["{ name: sdk, module: {module}, root_id: {root_id}, vm_id: sdk }"],
            },
            &[
                ("module", &yaml_path(module)),
                ("root_id", &ROOT_ID),
                ("grpc", &grpc.addr),
            ],
        ));
        Some(Self {
            envoy,
            lacewing,
            _upstreams: [echo, grpc],
        })
    }

    fn lacewing_addr(&self) -> SocketAddr {
        proxy::listener_addr(&self.lacewing, "main")
    }

    /// The same GET of `/` with `x-case: case` and `headers`, sent to Envoy
    /// and to Lacewing: `(from_envoy, from_lacewing)`.
    async fn get(&self, case: &str, headers: &[(&str, &str)]) -> (Response, Response) {
        let mut all = vec![("x-case", case)];
        all.extend_from_slice(headers);
        let from_envoy = get_with(&format!("http://{}/", self.envoy.listener()), &all).await;
        let from_lacewing = get_with(&format!("http://{}/", self.lacewing_addr()), &all).await;
        (from_envoy, from_lacewing)
    }
}

/// Runs `check` for each SDK's module with both proxies started, or returns
/// early when there is no Envoy.
macro_rules! for_each_sdk {
    (|$sdk:ident, $both:ident| $check:block) => {
        for $sdk in &SDKS {
            let module = ($sdk.module)();
            let Some($both) = SideBySide::start(&module).await else {
                return;
            };
            $check
        }
    };
}

/// Asserts that Envoy answered `expected` and Lacewing the same.
#[track_caller]
fn assert_status(sdk: &str, from_envoy: &Response, from_lacewing: &Response, expected: StatusCode) {
    assert_eq!(from_envoy.status, expected, "{sdk}: Envoy: {from_envoy:?}");
    assert_eq!(
        from_lacewing.status, expected,
        "{sdk}: Lacewing: {from_lacewing:?}"
    );
}

/// Where a compared value is read from.
#[derive(Clone, Copy)]
enum Seen {
    /// A response header.
    Response,
    /// A request header as the echo upstream saw it.
    Upstream,
}

/// Asserts that each header of `names`, read as `seen` says, is the same
/// from both proxies.
#[track_caller]
fn assert_same(
    sdk: &str,
    seen: Seen,
    from_envoy: &Response,
    from_lacewing: &Response,
    names: &[&str],
) {
    let read = |response: &Response, name: &str| match seen {
        Seen::Response => response.header(name).map(str::to_owned),
        Seen::Upstream => response.echoed_header(name),
    };
    let place = match seen {
        Seen::Response => "response header",
        Seen::Upstream => "as the upstream saw it",
    };
    for name in names {
        assert_eq!(
            read(from_lacewing, name),
            read(from_envoy, name),
            "{sdk}: `{name}` ({place}): Lacewing vs Envoy"
        );
    }
}

#[tokio::test]
async fn sdk_modules_load_and_edit_headers_as_in_envoy() {
    for_each_sdk!(|sdk, both| {
        let headers = [("x-in", "hello"), ("x-drop", "bye")];
        let (from_envoy, from_lacewing) = both.get("headers", &headers).await;
        assert_status(sdk.name, &from_envoy, &from_lacewing, StatusCode::OK);
        let seen = from_envoy.echoed_header("x-sdk-request");
        assert_eq!(seen.as_deref(), Some("seen hello"), "{}: Envoy", sdk.name);
        assert_same(
            sdk.name,
            Seen::Upstream,
            &from_envoy,
            &from_lacewing,
            &["x-sdk-request", "x-drop", "x-in"],
        );
        assert_eq!(
            from_envoy.header("x-sdk-response"),
            Some("yes"),
            "{}: Envoy",
            sdk.name
        );
        assert_same(
            sdk.name,
            Seen::Response,
            &from_envoy,
            &from_lacewing,
            &["x-sdk-response"],
        );
    });
}

#[tokio::test]
async fn local_reply_with_a_module_content_length_of_zero_sends_the_body_as_envoy_does() {
    for_each_sdk!(|sdk, both| {
        let (from_envoy, from_lacewing) = both.get("local-reply-empty-length", &[]).await;
        assert_status(sdk.name, &from_envoy, &from_lacewing, StatusCode::FORBIDDEN);
        let body = from_envoy.text();
        assert!(
            body.starts_with("denied by the"),
            "{}: Envoy: {body:?}",
            sdk.name
        );
        assert_eq!(from_lacewing.text(), body, "{}: body", sdk.name);
        assert_same(
            sdk.name,
            Seen::Response,
            &from_envoy,
            &from_lacewing,
            &["content-length", "content-type", "x-local"],
        );
    });
}

#[tokio::test]
async fn http_callout_with_host_and_no_authority_goes_out_as_in_envoy() {
    for_each_sdk!(|sdk, both| {
        let (from_envoy, from_lacewing) = both.get("callout-host", &[]).await;
        assert_status(sdk.name, &from_envoy, &from_lacewing, StatusCode::OK);
        // The callout's response (what the echo upstream saw) is the reply's body.
        let (envoy_saw, lacewing_saw) = (from_envoy.json(), from_lacewing.json());
        assert_eq!(envoy_saw["authority"], "callout.sdk.test", "{}", sdk.name);
        for field in ["authority", "path", "method"] {
            assert_eq!(
                lacewing_saw[field], envoy_saw[field],
                "{}: callout `{field}`",
                sdk.name
            );
        }
    });
}

#[tokio::test]
async fn negative_http_callout_timeout_is_bad_argument_as_in_envoy() {
    for_each_sdk!(|sdk, both| {
        let (from_envoy, from_lacewing) = both.get("callout-timeout", &[]).await;
        let result = from_envoy.echoed_header("x-callout-result");
        assert_eq!(
            result.as_deref(),
            Some("BadArgument"),
            "{}: Envoy",
            sdk.name
        );
        assert_same(
            sdk.name,
            Seen::Upstream,
            &from_envoy,
            &from_lacewing,
            &["x-callout-result"],
        );
    });
}

#[tokio::test]
async fn request_duration_is_not_found_before_the_request_completes_as_in_envoy() {
    for_each_sdk!(|sdk, both| {
        let (from_envoy, from_lacewing) = both.get("duration", &[]).await;
        let at_request = from_envoy.header("x-duration-request");
        assert_eq!(at_request, Some("not found"), "{}: Envoy", sdk.name);
        assert_same(
            sdk.name,
            Seen::Response,
            &from_envoy,
            &from_lacewing,
            &["x-duration-request", "x-duration-response"],
        );
    });
}

#[tokio::test]
async fn root_context_tick_runs_as_in_envoy() {
    for_each_sdk!(|sdk, both| {
        let ticks = |response: &Response| {
            response
                .header("x-ticks")
                .and_then(|t| t.parse::<u64>().ok())
                .unwrap_or(0)
        };
        eventually(
            &format!("{}: both proxies report ticks", sdk.name),
            || async {
                let (from_envoy, from_lacewing) = both.get("ticks", &[]).await;
                ticks(&from_envoy) > 0 && ticks(&from_lacewing) > 0
            },
        )
        .await;
    });
}

/// A module without an SDK: `proxy_grpc_call` to cluster `grpc` with a
/// timeout of -1 and of `i32::MAX` ms, each status reported as one digit in
/// the request headers `x-grpc-negative` and `x-grpc-huge`.
fn grpc_timeout_module() -> PathBuf {
    let imports = r#"
  (import "env" "proxy_grpc_call" (func $grpc_call (param i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))"#;
    let body = r#"
  (data (i32.const 100) "grpc") (data (i32.const 110) "svc.Echo") (data (i32.const 120) "Say")
  (data (i32.const 130) "ping") (data (i32.const 140) "x-grpc-negative") (data (i32.const 160) "x-grpc-huge")
  (func $call_and_report (param $timeout i32) (param $name i32) (param $name_len i32)
    (i32.store8 (i32.const 180)
      (i32.add (i32.const 48)
        (call $grpc_call (i32.const 100) (i32.const 4) (i32.const 110) (i32.const 8) (i32.const 120) (i32.const 3)
          (i32.const 0) (i32.const 0) (i32.const 130) (i32.const 4) (local.get $timeout) (i32.const 200))))
    (drop (call $add (i32.const 0) (local.get $name) (local.get $name_len) (i32.const 180) (i32.const 1))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $call_and_report (i32.const -1) (i32.const 140) (i32.const 15))
    (call $call_and_report (i32.const 2147483647) (i32.const 160) (i32.const 11))
    (i32.const 0))"#;
    wasm::wat_file(
        "grpc-timeout",
        &wasm::proxy_wat(imports, wasm::WatShape::V0_2_1, body),
    )
}

#[tokio::test]
async fn grpc_callout_timeout_is_read_as_envoy_reads_it() {
    let module = grpc_timeout_module();
    let Some(both) = SideBySide::start(&module).await else {
        return;
    };
    let (from_envoy, from_lacewing) = both.get("grpc-timeout", &[]).await;
    assert_status("WAT", &from_envoy, &from_lacewing, StatusCode::OK);
    // Envoy reads a gRPC call's timeout as unsigned milliseconds: -1 is a
    // deadline of about 49.7 days, not BAD_ARGUMENT (that check is HTTP's).
    for name in ["x-grpc-negative", "x-grpc-huge"] {
        let status = from_envoy.echoed_header(name);
        assert_eq!(status.as_deref(), Some("0"), "Envoy's status for `{name}`");
    }
    assert_same(
        "WAT",
        Seen::Upstream,
        &from_envoy,
        &from_lacewing,
        &["x-grpc-negative", "x-grpc-huge"],
    );
}
