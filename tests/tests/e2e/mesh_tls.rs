//! Mesh identity and mTLS on loopback: a control plane, `lacewing proxy
//! --control` sidecars for `frontend` and `orders`, and echo apps. The
//! sidecars get their certificates over the control stream; `MeshTLS` says
//! whether frontend → orders goes over mTLS, and a plugin on orders' inbound
//! side reads the identity properties of each request.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lacewing_tests::client::{Response, ReusingClient};
use lacewing_tests::servers;
use lacewing_tests::wasm::module;

use crate::mesh_support::*;

const FRONTEND_ID: &str = "spiffe://lacewing.local/ns/default/sa/frontend";
const ORDERS_ID: &str = "spiffe://lacewing.local/ns/default/sa/orders";

/// Fields drop in order: sidecars first, the state directory last.
struct Mesh {
    orders: Process,
    frontend: Process,
    _orders_app: servers::TestServer,
    _frontend_app: servers::TestServer,
    plane: Plane,
    dir: tempfile::TempDir,
}

impl Mesh {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let plane = Plane::start(&dir.path().join("control")).await;
        let orders_app = servers::http_echo_named("orders").await;
        let frontend_app = servers::http_echo_named("frontend").await;
        let control = plane.addr.to_string();
        let state = dir.path().join("control");
        let orders = sidecar_process(
            &control,
            &state,
            "orders",
            orders_app.addr,
            &dir.path().join("orders"),
        );
        let frontend = sidecar_process(
            &control,
            &state,
            "frontend",
            frontend_app.addr,
            &dir.path().join("frontend"),
        );
        until_connected(&plane.client().await, 2).await;
        Self {
            dir,
            plane,
            _orders_app: orders_app,
            _frontend_app: frontend_app,
            orders,
            frontend,
        }
    }

    /// Applies the two services, the identity plugin on orders, and `MeshTLS`
    /// for orders in `mode`; waits until both sidecars took it.
    async fn apply_mode(&self, mode: &str) {
        let identity = module("conformance-filter");
        let text = format!(
            "{}{}{}apiVersion: lacewing.dev/v1alpha1\nkind: MeshTLS\nmetadata: {{name: orders}}\nspec: {{destination: orders, mode: {mode}}}\n",
            service("orders", ""),
            service("frontend", ""),
            plugin("identity", "orders", identity.to_str().unwrap(), ""),
        );
        let mut client = self.plane.client().await;
        let (version, done) =
            apply_and_wait(&mut client, self.dir.path(), "mesh.yaml", &text).await;
        assert!(
            done.nacked.is_empty() && done.silent.is_empty(),
            "version {version} not taken: {done:?}"
        );
    }

    /// frontend's app calls orders through its sidecar, asking the orders
    /// side's plugin for the identity properties.
    async fn call_orders(&self, client: &ReusingClient) -> Response {
        let request = Request::get(format!("http://{}/", self.frontend.addr("outbound")))
            .header("host", "orders")
            .header("x-test", "identity")
            .body(Full::new(Bytes::new()))
            .unwrap();
        client.request(request).await
    }
}

/// A plaintext HTTP/1.1 GET straight to `addr` (no sidecar): the status
/// line, or `None` when the connection is closed without an answer.
fn plaintext_get(addr: SocketAddr) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(b"GET / HTTP/1.1\r\nhost: orders\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut answer = Vec::new();
    // A reset is a refusal as much as a close.
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.lines().next().map(str::to_string)
}

