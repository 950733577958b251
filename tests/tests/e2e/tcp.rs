//! Raw TCP listeners: bytes go through unchanged in both directions, and a
//! close on one side reaches the other.

use lacewing_tests::{client, proxy, servers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TCP: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
listeners:
  - { name: raw, address: 127.0.0.1:0, protocol: tcp, cluster: echo }
clusters:
  - { name: echo, endpoints: ['{echo}'] }
";

#[tokio::test]
async fn tcp_listener_echoes_bytes_through() {
    let echo = servers::tcp_echo().await;
    let handle = proxy::start(&proxy::fill(TCP, &[("echo", &echo.addr)]));
    let mut stream = TcpStream::connect(proxy::listener_addr(&handle, "raw"))
        .await
        .unwrap();

    for message in [&b"hello tcp"[..], &[0u8, 255, 13, 10, 0][..]] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(client::RAW_READ_TIMEOUT, stream.read_exact(&mut echoed))
            .await
            .expect("echo arrives")
            .unwrap();
        assert_eq!(echoed, message);
    }
    assert_eq!(echo.accepted(), 1);
}

#[tokio::test]
async fn tcp_listener_carries_a_megabyte_and_propagates_close() {
    let echo = servers::tcp_echo().await;
    let handle = proxy::start(&proxy::fill(TCP, &[("echo", &echo.addr)]));
    let stream = TcpStream::connect(proxy::listener_addr(&handle, "raw"))
        .await
        .unwrap();
    let (mut reader, mut writer) = stream.into_split();
    const LEN: usize = 1 << 20;

    let send = tokio::spawn(async move {
        let chunk: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..LEN / chunk.len() {
            writer.write_all(&chunk).await.unwrap();
        }
        // Half-close: the echo server sees EOF and closes, which must come back to us.
        writer.shutdown().await.unwrap();
    });
    let mut received = Vec::with_capacity(LEN);
    tokio::time::timeout(
        std::time::Duration::from_secs(30),
        reader.read_to_end(&mut received),
    )
    .await
    .expect("the proxy closes the downstream side after the upstream closed")
    .unwrap();
    send.await.unwrap();

    assert_eq!(received.len(), LEN);
    assert!(
        received
            .iter()
            .enumerate()
            .all(|(i, b)| *b == ((i % 4096) as u32 % 251) as u8),
        "bytes arrive unchanged and in order"
    );
}

/// The server side of a TLS pair: tcp listener `inbound` (mutual TLS in
/// `{mode}`, plugin `tcp` reporting identity) to the echo server.
const TLS_INBOUND: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
{files}listeners:
  - name: inbound
    address: 127.0.0.1:0
    protocol: tcp
    cluster: echo
    filters: [tcp]
    tls: { mode: {mode} }
clusters:
  - { name: echo, endpoints: ['{echo}'] }
plugins:
  - { name: tcp, module: {module} }
";

/// The client side: plaintext tcp listener `outbound` to cluster `db`, over
/// mutual TLS expecting `{peer}`.
const TLS_OUTBOUND: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
{files}listeners:
  - { name: outbound, address: 127.0.0.1:0, protocol: tcp, cluster: db, filters: [tcp] }
clusters:
  - name: db
    endpoints: ['{db}']
    tls: { peer: '{peer}' }
plugins:
  - { name: tcp, module: {module} }
";

/// Writes `message` on `stream` and reads until `until` has come back.
pub(crate) async fn exchange<S>(stream: &mut S, message: &[u8], until: &[u8]) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream.write_all(message).await.unwrap();
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    while !super::tls_files::contains(&received, until) {
        let n = tokio::time::timeout(client::RAW_READ_TIMEOUT, stream.read(&mut buf))
            .await
            .expect("the echo arrives")
            .unwrap();
        assert!(n > 0, "closed before the echo: {received:?}");
        received.extend_from_slice(&buf[..n]);
    }
    String::from_utf8(received).unwrap()
}

