//! Hostile TLS input against a real sidecar's STRICT inbound listener and
//! against the control plane's port: garbage, a truncated ClientHello, a
//! stalled handshake, an oversized certificate chain, a wrong bootstrap
//! token. Each is refused, counted, and leaves no descriptor behind; the
//! sidecar and the control plane keep serving.

use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

use lacewing_tests::client::metric_sum;
use lacewing_tests::servers;
use lacewing_tls::rustls;

use crate::mesh_operator_tls::Control;
use crate::mesh_support::*;

/// Open descriptors of process `pid`.
fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the process's descriptors")
        .count()
}

/// The first flight of a TLS 1.3 client (its ClientHello record), as a
/// real rustls client writes it.
fn client_hello() -> Vec<u8> {
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let mut client =
        rustls::ClientConnection::new(Arc::new(config), "orders".try_into().unwrap()).unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    assert_eq!(hello[0], 0x16);
    hello
}

/// Connects to `addr`, sends `bytes` (then half-closes when `finish`), and
/// reads until the server closes: what it sent back.
fn exchange(addr: &str, bytes: &[u8], finish: bool) -> Vec<u8> {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    if finish {
        stream.shutdown(std::net::Shutdown::Write).unwrap();
    }
    let mut answer = Vec::new();
    // A reset is a refusal as much as a close.
    let _ = stream.read_to_end(&mut answer);
    answer
}

/// The hostile inputs both listeners get, each on its own connection:
/// garbage after a handshake record header, a ClientHello cut in half, and
/// a record header followed by nothing (stalled until the timeout).
fn hostile_handshakes(addr: &str) {
    let mut garbage = vec![0x16, 0x03, 0x01, 0x00, 0x40];
    garbage.extend_from_slice(&[0xff; 64]);
    let hello = client_hello();
    let truncated = &hello[..hello.len() / 2];
    let stalled = &hello[..5];
    std::thread::scope(|s| {
        s.spawn(|| exchange(addr, &garbage, false));
        s.spawn(|| exchange(addr, truncated, true));
        s.spawn(|| exchange(addr, stalled, false));
    });
}

/// A client certificate chain of more than 64 KiB: a leaf from a CA of
/// its own followed by copies of that CA.
fn oversized_chain_handshake(addr: &str) -> std::io::Result<()> {
    let (ca, _) = lacewing_tls::MeshCa::generate("lacewing.local").unwrap();
    let id = lacewing_tls::SpiffeId::new("lacewing.local", "default", "frontend").unwrap();
    let key = lacewing_tls::WorkloadKey::generate().unwrap();
    let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
    let mut identity = key.identity(&issued.cert_pem).unwrap();
    let root = lacewing_tls::Identity::from_pem(ca.root_pem(), &key.to_pem())
        .unwrap()
        .chain[0]
        .clone();
    while identity.chain.iter().map(|c| c.len()).sum::<usize>() < 80 * 1024 {
        identity.chain.push(root.clone());
    }
    let trust = lacewing_tls::TrustBundle::from_pem(ca.root_pem()).unwrap();
    let orders = lacewing_tls::SpiffeId::new("lacewing.local", "default", "orders").unwrap();
    let config = lacewing_tls::client_config(&identity, &trust, &orders).unwrap();
    let mut config = (*config).clone();
    // The server's chain is not this test's subject: it is from the mesh CA.
    config
        .dangerous()
        .set_certificate_verifier(Arc::new(
            AnyServer(rustls::crypto::ring::default_provider()),
        ));
    let mut client =
        rustls::ClientConnection::new(Arc::new(config), lacewing_tls::server_name_for(&orders))
            .unwrap();
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    client.complete_io(&mut tcp)?;
    // TLS 1.3: the server judges the client's certificate after its own
    // flight; its verdict arrives with the first read.
    client
        .writer()
        .write_all(b"GET / HTTP/1.1\r\nhost: orders\r\n\r\n")?;
    client.complete_io(&mut tcp)?;
    let mut answer = Vec::new();
    while client.wants_read() {
        if client.complete_io(&mut tcp)?.0 == 0 {
            break;
        }
        let _ = client.reader().read_to_end(&mut answer);
    }
    Ok(())
}

