//! Standalone proxies (no control plane) with identity files: a CA and two
//! SPIFFE leaves made in the test, mutual TLS between two proxies on
//! loopback, refusals by the STRICT one, checks of the files at load, and
//! a rotation of the files picked up by a reload.

use std::time::{Duration, SystemTime};

use lacewing_config::ProxyConfig;
use lacewing_proxy::{Proxy, ProxyHandle, PublishError};
use lacewing_tests::client::{self, metric_value};
use lacewing_tests::{proxy, servers};

use super::tls_files::{self, Ca, Files, spiffe};

/// Listener `inbound` (mutual TLS, STRICT) to cluster `app`, with `{files}`.
pub(super) const ORDERS: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
{files}listeners:
  - name: inbound
    address: 127.0.0.1:0
    tls: { mode: strict }
    routes: [{ name: all, cluster: app }]
clusters:
  - { name: app, endpoints: ['{app}'] }
";

const FRONTEND: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
{files}listeners:
  - { name: outbound, address: 127.0.0.1:0, routes: [{ name: all, cluster: orders }] }
clusters:
  - name: orders
    endpoints: ['{orders}']
    tls: { peer: '{peer}' }
";

fn parse(yaml: &str) -> ProxyConfig {
    lacewing_config::load::from_yaml_str(yaml, proxy::TEST_CONFIG_NAME).unwrap()
}

/// Publishes `yaml` again, as SIGHUP or `--watch` do after reading the file.
async fn reload(handle: &ProxyHandle, yaml: &str) -> Result<u64, PublishError> {
    let publisher = handle.publisher();
    let config = parse(yaml);
    tokio::task::spawn_blocking(move || publisher.publish(config, "test"))
        .await
        .unwrap()
        .map(|g| g.number)
}

/// The leaf `addr` presents to a client certified by `client_ca`.
async fn presented(
    addr: std::net::SocketAddr,
    ca: &Ca,
) -> lacewing_tls::rustls::pki_types::CertificateDer<'static> {
    let client = ca.leaf("probe").identity();
    let stream = tls_files::connect(addr, &client, &ca.trust(), &spiffe("orders"), &[])
        .await
        .expect("a TLS handshake");
    stream.get_ref().1.peer_certificates().unwrap()[0].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_standalone_proxies_speak_mutual_tls_from_files_and_rotate_on_reload() {
    let ca = Ca::new("test root");
    let orders_files = Files::new(&ca.leaf("orders"), &ca);
    let frontend_files = Files::new(&ca.leaf("frontend"), &ca);
    let app = servers::http_echo().await;
    let orders_yaml = proxy::fill(
        ORDERS,
        &[("files", &orders_files.yaml()), ("app", &app.addr)],
    );
    let orders = proxy::start(&orders_yaml);
    let inbound = proxy::listener_addr(&orders, "inbound");
    let (tapped, captured) = tls_files::tap(inbound).await;
    let frontend = proxy::start(&proxy::fill(
        FRONTEND,
        &[
            ("files", &frontend_files.yaml()),
            ("orders", &tapped),
            ("peer", &spiffe("orders")),
        ],
    ));

    // frontend → orders over mutual TLS: the app answers, and what crossed
    // the wire between the proxies is TLS records, not the request.
    let response = client::get(&proxy::url(&frontend, "outbound", "/through-the-mesh")).await;
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["path"], "/through-the-mesh");
    {
        let both = captured.lock().unwrap();
        assert_eq!(&both.0[..2], &[0x16, 0x03], "a TLS handshake record first");
        assert_eq!(&both.1[..2], &[0x16, 0x03]);
        assert!(!tls_files::contains(&both.0, b"/through-the-mesh"));
    }
    let metrics = client::metrics(proxy::admin_addr(&orders)).await;
    let ok = "lacewing_downstream_tls_handshakes_total{listener=\"inbound\",outcome=\"ok\"}";
    assert_eq!(metric_value(&metrics, ok), Some(1.0));

    // A plaintext client is refused by the STRICT listener, and counted.
    let mut plain = tokio::net::TcpStream::connect(inbound).await.unwrap();
    assert_eq!(tls_files::raw_get(&mut plain, "/plain").await, "");
    let refused = "lacewing_downstream_tls_handshakes_total{listener=\"inbound\",outcome=\"plaintext_refused\"}";
    lacewing_tests::eventually("the plaintext refusal is counted", || async {
        let metrics = client::metrics(proxy::admin_addr(&orders)).await;
        metric_value(&metrics, refused) == Some(1.0)
    })
    .await;

    // A client whose certificate comes from another CA is refused.
    let stranger_ca = Ca::new("another root");
    let stranger = stranger_ca.leaf("frontend").identity();
    let answer =
        match tls_files::connect(inbound, &stranger, &ca.trust(), &spiffe("orders"), &[]).await {
            Ok(mut stream) => tls_files::raw_get(&mut stream, "/stranger").await,
            Err(_) => String::new(),
        };
    assert_eq!(answer, "", "no answer to a client from another CA");
    let untrusted = "lacewing_downstream_tls_handshakes_total{listener=\"inbound\",outcome=\"untrusted_certificate\"}";
    lacewing_tests::eventually("the untrusted client is counted", || async {
        let metrics = client::metrics(proxy::admin_addr(&orders)).await;
        metric_value(&metrics, untrusted) == Some(1.0)
    })
    .await;

    // Rotation: new files, then a reload; new handshakes present the new leaf.
    let before = presented(inbound, &ca).await;
    let rotated = ca.leaf("orders");
    orders_files.write(&rotated);
    assert_eq!(
        presented(inbound, &ca).await,
        before,
        "not before the reload"
    );
    reload(&orders, &orders_yaml)
        .await
        .expect("the reload goes live");
    assert_eq!(presented(inbound, &ca).await, rotated.der());
    let response = client::get(&proxy::url(&frontend, "outbound", "/after-rotation")).await;
    assert_eq!(response.status, 200, "{}", response.text());

    // A bad file on reload is refused with its path and reason; the
    // identity installed last keeps serving.
    std::fs::write(orders_files.path("key.pem"), "not a key").unwrap();
    let error = reload(&orders, &orders_yaml).await.unwrap_err().to_string();
    let key_path = orders_files.path("key.pem").display().to_string();
    assert!(
        error.starts_with(&format!("tls.key_file {key_path}: no PEM private key")),
        "{error}"
    );
    assert_eq!(presented(inbound, &ca).await, rotated.der());
    let response = client::get(&proxy::url(&frontend, "outbound", "/still")).await;
    assert_eq!(response.status, 200, "{}", response.text());
}

