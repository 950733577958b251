//! The access log: one JSON line per HTTP request and per TCP connection,
//! written to a file by the log's writer thread.

use lacewing_tests::access_log::LogFile;
use lacewing_tests::{client, proxy, servers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const CONFIG: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
access_log: { path: '{log}' }
listeners:
  - name: web
    address: 127.0.0.1:0
    routes: [{ name: all, cluster: web }]
  - { name: raw, address: 127.0.0.1:0, protocol: tcp, cluster: echo }
  - { name: nowhere, address: 127.0.0.1:0, protocol: tcp, cluster: dead }
clusters:
  - { name: web, endpoints: ['{web}'] }
  - { name: echo, endpoints: ['{echo}'] }
  - { name: dead, endpoints: ['{dead}'], connect_timeout: 1s }
";

/// The one line of `kind` from `listener`, once it is there.
async fn line(log: &LogFile, kind: &str, listener: &str) -> serde_json::Value {
    log.find(&format!("a {kind} line from {listener}"), |l| {
        l["kind"] == kind && l["listener"] == listener
    })
    .await
}

#[tokio::test]
async fn http_requests_and_tcp_connections_are_logged() {
    let log = LogFile::new("kinds");
    let web = servers::http_echo().await;
    let echo = servers::tcp_echo().await;
    let dead = servers::dead_addr();
    let handle = proxy::start(&proxy::fill(
        CONFIG,
        &[
            ("log", &log.path().display()),
            ("web", &web.addr),
            ("echo", &echo.addr),
            ("dead", &dead),
        ],
    ));

    let response = client::get(&proxy::url(&handle, "web", "/logged?x=1")).await;
    assert_eq!(response.status, 200);

    let mut stream = TcpStream::connect(proxy::listener_addr(&handle, "raw"))
        .await
        .unwrap();
    stream.write_all(b"ping!").await.unwrap();
    stream.shutdown().await.unwrap();
    let mut echoed = Vec::new();
    tokio::time::timeout(client::RAW_READ_TIMEOUT, stream.read_to_end(&mut echoed))
        .await
        .expect("the echo and the close come back")
        .unwrap();
    assert_eq!(echoed, b"ping!");

    let mut refused = TcpStream::connect(proxy::listener_addr(&handle, "nowhere"))
        .await
        .unwrap();
    let mut nothing = Vec::new();
    let _ = tokio::time::timeout(client::RAW_READ_TIMEOUT, refused.read_to_end(&mut nothing)).await;

    let http = line(&log, "http", "web").await;
    assert_eq!(http["path"], "/logged?x=1");
    assert_eq!(http["method"], "GET");
    assert_eq!(http["status"], 200);
    assert_eq!(http["route"], "all");
    assert_eq!(http["cluster"], "web");
    assert_eq!(http["upstream"], web.addr.to_string());
    assert_eq!(http["flag"], "-");

    let tcp = line(&log, "tcp", "raw").await;
    assert_eq!(tcp["cluster"], "echo");
    assert_eq!(tcp["upstream"], echo.addr.to_string());
    assert_eq!(tcp["bytes_received"], 5);
    assert_eq!(tcp["bytes_sent"], 5);
    assert_eq!(tcp["flag"], "-");
    assert!(tcp["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(
        tcp["downstream"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:")
    );

    let failed = line(&log, "tcp", "nowhere").await;
    assert_eq!(failed["flag"], "UF");
    assert_eq!(failed["upstream"], "-");
    assert_eq!(failed["bytes_received"], 0);
}
