//! Real TLS 1.3 handshakes on loopback between configurations built from
//! certificates the mesh CA issued: who is accepted, who is refused, and
//! what each side learns about the other; then the [`TlsStream`] that
//! carries a connection past its handshake: records split, batched and
//! late, backpressure, clean and unclean ends, garbage on the wire.
//!
//! [`TlsStream`]: lacewing_tls::TlsStream

use std::sync::Arc;

use std::io::Write as _;

use lacewing_tls::{
    ClientTlsStream, ConnectionTls, Identity, MeshCa, ServerTlsStream, SpiffeId, TrustBundle,
    WorkloadKey, client_config, server_config, server_name_for,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn id(service: &str) -> SpiffeId {
    SpiffeId::new("mesh.local", "default", service).unwrap()
}

fn issue(ca: &MeshCa, who: &SpiffeId) -> Identity {
    let key = WorkloadKey::generate().unwrap();
    let issued = ca.sign(&key.csr_pem(who).unwrap(), who).unwrap();
    key.identity(&issued.cert_pem).unwrap()
}

/// A server on 127.0.0.1:0 that completes one handshake, echoes one line,
/// and reports what it learned (or why the handshake failed).
async fn server(
    identity: &Identity,
    trust: &TrustBundle,
) -> (
    std::net::SocketAddr,
    tokio::task::JoinHandle<Result<ConnectionTls, String>>,
) {
    let acceptor = TlsAcceptor::from(server_config(identity, trust).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let local_leaf = identity.leaf().clone();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
        let (_, conn) = tls.get_ref();
        let info = ConnectionTls::from_state(conn, conn.server_name(), Some(&local_leaf));
        let mut buf = [0u8; 5];
        tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
        tls.write_all(&buf).await.map_err(|e| e.to_string())?;
        tls.shutdown().await.ok();
        Ok(info)
    });
    (addr, task)
}

