//! Edge hardening as a client sees it: one authority is both routed on and
//! forwarded, whatever the client sends (absolute form, duplicate Host,
//! `:authority` plus `host`, trailing dots, `Connection: host`), and CONNECT
//! is answered by the proxy unless a route names it. Over HTTP/1.1 and h2.
//! The admin endpoint keeps plugin secrets to itself, stays on loopback unless
//! allowed elsewhere, and closes connections that never finish a request head.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use lacewing_tests::client::{
    self, RawExchange, RawResponse, raw_exchange, raw_exchange_with_timeout,
};
use lacewing_tests::wasm::{self, WatShape};
use lacewing_tests::{proxy, servers};
use tokio::net::TcpStream;

/// `admin.example` goes to a blackhole; everything else to the `public` echo
/// server; CONNECT to `tunnel.example` is the one tunnel a route allows.
const AUTHORITY: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - name: tunnel
        match: { authority: tunnel.example, method: CONNECT }
        cluster: public
      - name: admin
        match: { authority: admin.example }
        cluster: blackhole
      - name: public
        cluster: public
clusters:
  - { name: public, endpoints: ['{public}'] }
  - { name: blackhole, endpoints: ['{dead}'] }
";

struct Edge {
    handle: lacewing_proxy::ProxyHandle,
    _public: servers::TestServer,
}

impl Edge {
    async fn new() -> Self {
        let public = servers::http_echo_named("public").await;
        let dead = servers::dead_addr();
        let handle = proxy::start(&proxy::fill(
            AUTHORITY,
            &[("public", &public.addr), ("dead", &dead)],
        ));
        Self {
            handle,
            _public: public,
        }
    }

    fn addr(&self) -> SocketAddr {
        proxy::listener_addr(&self.handle, "main")
    }

    /// Sends a raw HTTP/1.1 request head (the proxy closes after answering).
    async fn raw(&self, head: &str) -> RawExchange {
        raw_exchange(self.addr(), head.as_bytes()).await
    }

