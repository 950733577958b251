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