/// TCP through two proxies over mutual TLS: the bytes between them are TLS
/// records, the server side's plugin sees the caller's SPIFFE ID, plaintext
/// to the STRICT listener is refused and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_through_two_proxies_over_mutual_tls() {
    use super::tls_files::{self, Ca, Files, spiffe};
    use lacewing_tests::client::metric_value;
    use lacewing_tests::wasm;

    let ca = Ca::new("test root");
    let db_files = Files::new(&ca.leaf("db"), &ca);
    let app_files = Files::new(&ca.leaf("app"), &ca);
    let echo = servers::tcp_echo().await;
    let module = wasm::yaml_path(&wasm::module("tcp-filter"));
    let db = proxy::start(&proxy::fill(
        TLS_INBOUND,
        &[
            ("files", &db_files.yaml()),
            ("mode", &"strict"),
            ("echo", &echo.addr),
            ("module", &module),
        ],
    ));
    let inbound = proxy::listener_addr(&db, "inbound");
    let (tapped, captured) = tls_files::tap(inbound).await;
    let app = proxy::start(&proxy::fill(
        TLS_OUTBOUND,
        &[
            ("files", &app_files.yaml()),
            ("db", &tapped),
            ("peer", &spiffe("db")),
            ("module", &module),
        ],
    ));
    let mut stream = TcpStream::connect(proxy::listener_addr(&app, "outbound"))
        .await
        .unwrap();

    let echoed = exchange(&mut stream, b"secret bytes\n", b"secret bytes\n").await;
    assert_eq!(echoed, "secret bytes\n");
    let report = exchange(&mut stream, b"IDENTITY?\n", b"IDENTITY?\n").await;
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "outbound: source.principal=- connection.mtls=false connection.tls_version=- \
             connection.uri_san_peer_certificate=- connection.uri_san_local_certificate=- \
             upstream.tls_version=TLSv1.3 upstream.uri_san_peer_certificate={}",
            spiffe("db")
        ),
        "the client side: plaintext downstream, mutual TLS upstream"
    );
    assert_eq!(
        lines[1],
        format!(
            "inbound: source.principal={} connection.mtls=true connection.tls_version=TLSv1.3 \
             connection.uri_san_peer_certificate={} connection.uri_san_local_certificate={} \
             upstream.tls_version=- upstream.uri_san_peer_certificate=-",
            spiffe("app"),
            spiffe("app"),
            spiffe("db")
        )
    );
    {
        let both = captured.lock().unwrap();
        assert_eq!(&both.0[..2], &[0x16, 0x03], "a TLS handshake record first");
        assert_eq!(&both.1[..2], &[0x16, 0x03]);
        assert!(!tls_files::contains(&both.0, b"secret bytes"));
        assert!(!tls_files::contains(&both.1, b"secret bytes"));
    }

    // Plaintext straight to the STRICT listener: closed, nothing echoed, counted.
    let mut plain = TcpStream::connect(inbound).await.unwrap();
    let _ = plain.write_all(b"plaintext\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(client::RAW_READ_TIMEOUT, plain.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "{answer:?}");
    let refused = "lacewing_downstream_tls_handshakes_total{listener=\"inbound\",outcome=\"plaintext_refused\"}";
    let ok = "lacewing_downstream_tls_handshakes_total{listener=\"inbound\",outcome=\"ok\"}";
    lacewing_tests::eventually("the plaintext refusal is counted", || async {
        let metrics = client::metrics(proxy::admin_addr(&db)).await;
        metric_value(&metrics, refused) == Some(1.0)
    })
    .await;
    let metrics = client::metrics(proxy::admin_addr(&db)).await;
    assert_eq!(metric_value(&metrics, ok), Some(1.0));
    let metrics = client::metrics(proxy::admin_addr(&app)).await;
    assert_eq!(
        metric_value(
            &metrics,
            "lacewing_upstream_tls_handshakes_total{cluster=\"db\",outcome=\"ok\"}"
        ),
        Some(1.0)
    );
}

/// A PERMISSIVE tcp listener serves TLS and plaintext; a cluster expecting
/// another SPIFFE ID refuses the server, so nothing reaches the echo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_tcp_serves_both_and_a_wrong_peer_is_refused() {
    use super::tls_files::{self, Ca, Files, spiffe};
    use lacewing_tests::client::metric_value;
    use lacewing_tests::wasm;

    let ca = Ca::new("test root");
    let db_files = Files::new(&ca.leaf("db"), &ca);
    let echo = servers::tcp_echo().await;
    let module = wasm::yaml_path(&wasm::module("tcp-filter"));
    let db = proxy::start(&proxy::fill(
        TLS_INBOUND,
        &[
            ("files", &db_files.yaml()),
            ("mode", &"permissive"),
            ("echo", &echo.addr),
            ("module", &module),
        ],
    ));
    let inbound = proxy::listener_addr(&db, "inbound");

    let mut plain = TcpStream::connect(inbound).await.unwrap();
    let report = exchange(&mut plain, b"IDENTITY?\n", b"IDENTITY?\n").await;
    assert!(
        report.starts_with("inbound: source.principal=- connection.mtls=false"),
        "{report}"
    );
    let client = ca.leaf("app").identity();
    let mut tls = tls_files::connect(inbound, &client, &ca.trust(), &spiffe("db"), &[])
        .await
        .unwrap();
    let report = exchange(&mut tls, b"IDENTITY?\n", b"IDENTITY?\n").await;
    assert!(
        report.starts_with(&format!("inbound: source.principal={}", spiffe("app"))),
        "{report}"
    );

    let app_files = Files::new(&ca.leaf("app"), &ca);
    let app = proxy::start(&proxy::fill(
        TLS_OUTBOUND,
        &[
            ("files", &app_files.yaml()),
            ("db", &inbound),
            ("peer", &spiffe("not-db")),
            ("module", &module),
        ],
    ));
    let mut stream = TcpStream::connect(proxy::listener_addr(&app, "outbound"))
        .await
        .unwrap();
    let _ = stream.write_all(b"hello\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(client::RAW_READ_TIMEOUT, stream.read_to_end(&mut answer)).await;
    assert!(answer.is_empty(), "{answer:?}");
    let metrics = client::metrics(proxy::admin_addr(&app)).await;
    assert!(
        metric_value(
            &metrics,
            "lacewing_upstream_tls_handshakes_total{cluster=\"db\",outcome=\"wrong_peer_identity\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    assert_eq!(
        echo.accepted(),
        2,
        "only the two direct connections reached the echo"
    );
}