    /// Sends one h2 request with prior knowledge, the URI and headers exactly as given.
    async fn h2(&self, request: Request<Empty<Bytes>>) -> (StatusCode, HeaderMap, Bytes) {
        let stream = TcpStream::connect(self.addr()).await.expect("connect");
        let (mut sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .expect("h2 handshake");
        tokio::spawn(connection);
        let response = sender.send_request(request).await.expect("h2 response");
        let (parts, body) = response.into_parts();
        let body = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        (parts.status, parts.headers, body)
    }
}

/// The Host the public upstream saw, from its echo.
fn echoed_host(body: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not an echo ({e}): {}", String::from_utf8_lossy(body)));
    json["headers"]["host"]
        .as_str()
        .unwrap_or_else(|| panic!("no host in {json}"))
        .to_string()
}

/// The HTTP/1.1 response of a raw exchange; panics with what came when there is none.
fn answer(exchange: &RawExchange) -> RawResponse {
    exchange
        .response()
        .unwrap_or_else(|| panic!("no response: {:?}", exchange.text()))
}

/// A request that reached the public upstream, and the Host it carried there.
fn public_host(exchange: &RawExchange) -> String {
    let response = answer(exchange);
    assert_eq!(response.status, 200, "{}", exchange.text());
    assert_eq!(response.header("x-upstream"), Some("public"));
    echoed_host(&response.body)
}

/// A request routed to the blackhole: answered by the proxy, never by `public`.
fn blackholed(status: u16, upstream: Option<&str>, what: &str) {
    assert!(
        status == 502 || status == 503,
        "{what}: expected the blackhole's 502/503, got {status}"
    );
    assert_eq!(upstream, None, "{what}: no upstream answered");
}

#[tokio::test]
async fn http1_absolute_form_is_routed_and_forwarded_on_the_request_target() {
    let edge = Edge::new().await;
    let exchange = edge
        .raw("GET http://public.example/x HTTP/1.1\r\nHost: admin.example\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(public_host(&exchange), "public.example");
    // And the other way round: the target names the blackholed authority.
    let exchange = edge
        .raw("GET http://Admin.Example./x HTTP/1.1\r\nHost: public.example\r\nConnection: close\r\n\r\n")
        .await;
    let response = answer(&exchange);
    blackholed(
        response.status,
        response.header("x-upstream"),
        "absolute form",
    );
}

#[tokio::test]
async fn http1_duplicate_host_is_refused() {
    let edge = Edge::new().await;
    for hosts in [
        "Host: public.example\r\nHost: admin.example",
        "Host: admin.example\r\nHost: public.example",
        "Host: public.example\r\nHost: public.example",
    ] {
        let exchange = edge
            .raw(&format!(
                "GET / HTTP/1.1\r\n{hosts}\r\nConnection: close\r\n\r\n"
            ))
            .await;
        assert_eq!(exchange.status(), Some(400), "{hosts}: {}", exchange.text());
        assert!(exchange.closed, "{hosts}: the connection is closed");
    }
    for bad in ["user@public.example", "."] {
        let exchange = edge
            .raw(&format!(
                "GET / HTTP/1.1\r\nHost: {bad}\r\nConnection: close\r\n\r\n"
            ))
            .await;
        assert_eq!(exchange.status(), Some(400), "{bad}: {}", exchange.text());
    }
}

#[tokio::test]
async fn http1_trailing_dot_and_case_are_normalised_before_routing() {
    let edge = Edge::new().await;
    for host in ["admin.example.", "ADMIN.Example", "admin.example.:80"] {
        let exchange = edge
            .raw(&format!(
                "GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
            ))
            .await;
        let response = answer(&exchange);
        blackholed(response.status, response.header("x-upstream"), host);
    }
    let exchange = edge
        .raw("GET / HTTP/1.1\r\nHost: PUBLIC.Example.\r\nConnection: close\r\n\r\n")
        .await;
    assert_eq!(public_host(&exchange), "public.example");
}

#[tokio::test]
async fn connection_cannot_strip_host() {
    let edge = Edge::new().await;
    let exchange = edge
        .raw("GET / HTTP/1.1\r\nHost: public.example\r\nConnection: host, close\r\n\r\n")
        .await;
    assert_eq!(public_host(&exchange), "public.example");
}

#[tokio::test]
async fn connect_is_answered_locally_unless_a_route_names_it() {
    let edge = Edge::new().await;
    let exchange = edge
        .raw("CONNECT public.example:443 HTTP/1.1\r\nHost: public.example:443\r\n\r\n")
        .await;
    let response = answer(&exchange);
    assert_eq!(response.status, 405, "{}", exchange.text());
    assert!(
        response
            .header("allow")
            .is_some_and(|a| !a.contains("CONNECT"))
    );
    assert_eq!(response.header("x-upstream"), None);

    let request = Request::builder()
        .method(Method::CONNECT)
        .uri("public.example:443")
        .body(Empty::new())
        .unwrap();
    let (status, headers, _) = edge.h2(request).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(headers.get("x-upstream").is_none());

    // The route that names CONNECT forwards it, and the upstream's answer comes back.
    let exchange = edge
        .raw("CONNECT tunnel.example:443 HTTP/1.1\r\nHost: tunnel.example:443\r\n\r\n")
        .await;
    let response = answer(&exchange);
    assert_eq!(response.status, 200, "{}", exchange.text());
    assert_eq!(response.header("x-upstream"), Some("public"));
}

#[tokio::test]
async fn h2_host_must_agree_with_authority() {
    let edge = Edge::new().await;
    let request = Request::get("http://public.example/")
        .header("host", "admin.example")
        .body(Empty::new())
        .unwrap();
    let (status, headers, _) = edge.h2(request).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(headers.get("x-upstream").is_none());

    // The same authority in other case and with a trailing dot is one authority.
    let request = Request::get("http://public.example/")
        .header("host", "PUBLIC.example.")
        .body(Empty::new())
        .unwrap();
    let (status, headers, body) = edge.h2(request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(headers["x-upstream"], "public");
    assert_eq!(echoed_host(&body), "public.example");
}

#[tokio::test]
async fn h2_trailing_dot_and_case_are_normalised_before_routing() {
    let edge = Edge::new().await;
    for authority in ["admin.example.", "ADMIN.example", "admin.example.:80"] {
        let request = Request::get(format!("http://{authority}/"))
            .body(Empty::new())
            .unwrap();
        let (status, headers, _) = edge.h2(request).await;
        blackholed(
            status.as_u16(),
            headers.get("x-upstream").and_then(|v| v.to_str().ok()),
            authority,
        );
    }
    let request = Request::get("http://Public.Example./")
        .body(Empty::new())
        .unwrap();
    let (status, _, body) = edge.h2(request).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(echoed_host(&body), "public.example");
}

/// A proxy whose admin block is `admin` and which loads one plugin carrying
/// a key in each of `configuration`, `vm_configuration` and `env`.
fn admin_yaml(admin: &str, upstream: SocketAddr) -> String {
    let module = wasm::wat_file(
        "edge-admin-plugin",
        &wasm::proxy_wat("", WatShape::V0_2_1, ""),
    );
    proxy::fill(
        "admin: {admin}
workers: 1
drain_timeout: 1s
listeners:
  - name: main
    address: 127.0.0.1:0
    routes: [{ name: all, cluster: upstream }]
clusters:
  - { name: upstream, endpoints: ['{upstream}'] }
plugins:
  - name: keyed
    module: {module}
    configuration: { api_key: sk-live-config-1234 }
    vm_configuration: vm-secret-5678
    env: { TOKEN: tok-env-9abc }
",
        &[
            ("admin", &admin),
            ("upstream", &upstream),
            ("module", &wasm::yaml_path(&module)),
        ],
    )
}

const SECRETS: [&str; 3] = ["sk-live-config-1234", "vm-secret-5678", "tok-env-9abc"];

#[tokio::test]
async fn config_dump_redacts_plugin_secrets_unless_configured_to_expose_them() {
    let upstream = servers::http_echo().await;
    for (admin, exposed) in [
        ("{ address: 127.0.0.1:0 }", false),
        ("{ address: 127.0.0.1:0, expose_secrets: true }", true),
    ] {
        let handle = proxy::start(&admin_yaml(admin, upstream.addr));
        let dump = client::get(&format!(
            "http://{}/config_dump",
            proxy::admin_addr(&handle)
        ))
        .await;
        assert_eq!(dump.status, StatusCode::OK);
        let text = dump.text();
        for secret in SECRETS {
            assert_eq!(
                text.contains(secret),
                exposed,
                "{admin}: {secret} in {text}"
            );
        }
        let plugin = &dump.json()["plugins"][0];
        assert_eq!(plugin["name"], "keyed", "names stay visible");
        assert!(
            plugin["env"].get("TOKEN").is_some(),
            "env keys stay visible"
        );
        if !exposed {
            assert_eq!(plugin["configuration"], "[redacted]");
            assert_eq!(plugin["vm_configuration"], "[redacted]");
            assert_eq!(plugin["env"]["TOKEN"], "[redacted]");
        }
    }
}

#[test]
fn a_non_loopback_admin_address_needs_allow_remote() {
    let yaml = "admin: { address: '0.0.0.0:0' }
listeners: []
";
    let err = lacewing_config::from_yaml_str(yaml, "remote.yaml")
        .expect_err("a remote admin without opt-in is refused")
        .to_string();
    assert!(err.contains("admin.allow_remote"), "{err}");
    let allowed = "admin: { address: '0.0.0.0:0', allow_remote: true }
listeners: []
";
    lacewing_config::from_yaml_str(allowed, "remote.yaml").expect("opted in");
}

#[tokio::test]
async fn a_remote_admin_serves_when_allowed() {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&admin_yaml(
        "{ address: '0.0.0.0:0', allow_remote: true }",
        upstream.addr,
    ));
    let port = proxy::admin_addr(&handle).port();
    let ready = client::get(&format!("http://127.0.0.1:{port}/ready")).await;
    assert_eq!(ready.status, StatusCode::OK);
}

#[tokio::test]
async fn a_partial_request_head_on_the_admin_port_is_closed() {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&admin_yaml(
        "{ address: 127.0.0.1:0, header_read_timeout: 200ms }",
        upstream.addr,
    ));
    let admin = proxy::admin_addr(&handle);
    // Bounded only so a regression fails instead of hanging.
    let exchange = raw_exchange_with_timeout(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: admin\r\n",
        Duration::from_secs(60),
    )
    .await;
    assert!(
        exchange.closed,
        "closed without a whole head: {:?}",
        exchange.text()
    );
    assert_ne!(exchange.status(), Some(200));
    let ready = client::get(&format!("http://{admin}/ready")).await;
    assert_eq!(
        ready.status,
        StatusCode::OK,
        "the admin endpoint still serves"
    );
}
