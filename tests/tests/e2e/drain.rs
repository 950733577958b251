//! Graceful drain (what SIGTERM does): requests in flight finish, new
//! connections are refused, `/ready` turns 503.

use std::time::Duration;

use http::StatusCode;
use lacewing_tests::client::{self, ReusingClient};
use lacewing_tests::{eventually, proxy, servers};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

const IN_FLIGHT: usize = 20;

/// `IN_FLIGHT` concurrent HTTP/1.1 GETs of `url`, each on its own connection.
fn spawn_slow_gets(url: &str) -> Vec<JoinHandle<client::Response>> {
    (0..IN_FLIGHT)
        .map(|_| {
            let url = url.to_string();
            tokio::spawn(async move { client::get(&url).await })
        })
        .collect()
}

/// Every in-flight `kind` (request or stream) completes with 200.
async fn assert_all_ok(requests: Vec<JoinHandle<client::Response>>, kind: &str) {
    for (i, request) in requests.into_iter().enumerate() {
        let response = tokio::time::timeout(Duration::from_secs(30), request)
            .await
            .unwrap_or_else(|_| panic!("in-flight {kind} finishes"))
            .expect("request task did not panic");
        assert_eq!(response.status, StatusCode::OK, "in-flight {kind} {i}");
    }
}

#[tokio::test]
async fn drain_lets_in_flight_requests_finish_and_refuses_new_connections() {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::fill(
        "admin: { address: 127.0.0.1:0 }
workers: 2
drain_timeout: 30s
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - { name: default, cluster: upstream }
clusters:
  - { name: upstream, endpoints: ['{upstream}'] }
",
        &[("upstream", &upstream.addr)],
    ));
    let listener = proxy::listener_addr(&handle, "main");
    let admin = proxy::admin_addr(&handle);

    let url = proxy::url(&handle, "main", "/delay/1500");
    let requests = spawn_slow_gets(&url);
    // Every request has reached the upstream before the drain.
    eventually("all requests are in flight at the upstream", || async {
        upstream.requests() >= IN_FLIGHT
    })
    .await;

    handle.drain();

    eventually("new connections are refused once draining", || async move {
        TcpStream::connect(listener).await.is_err()
    })
    .await;
    assert_all_ok(requests, "request").await;
    let ready = client::get(&format!("http://{admin}/ready")).await;
    assert_eq!(
        ready.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "/ready while draining"
    );

    let joined = tokio::task::spawn_blocking(move || handle.join());
    tokio::time::timeout(Duration::from_secs(60), joined)
        .await
        .expect("workers exit within the drain timeout")
        .expect("joining the workers did not panic");
}

#[tokio::test]
async fn drain_finishes_in_flight_h2_streams() {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::fill(
        "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 30s
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - { name: default, cluster: upstream }
clusters:
  - { name: upstream, endpoints: ['{upstream}'], protocol: h2 }
",
        &[("upstream", &upstream.addr)],
    ));
    let listener = proxy::listener_addr(&handle, "main");
    let client = ReusingClient::h2();
    let warm = client.get(&proxy::url(&handle, "main", "/warm")).await;
    assert_eq!(warm.status, StatusCode::OK);

    let url = proxy::url(&handle, "main", "/delay/1500");
    let requests: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let (client, url) = (client.clone(), url.clone());
            tokio::spawn(async move { client.get(&url).await })
        })
        .collect();
    eventually("every stream has reached the upstream", || async {
        upstream.requests() > IN_FLIGHT
    })
    .await;

    handle.drain();

    eventually("new connections are refused once draining", || async move {
        TcpStream::connect(listener).await.is_err()
    })
    .await;
    assert_all_ok(requests, "stream").await;
}

/// The real binary, a real SIGTERM: requests in flight all complete, then the
/// process exits 0 on its own.
#[tokio::test]
async fn sigterm_to_the_binary_drains_and_exits_cleanly() {
    let upstream = servers::http_echo().await;
    let dir = std::env::temp_dir().join(format!("lacewing-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    // A free port for the proxy: bind, read, release.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        proxy::fill(
            "admin: { address: null }
workers: 2
drain_timeout: 30s
listeners:
  - name: main
    address: 127.0.0.1:{port}
    routes:
      - { name: default, cluster: upstream }
clusters:
  - { name: upstream, endpoints: ['{upstream}'] }
",
            &[("port", &port), ("upstream", &upstream.addr)],
        ),
    )
    .expect("write config");
    let binary = lacewing_tests::process::lacewing_binary();
    let mut child = tokio::process::Command::new(binary)
        .args(["proxy", "--config"])
        .arg(&config)
        .kill_on_drop(true)
        .spawn()
        .expect("start lacewing");
    let pid = child.id().expect("child pid");
    let url = format!("http://127.0.0.1:{port}/delay/1500");
    eventually("the proxy accepts connections", || async move {
        TcpStream::connect(("127.0.0.1", port)).await.is_ok()
    })
    .await;

    let requests = spawn_slow_gets(&url);
    eventually("all requests are in flight at the upstream", || async {
        upstream.requests() >= IN_FLIGHT
    })
    .await;

    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(killed.success(), "SIGTERM delivered");

    assert_all_ok(requests, "request").await;
    let status = tokio::time::timeout(Duration::from_secs(60), child.wait())
        .await
        .expect("the process exits after draining")
        .expect("wait for lacewing");
    assert!(status.success(), "clean exit after SIGTERM: {status}");
    let _ = std::fs::remove_dir_all(&dir);
}
