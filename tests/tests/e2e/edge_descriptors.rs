//! Descriptor exhaustion with the real binary under a lowered open-files
//! limit: the proxy reports its limit, its accept loops back off and log a
//! bounded number of lines while descriptors are gone, and it serves again,
//! admin included, once clients let go, without a restart.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use lacewing_tests::{client, eventually, eventually_with, proxy, servers};
use tokio::net::TcpStream;

/// The open-files limit (soft and hard) the proxy runs under.
const LIMIT: u64 = 64;
/// Idle client connections opened: more than the proxy has descriptors for.
const CLIENTS: usize = 96;
/// How long the proxy is left out of descriptors (not a bound on anything).
const STARVED_FOR: Duration = Duration::from_secs(3);

fn log_lines(path: &Path, needle: &str) -> usize {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|line| line.contains(needle))
        .count()
}

async fn served(addr: SocketAddr) -> bool {
    let Ok(Ok(mut stream)) =
        tokio::time::timeout(Duration::from_secs(2), TcpStream::connect(addr)).await
    else {
        return false;
    };
    let exchange = tokio::time::timeout(Duration::from_secs(2), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: fd.example\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut out = Vec::new();
        stream.read_to_end(&mut out).await.ok()?;
        Some(out)
    })
    .await;
    matches!(exchange, Ok(Some(out)) if out.starts_with(b"HTTP/1.1 200"))
}

#[tokio::test]
async fn out_of_descriptors_the_proxy_backs_off_and_recovers_by_itself() {
    if std::process::Command::new("prlimit")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("this test needs util-linux `prlimit` to start the proxy under a lowered limit");
    }
    let upstream = servers::http_echo().await;
    let dir = std::env::temp_dir().join(format!("lacewing-nofile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let (port, admin_port) = (
        lacewing_tests::process::free_port(),
        lacewing_tests::process::free_port(),
    );
    let config = dir.join("proxy.yaml");
    std::fs::write(
        &config,
        proxy::fill(
            "admin: { address: '127.0.0.1:{admin}' }
workers: 1
drain_timeout: 1s
listeners:
  - name: main
    address: 127.0.0.1:{port}
    routes:
      - { name: default, cluster: upstream }
clusters:
  - { name: upstream, endpoints: ['{upstream}'] }
",
            &[
                ("port", &port),
                ("admin", &admin_port),
                ("upstream", &upstream.addr),
            ],
        ),
    )
    .expect("write config");
    let stderr_path = dir.join("stderr.log");
    let stderr = std::fs::File::create(&stderr_path).expect("stderr file");
    let mut child = tokio::process::Command::new("prlimit")
        .arg(format!("--nofile={LIMIT}:{LIMIT}"))
        .arg(lacewing_tests::process::lacewing_binary())
        .args(["proxy", "--config"])
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("start lacewing under prlimit");
    let listener = SocketAddr::from(([127, 0, 0, 1], port));
    let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
    eventually("the proxy serves", || served(listener)).await;

    // The limit in force is reported, as a metric and at start in the log.
    let metrics = client::metrics(admin).await;
    assert_eq!(
        client::metric_value(&metrics, "lacewing_process_open_files_limit"),
        Some(LIMIT as f64)
    );
    assert_eq!(log_lines(&stderr_path, "open files limit"), 1);

    // Idle clients take every descriptor the proxy has left.
    let mut clients = Vec::with_capacity(CLIENTS);
    for _ in 0..CLIENTS {
        clients.push(TcpStream::connect(listener).await.expect("connect"));
    }
    eventually("the worker's accepts fail", || async {
        log_lines(&stderr_path, "accept failing") > 0
    })
    .await;
    // The admin endpoint is out of descriptors too: its connection waits in
    // the backlog while its accept loop backs off.
    let stuck_admin = TcpStream::connect(admin).await.expect("connect to admin");
    let starved_at = Instant::now();
    tokio::time::sleep(STARVED_FOR).await;
    let starved = starved_at.elapsed() + Duration::from_secs(1);
    let failing_lines = log_lines(&stderr_path, "accept failing");
    // One line per loop at first, then at most one per 5 s interval each,
    // where a loop retrying every 10 ms without backoff would log hundreds.
    let bound = 2 * (1 + starved.as_secs() as usize / 5 + 1);
    assert!(
        failing_lines <= bound,
        "{failing_lines} accept-failure lines in {starved:?} (at most {bound}):\n{}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );

    // The clients let go: service resumes by itself, admin included.
    drop(clients);
    drop(stuck_admin);
    eventually_with(
        "the proxy serves again",
        60,
        Duration::from_millis(500),
        || served(listener),
    )
    .await;
    let metrics = client::metrics(admin).await;
    let failures = client::metric_sum(
        &metrics,
        "lacewing_accept_failures_total",
        &[("listener", "main")],
    )
    .unwrap_or(0.0);
    assert!(failures >= 1.0, "accept failures are counted: {metrics}");
    assert!(log_lines(&stderr_path, "accepting again") >= 1);

    let _ = child.start_kill();
    let _ = child.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}