fn metric(metrics: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_mesh_tls_carries_identity_refuses_plaintext_and_reloads() {
    let mesh = Mesh::start().await;
    mesh.apply_mode("STRICT").await;
    let client = ReusingClient::http1();

    // frontend → orders over mTLS: the plugin on orders sees who called.
    let response = mesh.call_orders(&client).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-upstream"), Some("orders"));
    let id = |name: &str| {
        response
            .header(&format!("x-id-{name}"))
            .unwrap_or("<absent>")
    };
    assert_eq!(id("source-principal"), FRONTEND_ID);
    assert_eq!(id("source-uri-san-peer-certificate"), FRONTEND_ID);
    assert_eq!(id("connection-uri-san-peer-certificate"), FRONTEND_ID);
    assert_eq!(id("destination-principal"), ORDERS_ID);
    assert_eq!(id("connection-uri-san-local-certificate"), ORDERS_ID);
    assert_eq!(id("connection-mtls"), "true");
    assert_eq!(id("connection-tls-version"), "TLSv1.3");
    assert_eq!(
        id("connection-subject-peer-certificate"),
        "O=lacewing.local, CN=frontend"
    );
    let digest = id("connection-sha256-peer-certificate-digest");
    assert!(
        digest.len() == 64 && digest.bytes().all(|b| b.is_ascii_hexdigit()),
        "{digest}"
    );
    assert_eq!(
        id("connection-requested-server-name"),
        "orders.default.lacewing.local"
    );

    // Plaintext straight to orders' inbound is refused and counted.
    let inbound = mesh.orders.addr("inbound");
    assert_eq!(plaintext_get(inbound), None);
    let orders_metrics = lacewing_tests::client::metrics(mesh.orders.addr("admin")).await;
    let refused = metric(
        &orders_metrics,
        "lacewing_downstream_tls_handshakes_total",
        &[("listener", "inbound"), ("outcome", "plaintext_refused")],
    );
    assert!(refused >= 1.0, "{orders_metrics}");
    let tls_connections = metric(
        &orders_metrics,
        "lacewing_downstream_connections_by_transport_total",
        &[("listener", "inbound"), ("transport", "tls")],
    );
    assert!(tls_connections >= 1.0, "{orders_metrics}");
    // frontend's side counts its handshakes to orders; both show their expiry.
    let frontend_metrics = lacewing_tests::client::metrics(mesh.frontend.addr("admin")).await;
    let ok = metric(
        &frontend_metrics,
        "lacewing_upstream_tls_handshakes_total",
        &[("cluster", "svc.default.orders"), ("outcome", "ok")],
    );
    assert!(ok >= 1.0, "{frontend_metrics}");
    for metrics in [&orders_metrics, &frontend_metrics] {
        let expiry = metric(metrics, "lacewing_sidecar_certificate_expiry_seconds", &[]);
        // Issued for 24 hours by default.
        assert!(
            expiry > 23.0 * 3600.0 && expiry <= 24.0 * 3600.0,
            "{metrics}"
        );
    }
    // The control plane knows each sidecar's certificate.
    let status = mesh.plane.client().await.status().await.unwrap();
    for sidecar in &status.sidecars {
        assert!(sidecar.cert_not_after_ms > 0, "{sidecar:?}");
        assert_eq!(
            sidecar.spiffe_id,
            format!("spiffe://lacewing.local/ns/default/sa/{}", sidecar.service)
        );
    }

    // DISABLE: plaintext both ways, reloaded without restarting anything.
    mesh.apply_mode("DISABLE").await;
    let fresh = ReusingClient::http1();
    let response = mesh.call_orders(&fresh).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-id-connection-mtls"), Some("false"));
    assert_eq!(
        response.header("x-id-source-principal"),
        Some("status:NotFound")
    );
    assert_eq!(plaintext_get(inbound).as_deref(), Some("HTTP/1.1 200 OK"));

    // PERMISSIVE: sidecars still use mTLS, and plaintext callers are served.
    mesh.apply_mode("PERMISSIVE").await;
    let fresh = ReusingClient::http1();
    let response = mesh.call_orders(&fresh).await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-id-connection-mtls"), Some("true"));
    assert_eq!(response.header("x-id-source-principal"), Some(FRONTEND_ID));
    assert_eq!(plaintext_get(inbound).as_deref(), Some("HTTP/1.1 200 OK"));
}

/// An HTTP/1.1 connection over mutual TLS to `addr`, as `identity`,
/// expecting the server to be `expect`; with the server's leaf certificate.
async fn tls_connection(
    addr: SocketAddr,
    identity: &lacewing_tls::Identity,
    trust: &lacewing_tls::TrustBundle,
    expect: &lacewing_tls::SpiffeId,
) -> (
    hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    Vec<u8>,
) {
    let config = lacewing_tls::client_config(identity, trust, expect).unwrap();
    let mut config = (*config).clone();
    config.alpn_protocols = vec![lacewing_tls::ALPN_HTTP11.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
        .connect(lacewing_tls::server_name_for(expect), tcp)
        .await
        .unwrap();
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    let (sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    (sender, leaf)
}

async fn get_on(sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>) -> u16 {
    // The connection task marks the connection idle again after the last
    // body is read; sending before it did fails with "connection was not
    // ready" (what a busy machine made this test see once).
    sender.ready().await.expect("the connection stays open");
    let request = Request::get("/")
        .header("host", "orders")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let _ = http_body_util::BodyExt::collect(response.into_body()).await;
    status
}

/// A sidecar's agent rotates its one-minute certificate at two thirds of its
/// lifetime over the control stream: new handshakes present the new one, a
/// connection made before the rotation keeps serving (a request every 100 ms
/// on it, none failing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_rotate_without_dropping_connections() {
    use lacewing_control::ControlPlane;
    use lacewing_control::ca::CaOptions;

    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("control");
    let options = CaOptions {
        lifetime: Duration::from_secs(60),
        ..CaOptions::default()
    };
    let plane = ControlPlane::bind_with("127.0.0.1:0".parse().unwrap(), &state, &options)
        .await
        .unwrap();
    let control = plane.local_addr().unwrap();
    let ca = plane.ca().clone();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(plane.serve(async {
        let _ = stopped.await;
    }));

    // The orders sidecar: a proxy with a STRICT inbound listener, and its agent.
    let app = servers::http_echo_named("orders").await;
    let live = lacewing_tls::LiveIdentity::new();
    let config = lacewing_config::from_yaml_str(
        &format!(
            "admin: {{ address: null }}
workers: 1
listeners:
  - name: inbound
    address: 127.0.0.1:0
    tls: {{ mode: strict }}
    routes: [{{ name: app, cluster: app }}]
clusters:
  - {{ name: app, endpoints: ['{}'] }}
",
            app.addr
        ),
        "orders.yaml",
    )
    .unwrap();
    let proxy = lacewing_proxy::Proxy::start_with(
        config,
        lacewing_proxy::StartOptions {
            identity: Some(live.clone()),
            ..Default::default()
        },
    )
    .unwrap();
    let inbound = proxy.listener_addr("inbound").unwrap();
    let agent_options = lacewing_control_agent::AgentOptions {
        control: control.to_string(),
        token: lacewing_control::token::read(&state.join("bootstrap.token")).unwrap(),
        trust: trust(&state),
        spec: spec("orders", 0),
        state_dir: dir.path().join("orders"),
        identity: live.clone(),
    };
    let registry = prometheus::Registry::new();
    let metrics = lacewing_control_agent::metrics::AgentMetrics::register(&registry).unwrap();
    // The agent's publishes are not this test's subject: the proxy keeps its own config.
    let publish: lacewing_control_agent::Publish = std::sync::Arc::new(|_| Ok(()));
    let initial = lacewing_control_agent::bootstrap_config(&agent_options.spec);
    let agent =
        lacewing_control_agent::Agent::new(agent_options, publish, metrics, &initial, 0).unwrap();
    let agent = tokio::spawn(agent.run());

    lacewing_tests::eventually("the first certificate is installed", || {
        let live = live.clone();
        async move { live.current().is_some() }
    })
    .await;
    let first = live.current().unwrap();
    assert_eq!(first.id.uri(), ORDERS_ID);

    // A frontend client with a certificate from the same CA.
    let frontend_id = lacewing_tls::SpiffeId::new("lacewing.local", "default", "frontend").unwrap();
    let key = lacewing_tls::WorkloadKey::generate().unwrap();
    let issued = ca
        .sign(&key.csr_pem(&frontend_id).unwrap(), &frontend_id)
        .unwrap();
    let client_identity = key.identity(&issued.cert_pem).unwrap();
    let trust = lacewing_tls::TrustBundle::from_pem(ca.root_pem()).unwrap();
    let orders_id: lacewing_tls::SpiffeId = ORDERS_ID.parse().unwrap();
    let (mut before, leaf_before) =
        tls_connection(inbound, &client_identity, &trust, &orders_id).await;
    assert_eq!(leaf_before, first.identity.leaf().to_vec());
    assert_eq!(get_on(&mut before).await, 200);

    // Two thirds of a minute later the agent asks again and installs the new
    // one; meanwhile requests keep flowing on the connection made before.
    let mut served = 0;
    for _ in 0..900 {
        if live.current().is_some_and(|m| m.serial >= 2) {
            break;
        }
        assert_eq!(get_on(&mut before).await, 200, "after {served} requests");
        served += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        live.current().is_some_and(|m| m.serial >= 2),
        "no rotation after {served} requests"
    );
    let second = live.current().unwrap();
    assert!(second.not_after > first.not_after);

    // The connection made before keeps serving; a new one sees the new certificate.
    assert_eq!(get_on(&mut before).await, 200);
    let (mut after, leaf_after) =
        tls_connection(inbound, &client_identity, &trust, &orders_id).await;
    assert_eq!(leaf_after, second.identity.leaf().to_vec());
    assert_ne!(leaf_after, leaf_before);
    assert_eq!(get_on(&mut after).await, 200);

    agent.abort();
    let _ = stop.send(());
    let _ = serving.await;
    tokio::task::spawn_blocking(move || proxy.shutdown())
        .await
        .unwrap();
}

/// A sidecar registered as `web` asking for `payments`' identity gets no
/// certificate: the request is refused, counted, and the stream goes on
/// (its snapshots name the trust domain); asking for its own then works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_csr_for_another_services_identity_is_refused_and_counted() {
    use lacewing_control_api as api;
    use tokio_stream::StreamExt;

    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(&dir.path().join("control")).await;
    let channel = plane.channel().await;
    let mut discovery = api::discovery_client::DiscoveryClient::new(channel);
    let key = lacewing_tls::WorkloadKey::generate().unwrap();
    let csr = |service: &str| api::CertificateRequest {
        csr_pem: key
            .csr_pem(&lacewing_tls::SpiffeId::new("lacewing.local", "default", service).unwrap())
            .unwrap(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(api::SidecarMessage {
        message: Some(api::sidecar_message::Message::Hello(api::Hello {
            node_id: "web-1".into(),
            service: "web".into(),
            namespace: "default".into(),
            inbound: "127.0.0.1:1".into(),
            certificate_request: Some(csr("payments")),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    lacewing_control::token::authorize(&mut request, &plane.bootstrap_token()).unwrap();
    let mut snapshots = discovery.stream(request).await.unwrap().into_inner();
    let first = snapshots.next().await.unwrap().unwrap();
    assert!(first.certificate.is_none());
    assert_eq!(first.trust_domain, "lacewing.local");
    let metrics = plane.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "lacewing_control_certificates_total",
            &[("result", "refused")]
        ),
        1.0,
        "{metrics}"
    );

    // Its own identity, on the same stream.
    tx.send(api::SidecarMessage {
        message: Some(api::sidecar_message::Message::CertificateRequest(csr(
            "web",
        ))),
    })
    .await
    .unwrap();
    let second = snapshots.next().await.unwrap().unwrap();
    let certificate = second.certificate.unwrap();
    assert_eq!(
        certificate.spiffe_id,
        "spiffe://lacewing.local/ns/default/sa/web"
    );
    assert!(key.identity(&certificate.chain_pem).is_ok());
    drop(tx);
    plane.stop().await;
}

/// A plaintext HTTP/1.1 exchange on an open connection: the status line,
/// or `None` when the proxy closed (or reset) the connection instead.
fn plaintext_exchange(stream: &mut std::net::TcpStream) -> Option<String> {
    if stream
        .write_all(b"GET / HTTP/1.1\r\nhost: orders\r\n\r\n")
        .is_err()
    {
        return None;
    }
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = match stream.read(&mut chunk) {
            Ok(0) => return None,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                panic!("no answer and no close: {e}")
            }
            Err(_) => return None,
        };
        answer.extend_from_slice(&chunk[..n]);
        let text = String::from_utf8_lossy(&answer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .expect("a content-length");
            if answer.len() >= end + 4 + length {
                return Some(text.lines().next().unwrap_or("").to_string());
            }
        }
    }
}

/// A plaintext connection that a new policy forbids is closed: orders goes
/// from PERMISSIVE to STRICT while a plaintext keep-alive connection is open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_connection_is_closed_when_its_listener_turns_strict() {
    let mesh = Mesh::start().await;
    mesh.apply_mode("PERMISSIVE").await;
    let inbound = mesh.orders.addr("inbound");
    let mut stream = std::net::TcpStream::connect(inbound).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let served = |stream: &mut std::net::TcpStream| {
        let status = tokio::task::block_in_place(|| plaintext_exchange(stream));
        assert!(
            status
                .as_deref()
                .is_some_and(|s| s.starts_with("HTTP/1.1 200")),
            "{status:?}"
        );
    };
    served(&mut stream);

    // A new generation that still allows plaintext keeps the connection.
    let text = format!(
        "{}apiVersion: lacewing.dev/v1alpha1\nkind: MeshTLS\nmetadata: {{name: orders}}\nspec: {{destination: orders, mode: PERMISSIVE}}\n",
        service("payments", ""),
    );
    let mut client = mesh.plane.client().await;
    let (_, done) = apply_and_wait(&mut client, mesh.dir.path(), "more.yaml", &text).await;
    assert!(done.nacked.is_empty(), "{done:?}");
    served(&mut stream);

    // STRICT: the connection is closed. Requests keep it busy meanwhile (so
    // no idle timer can be what closes it): at most the one in flight when
    // the generation went live is still answered.
    mesh.apply_mode("STRICT").await;
    let mut answered = 0;
    let closed = (0..25).any(|_| {
        std::thread::sleep(Duration::from_millis(200));
        match tokio::task::block_in_place(|| plaintext_exchange(&mut stream)) {
            None => true,
            Some(status) => {
                assert!(status.starts_with("HTTP/1.1 200"), "{status}");
                answered += 1;
                false
            }
        }
    });
    assert!(
        closed,
        "the plaintext connection was still served {answered} times after the listener turned STRICT"
    );
    assert!(
        answered <= 1,
        "{answered} requests served after STRICT went live"
    );
    // And a new plaintext connection is refused.
    assert_eq!(plaintext_get(inbound), None);
}

/// The same for HTTP/2 without TLS (prior knowledge): when orders turns
/// STRICT, the connection gets GOAWAY, a request in flight then is still
/// answered, the connection ends, and a new plaintext connection is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_http2_connection_is_closed_when_its_listener_turns_strict() {
    use http_body_util::BodyExt;

    let mesh = Mesh::start().await;
    mesh.apply_mode("PERMISSIVE").await;
    let inbound = mesh.orders.addr("inbound");
    let tcp = tokio::net::TcpStream::connect(inbound).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let connection = tokio::spawn(connection);
    let get = || {
        Request::get("http://orders/")
            .header("host", "orders")
            .body(http_body_util::Either::Left(Full::new(Bytes::new())))
            .unwrap()
    };
    let response = sender.send_request(get()).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    response.into_body().collect().await.unwrap();

    // A request whose body is still being sent when STRICT goes live.
    let (body, frames) =
        tokio::sync::mpsc::channel::<Result<hyper::body::Frame<Bytes>, std::io::Error>>(1);
    let channel =
        http_body_util::StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(frames));
    body.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"first"))))
        .await
        .unwrap();
    let post = Request::post("http://orders/bytes/10")
        .header("host", "orders")
        .body(http_body_util::Either::Right(channel))
        .unwrap();
    let in_flight = tokio::spawn(sender.send_request(post));

    mesh.apply_mode("STRICT").await;
    // The connection takes no new request from now on (GOAWAY)...
    lacewing_tests::eventually("the connection refuses new requests", || {
        let mut sender = sender.clone();
        let request = get();
        async move {
            match sender.ready().await {
                Err(_) => true,
                Ok(()) => sender.send_request(request).await.is_err(),
            }
        }
    })
    .await;
    // ...but the request in flight is answered...
    body.send(Ok(hyper::body::Frame::data(Bytes::from_static(b"last"))))
        .await
        .unwrap();
    drop(body);
    let answered = tokio::time::timeout(Duration::from_secs(10), in_flight)
        .await
        .expect("the request in flight is answered")
        .unwrap()
        .expect("the request in flight completes");
    assert_eq!(answered.status(), 200);
    let bytes = answered.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(bytes.len(), 10);
    // ...then the connection ends.
    tokio::time::timeout(Duration::from_secs(10), connection)
        .await
        .expect("the connection ends")
        .unwrap()
        .ok();
    // And a new plaintext connection is refused.
    assert_eq!(plaintext_get(inbound), None);
}