#[derive(Debug)]
struct AnyServer(rustls::crypto::CryptoProvider);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_hostile_handshakes_are_refused_counted_and_leak_nothing() {
    let control = Control::start(&["--tls-handshake-timeout", "1s"]);
    let app = servers::http_echo_named("orders").await;
    let orders_state = control.dir.path().join("orders");
    let orders = sidecar_process_with(
        &control.addr,
        &control.state.join("bootstrap.token"),
        "orders",
        app.addr,
        &orders_state,
        &["--tls-handshake-timeout", "1s"],
    );
    let mesh = write(
        control.dir.path(),
        "mesh.yaml",
        &format!(
            "{}apiVersion: lacewing.dev/v1alpha1\nkind: MeshTLS\nmetadata: {{name: orders}}\nspec: {{destination: orders, mode: STRICT}}\n",
            service("orders", "")
        ),
    );
    lacewing_tests::eventually("the orders sidecar is connected", || async {
        control.has_connected_sidecar()
    })
    .await;
    let (ok, out, err) = control.operator("apply", &["-f", mesh.to_str().unwrap(), "--wait"]);
    assert!(ok && out.contains("1/1 sidecars ACKed"), "{out}{err}");
    let inbound = orders.addr("inbound").to_string();
    let admin = orders.addr("admin");
    let sidecar_metrics = || lacewing_tests::client::metrics(admin);
    let outcome = |text: &str, outcome: &str| {
        metric_sum(
            text,
            "lacewing_downstream_tls_handshakes_total",
            &[("listener", "inbound"), ("outcome", outcome)],
        )
        .unwrap_or(0.0)
    };

    // The sidecar's STRICT inbound listener.
    let sidecar_fds = fds(orders.pid());
    let addr = inbound.clone();
    tokio::task::spawn_blocking(move || {
        hostile_handshakes(&addr);
        // Refused by the server whatever the client makes of it.
        let _ = oversized_chain_handshake(&addr);
    })
    .await
    .unwrap();
    lacewing_tests::eventually("the sidecar counted every refusal", || async {
        let text = sidecar_metrics().await;
        // Garbage and the oversized chain: malformed TLS; the half
        // ClientHello: the peer closed mid-handshake; the stall: the timeout.
        outcome(&text, "protocol") >= 2.0
            && outcome(&text, "io") >= 1.0
            && outcome(&text, "timeout") >= 1.0
    })
    .await;
    lacewing_tests::eventually("the sidecar holds no descriptor more", || async {
        fds(orders.pid()) <= sidecar_fds
    })
    .await;

    // The control plane's port.
    let control_fds = fds(control.pid());
    let addr = control.addr.clone();
    tokio::task::spawn_blocking(move || hostile_handshakes(&addr))
        .await
        .unwrap();
    let handshakes = "lacewing_control_tls_handshakes_total";
    control
        .until_counted(handshakes, &[("outcome", "protocol")], 1.0)
        .await;
    control
        .until_counted(handshakes, &[("outcome", "io")], 1.0)
        .await;
    control
        .until_counted(handshakes, &[("outcome", "timeout")], 1.0)
        .await;

    // A sidecar holding a wrong bootstrap token is refused and counted.
    let wrong = write(control.dir.path(), "wrong.token", "not-the-token\n");
    std::fs::copy(
        control.state.join("ca.pem"),
        control.dir.path().join("ca.pem"),
    )
    .unwrap();
    let intruder = sidecar_process_with(
        &control.addr,
        &wrong,
        "orders",
        app.addr,
        &control.dir.path().join("intruder"),
        &[],
    );
    control
        .until_counted(
            "lacewing_control_token_refusals_total",
            &[("role", "bootstrap"), ("reason", "wrong")],
            1.0,
        )
        .await;
    let (ok, out, _) = control.operator("status", &[]);
    assert!(ok && out.contains("1 sidecar(s)"), "{out}");
    drop(intruder);
    lacewing_tests::eventually("the control plane holds no descriptor more", || async {
        fds(control.pid()) <= control_fds
    })
    .await;

    // The control plane still serves the operator and the sidecar.
    let (ok, out, err) = control.operator("status", &[]);
    assert!(ok, "{err}");
    assert!(out.contains("ACK v1"), "{out}");
}
