//! Clusters with mutual TLS against a real rustls server on loopback: the
//! proxy's mesh identity is presented, the server's SPIFFE ID is checked,
//! the ALPN offered is the cluster's protocol, and a TLS cluster is never
//! the plaintext cluster it replaced.

mod support;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lacewing_config::{ClusterTls, UpstreamProtocol};
use lacewing_core::metrics::Metrics;
use lacewing_tls::{Identity, LiveIdentity, MeshCa, SpiffeId, TrustBundle, WorkloadKey};
use lacewing_upstream::Upstreams;
use support::{body_text, config, get, policy};

fn id(service: &str) -> SpiffeId {
    SpiffeId::new("mesh.local", "default", service).unwrap()
}

fn issue(ca: &MeshCa, service: &str) -> Identity {
    let key = WorkloadKey::generate().unwrap();
    let issued = ca
        .sign(&key.csr_pem(&id(service)).unwrap(), &id(service))
        .unwrap();
    key.identity(&issued.cert_pem).unwrap()
}

/// A TLS server for `service` answering with the client's SPIFFE ID and the
/// negotiated ALPN protocol.
async fn tls_server(ca: &MeshCa, service: &str) -> SocketAddr {
    let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
    let config = lacewing_tls::server_config(&issue(ca, service), &trust).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(tcp).await else {
                    return;
                };
                let (_, conn) = stream.get_ref();
                let peer = conn
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .and_then(|leaf| lacewing_tls::uri_sans(leaf).ok())
                    .unwrap_or_default()
                    .join(",");
                let alpn =
                    String::from_utf8_lossy(conn.alpn_protocol().unwrap_or_default()).into_owned();
                let service = service_fn(move |_req: hyper::Request<hyper::body::Incoming>| {
                    let body = format!("{peer} {alpn}");
                    async move {
                        Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

fn live(ca: &MeshCa, service: &str) -> Arc<LiveIdentity> {
    let live = LiveIdentity::new();
    let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
    live.install(
        issue(ca, service),
        trust,
        SystemTime::now() + Duration::from_secs(3600),
    )
    .unwrap();
    live
}

fn tls_config(
    addr: SocketAddr,
    peer: &str,
    protocol: UpstreamProtocol,
) -> lacewing_config::ClusterConfig {
    let mut cluster = config("orders", &[addr]);
    cluster.protocol = protocol;
    cluster.tls = Some(ClusterTls {
        peer: id(peer).uri(),
    });
    cluster
}

/// One request through a fresh cluster `config` presenting `identity`: the
/// outcome, and the cluster's metrics.
async fn send_once(
    config: lacewing_config::ClusterConfig,
    identity: &Arc<LiveIdentity>,
) -> (Result<String, String>, Metrics) {
    let metrics = Metrics::new();
    let upstreams = Upstreams::build(&[config], &metrics, None, None, Some(identity)).unwrap();
    let sent = upstreams
        .cluster("orders")
        .unwrap()
        .send(get("/"), &policy(0))
        .await;
    let outcome = match sent {
        Ok(answer) => Ok(body_text(answer.response).await),
        Err(error) => Err(error.to_string()),
    };
    (outcome, metrics)
}

fn handshakes(metrics: &Metrics, outcome: &str) -> u64 {
    metrics
        .upstream_tls_handshakes
        .with_label_values(&["orders", outcome])
        .get()
}

#[tokio::test(flavor = "current_thread")]
async fn a_tls_cluster_presents_the_mesh_identity_and_speaks_its_alpn() {
    let (ca, _) = MeshCa::generate("mesh.local").unwrap();
    let server = tls_server(&ca, "orders").await;
    let identity = live(&ca, "frontend");
    for (protocol, alpn) in [
        (UpstreamProtocol::Http1, "http/1.1"),
        (UpstreamProtocol::H2, "h2"),
    ] {
        let metrics = Metrics::new();
        let upstreams = Upstreams::build(
            &[tls_config(server, "orders", protocol)],
            &metrics,
            None,
            None,
            Some(&identity),
        )
        .unwrap();
        let cluster = upstreams.cluster("orders").unwrap();
        assert!(cluster.is_tls());
        for _ in 0..3 {
            let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
            assert_eq!(
                body_text(answer.response).await,
                format!("spiffe://mesh.local/ns/default/sa/frontend {alpn}")
            );
        }
        // One handshake: the pooled connection carries the later requests.
        assert_eq!(handshakes(&metrics, "ok"), 1, "{alpn}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_server_with_another_identity_or_from_another_ca_is_refused() {
    let (ca, _) = MeshCa::generate("mesh.local").unwrap();
    let server = tls_server(&ca, "orders").await;
    let identity = live(&ca, "frontend");
    let (outcome, metrics) = send_once(
        tls_config(server, "payments", UpstreamProtocol::Http1),
        &identity,
    )
    .await;
    let error = outcome.unwrap_err();
    assert!(
        error.contains("peer identity is spiffe://mesh.local/ns/default/sa/orders"),
        "{error}"
    );
    assert_eq!(handshakes(&metrics, "wrong_peer_identity"), 1);

    let (foreign, _) = MeshCa::generate("mesh.local").unwrap();
    let stranger = tls_server(&foreign, "orders").await;
    let (outcome, metrics) = send_once(
        tls_config(stranger, "orders", UpstreamProtocol::Http1),
        &identity,
    )
    .await;
    assert!(outcome.is_err());
    assert_eq!(handshakes(&metrics, "untrusted_certificate"), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn tls_needs_an_identity_and_is_never_the_plaintext_cluster() {
    let (ca, _) = MeshCa::generate("mesh.local").unwrap();
    let server = tls_server(&ca, "orders").await;
    let metrics = Metrics::new();
    let tls = tls_config(server, "orders", UpstreamProtocol::Http1);
    let error =
        Upstreams::build(std::slice::from_ref(&tls), &metrics, None, None, None).unwrap_err();
    assert!(
        error.to_string().starts_with("cluster `orders`: tls:"),
        "{error}"
    );

    // An identity not installed yet: connecting fails, and says why.
    let (outcome, _) = send_once(tls.clone(), &LiveIdentity::new()).await;
    let error = outcome.unwrap_err();
    assert!(error.contains("no workload certificate yet"), "{error}");

    // Turning TLS on or off makes a new cluster (with its own pools).
    let identity = live(&ca, "frontend");
    let plain = config("orders", &[server]);
    let first = Upstreams::build(
        std::slice::from_ref(&plain),
        &metrics,
        None,
        None,
        Some(&identity),
    )
    .unwrap();
    let next = Upstreams::build(
        std::slice::from_ref(&tls),
        &metrics,
        Some(&first),
        None,
        Some(&identity),
    )
    .unwrap();
    assert!(!Arc::ptr_eq(
        first.cluster("orders").unwrap(),
        next.cluster("orders").unwrap()
    ));
    assert!(!first.cluster("orders").unwrap().is_tls());
    assert!(next.cluster("orders").unwrap().is_tls());
}
