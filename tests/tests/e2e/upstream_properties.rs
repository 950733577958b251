//! `upstream.*` properties read by a plugin (the conformance filter's
//! `upstream` case) in the request phase and in `on_http_response_headers`:
//! over mutual TLS between two standalone proxies, and on plaintext side by
//! side with Envoy.

use lacewing_tests::client::{self, Response};
use lacewing_tests::{envoy, proxy, servers, wasm};
use sha2::{Digest, Sha256};

use super::standalone_tls::ORDERS;
use super::tls_files::{Ca, Files, spiffe};
use super::wasm_conformance::{conformance_yaml, get_from_both, start_envoy};

const FRONTEND: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
{files}listeners:
  - { name: outbound, address: 127.0.0.1:0, routes: [{ name: all, cluster: orders, filters: [conformance] }] }
clusters:
  - name: orders
    endpoints: ['{orders}']
    tls: { peer: '{peer}' }
plugins:
  - { name: conformance, module: {module}, root_id: conformance-root, vm_id: conformance }
";

fn header(response: &Response, name: &str) -> String {
    response
        .header(name)
        .unwrap_or_else(|| panic!("no `{name}` in {:?}", response.headers))
        .to_string()
}

async fn get_upstream(url: &str) -> Response {
    let request = http::Request::get(url)
        .header("x-test", "upstream")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    client::request(request).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plugin_reads_the_upstream_tls_connection_from_the_response_phase() {
    let ca = Ca::new("test root");
    let orders_leaf = ca.leaf("orders");
    let orders_files = Files::new(&orders_leaf, &ca);
    let frontend_files = Files::new(&ca.leaf("frontend"), &ca);
    let app = servers::http_echo().await;
    let orders = proxy::start(&proxy::fill(
        ORDERS,
        &[("files", &orders_files.yaml()), ("app", &app.addr)],
    ));
    let inbound = proxy::listener_addr(&orders, "inbound");
    let frontend = proxy::start(&proxy::fill(
        FRONTEND,
        &[
            ("files", &frontend_files.yaml()),
            ("orders", &inbound),
            ("peer", &spiffe("orders")),
            (
                "module",
                &wasm::yaml_path(&wasm::module("conformance-filter")),
            ),
        ],
    ));
    let url = proxy::url(&frontend, "outbound", "/up");
    for round in ["a new connection", "a pooled connection"] {
        let response = get_upstream(&url).await;
        assert_eq!(response.status, 200, "{round}: {}", response.text());
        let digest: String = Sha256::digest(orders_leaf.der().as_ref())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let expected = [
            ("x-up-request-address", "status:NotFound".to_string()),
            ("x-up-address", inbound.to_string()),
            ("x-up-port", inbound.port().to_string()),
            ("x-up-tls-version", "TLSv1.3".to_string()),
            (
                "x-up-subject-peer-certificate",
                "O=example.org, CN=orders".to_string(),
            ),
            (
                "x-up-subject-local-certificate",
                "O=example.org, CN=frontend".to_string(),
            ),
            ("x-up-uri-san-peer-certificate", spiffe("orders")),
            ("x-up-uri-san-local-certificate", spiffe("frontend")),
            ("x-up-dns-san-peer-certificate", "orders.example.org".into()),
            (
                "x-up-dns-san-local-certificate",
                "frontend.example.org".into(),
            ),
            ("x-up-sha256-peer-certificate-digest", digest),
            ("x-up-transport-failure-reason", "status:NotFound".into()),
        ];
        for (name, value) in expected {
            assert_eq!(header(&response, name), value, "{round}: `{name}`");
        }
        let local: std::net::SocketAddr = header(&response, "x-up-local-address").parse().unwrap();
        assert!(local.ip().is_loopback() && local.port() != 0, "{local}");
    }
}

/// On plaintext, `upstream.address` and `upstream.port` read as in Envoy
/// (the echo server's address), the TLS ones are not found in both.
#[tokio::test]
async fn plaintext_upstream_properties_match_envoy() {
    let echo = servers::http_echo().await;
    let grpc = servers::grpc_echo().await;
    let lacewing = proxy::start(&conformance_yaml(echo.addr, grpc.addr, ""));
    let lacewing_addr = proxy::listener_addr(&lacewing, "main");
    let response = get_upstream(&format!("http://{lacewing_addr}/up")).await;
    assert_eq!(header(&response, "x-up-address"), echo.addr.to_string());
    assert_eq!(header(&response, "x-up-port"), echo.addr.port().to_string());
    assert_eq!(header(&response, "x-up-request-address"), "status:NotFound");
    let local: std::net::SocketAddr = header(&response, "x-up-local-address").parse().unwrap();
    assert!(local.ip().is_loopback(), "{local}");
    for name in [
        "x-up-tls-version",
        "x-up-subject-peer-certificate",
        "x-up-uri-san-peer-certificate",
        "x-up-sha256-peer-certificate-digest",
    ] {
        assert_eq!(header(&response, name), "status:NotFound", "`{name}`");
    }

    let Some(binary) = envoy::binary() else {
        return;
    };
    let envoy = start_envoy(&binary, echo.addr).await;
    let headers = [("x-test", "upstream")];
    let (from_envoy, from_lacewing) =
        get_from_both(envoy.listener(), lacewing_addr, "/up", &headers).await;
    for name in ["x-up-address", "x-up-port", "x-up-tls-version"] {
        assert_eq!(
            from_envoy.header(name),
            from_lacewing.header(name),
            "`{name}`: Envoy vs Lacewing"
        );
    }
}