async fn connect(
    addr: std::net::SocketAddr,
    identity: &Identity,
    trust: &TrustBundle,
    expect: &SpiffeId,
) -> Result<ConnectionTls, String> {
    let connector = TlsConnector::from(client_config(identity, trust, expect).unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(server_name_for(expect), tcp)
        .await
        .map_err(|e| e.to_string())?;
    tls.write_all(b"hello").await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    assert_eq!(&buf, b"hello");
    let (_, conn) = tls.get_ref();
    Ok(ConnectionTls::from_state(conn, None, Some(identity.leaf())))
}

#[tokio::test]
async fn two_workloads_agree_on_aes_128_gcm() {
    let (ca, _) = MeshCa::generate("mesh.local").unwrap();
    let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
    let orders = issue(&ca, &id("orders"));
    let frontend = issue(&ca, &id("frontend"));
    let (addr, accepted) = server(&orders, &trust).await;
    let connector = TlsConnector::from(client_config(&frontend, &trust, &id("orders")).unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let mut tls = connector
        .connect(server_name_for(&id("orders")), tcp)
        .await
        .unwrap();
    tls.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tls.read_exact(&mut buf).await.unwrap();
    let suite = tls.get_ref().1.negotiated_cipher_suite().unwrap();
    assert_eq!(
        suite.suite(),
        tokio_rustls::rustls::CipherSuite::TLS13_AES_128_GCM_SHA256
    );
    accepted.await.unwrap().unwrap();
}

#[tokio::test]
async fn mutual_tls_between_two_workloads_of_one_mesh() {
    let (ca, _) = MeshCa::generate("mesh.local").unwrap();
    let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
    let orders = issue(&ca, &id("orders"));
    let frontend = issue(&ca, &id("frontend"));

    let (addr, accepted) = server(&orders, &trust).await;
    let client_side = connect(addr, &frontend, &trust, &id("orders"))
        .await
        .unwrap();
    let server_side = accepted.await.unwrap().unwrap();

    assert_eq!(client_side.version, "TLSv1.3");
    assert_eq!(client_side.alpn.as_deref(), Some("h2"));
    let server_peer = client_side.peer.unwrap();
    assert_eq!(server_peer.spiffe, Some(id("orders")));

    assert_eq!(server_side.version, "TLSv1.3");
    assert_eq!(
        server_side.requested_server_name.as_deref(),
        Some("orders.default.mesh.local")
    );
    let client_peer = server_side.peer.unwrap();
    assert_eq!(
        client_peer.uri_sans,
        vec!["spiffe://mesh.local/ns/default/sa/frontend".to_string()]
    );
    assert_eq!(client_peer.sha256_digest.len(), 64);
    assert_eq!(
        server_side.local_uri_sans,
        vec!["spiffe://mesh.local/ns/default/sa/orders".to_string()]
    );
}

#[tokio::test]
async fn a_server_with_another_identity_is_refused_by_the_client() {
    let (ca, _) = MeshCa::generate("mesh.local").unwrap();
    let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
    let impostor = issue(&ca, &id("payments"));
    let frontend = issue(&ca, &id("frontend"));

    let (addr, accepted) = server(&impostor, &trust).await;
    let error = connect(addr, &frontend, &trust, &id("orders"))
        .await
        .unwrap_err();
    assert!(
        error.contains(r#"IdentityMismatch { expected: "spiffe://mesh.local/ns/default/sa/orders", found: "spiffe://mesh.local/ns/default/sa/payments" }"#),
        "{error}"
    );
    assert!(accepted.await.unwrap().is_err());
}

#[tokio::test]
async fn a_client_certified_by_another_ca_is_refused_by_the_server() {
    let (ca, _) = MeshCa::generate("mesh.local").unwrap();
    let (foreign_ca, _) = MeshCa::generate("mesh.local").unwrap();
    let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
    let orders = issue(&ca, &id("orders"));
    // Claims a mesh identity, but its chain leads to a root the mesh does not trust.
    let stranger = issue(&foreign_ca, &id("frontend"));

    let (addr, accepted) = server(&orders, &trust).await;
    // TLS 1.3: the client's handshake completes before the server judges its
    // certificate, so the refusal shows up on the server and on the first read.
    let _ = connect(addr, &stranger, &trust, &id("orders")).await;
    let error = accepted.await.unwrap().unwrap_err();
    // Both roots are named alike; the signature does not verify.
    assert!(error.starts_with("invalid peer certificate"), "{error}");
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused_by_the_server() {
    let (ca, _) = MeshCa::generate("mesh.local").unwrap();
    let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
    // A server certificate by DNS name, so that a plain WebPKI client without
    // a certificate of its own completes its side of the handshake.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["orders.test".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let server_identity = Identity::from_pem(&cert.pem(), &key.serialize_pem()).unwrap();
    let (addr, accepted) = server(&server_identity, &trust).await;

    let mut roots = lacewing_tls::rustls::RootCertStore::empty();
    roots.add(cert.der().clone()).unwrap();
    let config = lacewing_tls::rustls::ClientConfig::builder_with_provider(Arc::new(
        lacewing_tls::rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&lacewing_tls::rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = lacewing_tls::rustls::pki_types::ServerName::try_from("orders.test").unwrap();
    let _ = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await;
    let error = accepted.await.unwrap().unwrap_err();
    assert!(error.contains("peer sent no certificates"), "{error}");
}

/// A client reading through [`ClientTlsStream`] gets every byte the server sends,
/// whether records arrive split across TCP segments, several at once, or
/// after a pause, and sees the end of the stream at close_notify.
#[tokio::test]
async fn tls_stream_reads_split_batched_and_late_records_then_the_end() {
    let (mut stream, server) = stream_pair().await;
    // The server taken apart, to write records on its socket by hand.
    let (mut tcp, mut session) = server.into_inner();
    let server = tokio::spawn(async move {
        let mut wire = Vec::new();
        // Three records, the first split in three TCP writes with pauses.
        session.writer().write_all(b"first record;").unwrap();
        session.write_tls(&mut wire).unwrap();
        for piece in [&wire[..3], &wire[3..9], &wire[9..]] {
            tcp.write_all(piece).await.unwrap();
            tcp.flush().await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        // Two records in one write.
        wire.clear();
        session.writer().write_all(b"second;").unwrap();
        session.write_tls(&mut wire).unwrap();
        session.writer().write_all(b"third;").unwrap();
        session.write_tls(&mut wire).unwrap();
        tcp.write_all(&wire).await.unwrap();
        // A late record, then close_notify.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        wire.clear();
        session.writer().write_all(b"late").unwrap();
        session.send_close_notify();
        while session.wants_write() {
            session.write_tls(&mut wire).unwrap();
        }
        tcp.write_all(&wire).await.unwrap();
        // Keep the socket open: the end must come from close_notify.
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
    });
    // Four bytes at a time, so decrypted bytes wait in the session while
    // the socket is empty: those reads must not wait for the socket.
    let read_all = async {
        let mut got = Vec::new();
        let mut buf = [0u8; 4];
        loop {
            match stream.read(&mut buf).await.unwrap() {
                0 => return got,
                n => got.extend_from_slice(&buf[..n]),
            }
        }
    };
    let got = tokio::time::timeout(std::time::Duration::from_secs(3), read_all)
        .await
        .expect("the end of the stream at close_notify, before the socket closes");
    assert_eq!(got, b"first record;second;third;late");
    server.abort();
}

/// A connected pair of [`TlsStream`](lacewing_tls::TlsStream)s: frontend's
/// client to orders' server.
async fn stream_pair() -> (ClientTlsStream, ServerTlsStream) {
    let (ca, _) = MeshCa::generate("mesh.local").unwrap();
    let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
    let orders = issue(&ca, &id("orders"));
    let frontend = issue(&ca, &id("frontend"));
    let acceptor = TlsAcceptor::from(server_config(&orders, &trust).unwrap());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        ServerTlsStream::from_server(acceptor.accept(tcp).await.unwrap())
    });
    let connector = TlsConnector::from(client_config(&frontend, &trust, &id("orders")).unwrap());
    let tcp = TcpStream::connect(addr).await.unwrap();
    let client = connector
        .connect(server_name_for(&id("orders")), tcp)
        .await
        .unwrap();
    (ClientTlsStream::from_client(client), server.await.unwrap())
}

/// Four MiB each way at once, far past the session's 64 KiB queue and the
/// socket buffers, arrive intact: writes wait for the socket and resume,
/// and neither side stalls while the other is also writing.
#[tokio::test]
async fn tls_streams_carry_megabytes_both_ways_with_backpressure() {
    let (client, server) = stream_pair().await;
    let payload = |seed: u8| -> Vec<u8> {
        (0..4 * 1024 * 1024u32)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    };
    let exchange = |stream: Box<dyn Duplex>, send: Vec<u8>| async move {
        let (mut reader, mut writer) = tokio::io::split(stream);
        let write = async move {
            // Vectored writes of two slices, as hyper sends head and body.
            let mut sent = 0;
            while sent < send.len() {
                let end = (sent + 100_000).min(send.len());
                let middle = sent + (end - sent) / 3;
                let slices = [
                    std::io::IoSlice::new(&send[sent..middle]),
                    std::io::IoSlice::new(&send[middle..end]),
                ];
                sent += writer.write_vectored(&slices).await.unwrap();
            }
            writer.flush().await.unwrap();
            writer.shutdown().await.unwrap();
        };
        let read = async move {
            let mut got = Vec::new();
            reader.read_to_end(&mut got).await.unwrap();
            got
        };
        tokio::join!(write, read).1
    };
    let (to_server, to_client) = (payload(1), payload(2));
    let (got_by_client, got_by_server) =
        tokio::time::timeout(std::time::Duration::from_secs(30), async {
            tokio::join!(
                exchange(Box::new(client), to_server.clone()),
                exchange(Box::new(server), to_client.clone()),
            )
        })
        .await
        .expect("both directions complete");
    assert!(got_by_server == to_server, "the server got other bytes");
    assert!(got_by_client == to_client, "the client got other bytes");
}

trait Duplex: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Duplex for T {}

/// Shutdown sends close_notify: the peer reads the end of the stream
/// cleanly, and can still answer on its own side.
#[tokio::test]
async fn shutdown_is_a_clean_end_for_the_peer_which_can_still_answer() {
    let (mut client, mut server) = stream_pair().await;
    client.write_all(b"last words").await.unwrap();
    client.shutdown().await.unwrap();
    let mut got = Vec::new();
    server.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"last words");
    server.write_all(b"reply").await.unwrap();
    server.shutdown().await.unwrap();
    let mut reply = Vec::new();
    client.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"reply");
}

/// A peer whose socket closes without close_notify ends the stream with an
/// `UnexpectedEof` error, after every byte it did send; garbage on the wire
/// is an `InvalidData` error, not a hang or a panic.
#[tokio::test]
async fn an_unclean_close_and_garbage_records_are_errors() {
    let (mut client, server) = stream_pair().await;
    // The server taken apart, to write raw bytes on its socket.
    let (mut tcp, mut session) = server.into_inner();
    let mut wire = Vec::new();
    session.writer().write_all(b"partial").unwrap();
    session.write_tls(&mut wire).unwrap();
    tcp.write_all(&wire).await.unwrap();
    drop(tcp);
    let mut got = [0u8; 7];
    client.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"partial");
    let error = client.read(&mut [0u8; 8]).await.unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::UnexpectedEof, "{error}");

    let (mut client, server) = stream_pair().await;
    let (mut tcp, _session) = server.into_inner();
    tcp.write_all(&[0x17, 0x03, 0x03, 0x00, 0x20])
        .await
        .unwrap();
    tcp.write_all(&[0xAB; 32]).await.unwrap();
    let error = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        client.read(&mut [0u8; 8]),
    )
    .await
    .expect("an answer, not a hang")
    .unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidData, "{error}");
}