#[tokio::test]
async fn identity_files_are_checked_at_load_with_the_path_and_the_reason() {
    let ca = Ca::new("test root");
    let app = servers::http_echo().await;
    let start = |files: &Files| {
        let yaml = proxy::fill(ORDERS, &[("files", &files.yaml()), ("app", &app.addr)]);
        let mut config = parse(&yaml);
        config.admin.address = None;
        Proxy::start(config).map(drop).unwrap_err().to_string()
    };
    let good = ca.leaf("orders");

    // A missing file.
    let files = Files::new(&good, &ca);
    std::fs::remove_file(files.path("ca.pem")).unwrap();
    let error = start(&files);
    let path = files.path("ca.pem").display().to_string();
    assert!(
        error.contains(&format!("tls.trust_file {path}: cannot read:")),
        "{error}"
    );

    // Not PEM.
    let files = Files::new(&good, &ca);
    std::fs::write(files.path("cert.pem"), "hello").unwrap();
    let error = start(&files);
    let path = files.path("cert.pem").display().to_string();
    assert!(
        error.contains(&format!("tls.cert_file {path}: no PEM certificate found")),
        "{error}"
    );

    // A key that is not the certificate's.
    let files = Files::new(&good, &ca);
    std::fs::write(files.path("key.pem"), ca.leaf("orders").key_pem).unwrap();
    let error = start(&files);
    let path = files.path("key.pem").display().to_string();
    assert!(
        error.contains(&format!(
            "tls.key_file {path}: the private key does not match the certificate in"
        )),
        "{error}"
    );

    // An expired certificate.
    let now = SystemTime::now();
    let expired = ca.leaf_valid(
        "orders",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    let files = Files::new(&expired, &ca);
    let error = start(&files);
    let path = files.path("cert.pem").display().to_string();
    assert!(
        error.contains(&format!("tls.cert_file {path}: the certificate expired at")),
        "{error}"
    );

    // A listener with `tls` and neither files nor a control plane.
    let yaml = proxy::fill(ORDERS, &[("files", &""), ("app", &app.addr)]);
    let mut config = parse(&yaml);
    config.admin.address = None;
    let error = Proxy::start(config).map(drop).unwrap_err().to_string();
    assert!(error.contains("tls needs an identity"), "{error}");
}

/// The real binary with `--watch`: replacing the identity files (the
/// configuration file unchanged) is a reload, and new handshakes present the
/// new certificate; a half-written pair is refused and the last good one stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_reloads_replaced_identity_files() {
    let ca = Ca::new("test root");
    let first = ca.leaf("orders");
    let files = Files::new(&first, &ca);
    let app = servers::http_echo().await;
    let free_port = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port()
    };
    let (port, admin_port) = (free_port(), free_port());
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    let yaml = proxy::fill(ORDERS, &[("files", &files.yaml()), ("app", &app.addr)])
        .replace("address: 127.0.0.1:0 }", &format!("address: {admin} }}"))
        .replace(
            "address: 127.0.0.1:0\n",
            &format!("address: 127.0.0.1:{port}\n"),
        );
    let config = files.path("proxy.yaml");
    std::fs::write(&config, yaml).unwrap();
    let _child = tokio::process::Command::new(lacewing_tests::process::lacewing_binary())
        .args(["proxy", "--watch", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start lacewing");
    let inbound: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let presents = |leaf: lacewing_tls::rustls::pki_types::CertificateDer<'static>| {
        let ca = &ca;
        move || {
            let leaf = leaf.clone();
            async move {
                let client = ca.leaf("probe").identity();
                match tls_files::connect(inbound, &client, &ca.trust(), &spiffe("orders"), &[])
                    .await
                {
                    Ok(stream) => stream.get_ref().1.peer_certificates().unwrap()[0] == leaf,
                    Err(_) => false,
                }
            }
        }
    };
    lacewing_tests::eventually(
        "the proxy serves the first certificate",
        presents(first.der()),
    )
    .await;

    // Only the certificate: it does not match the key, the reload is refused.
    let rotated = ca.leaf("orders");
    std::fs::write(files.path("cert.pem"), &rotated.cert_pem).unwrap();
    lacewing_tests::eventually("the mismatched pair is a failed reload", || async {
        let metrics = client::metrics(admin).await;
        metric_value(
            &metrics,
            "lacewing_config_reloads_total{result=\"failure\"}",
        ) == Some(1.0)
    })
    .await;
    assert!(
        presents(first.der())().await,
        "the last good identity stays"
    );
    // Then the key: the pair goes live.
    std::fs::write(files.path("key.pem"), &rotated.key_pem).unwrap();
    lacewing_tests::eventually(
        "the rotated certificate is presented",
        presents(rotated.der()),
    )
    .await;
}
