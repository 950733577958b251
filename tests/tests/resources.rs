//! Process-wide resource bounds of the in-process proxy: memory stays flat
//! while 200 MB bodies stream through, and bad connections leak no file
//! descriptors.
//!
//! These measure the whole process, so they live in their own test binary
//! and take turns through [`EXCLUSIVE`], away from unrelated tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::{Request, StatusCode};
use http_body_util::BodyExt;
use lacewing_tests::body::GeneratedBody;
use lacewing_tests::client::{self, raw_exchange};
use lacewing_tests::process::{open_fds, rss_bytes};
use lacewing_tests::{eventually, proxy, servers};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

/// One measuring test at a time.
static EXCLUSIVE: Mutex<()> = Mutex::const_new(());

const BODY_LEN: u64 = 200 * 1024 * 1024;
const MAX_RSS_GROWTH: u64 = 64 * 1024 * 1024;
/// Hang guard for a 200 MB transfer in a debug build on a busy machine.
const TRANSFER_LIMIT: Duration = Duration::from_secs(300);

/// Samples RSS every 20 ms until dropped; remembers the peak.
struct RssSampler {
    peak: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RssSampler {
    fn start() -> Self {
        let peak = Arc::new(AtomicU64::new(rss_bytes()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (peak, stop) = (peak.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    peak.fetch_max(rss_bytes(), Ordering::Relaxed);
                    std::thread::sleep(Duration::from_millis(20));
                }
            })
        };
        Self {
            peak,
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.peak.load(Ordering::Relaxed).max(rss_bytes())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_200mb_upload_and_download_keep_memory_flat() {
    let _turn = EXCLUSIVE.lock().await;
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::simple_yaml(&[upstream.addr], "http1"));
    // Warm up: pools, buffers and lazily built state exist before the baseline.
    for _ in 0..3 {
        let warm = client::get(&proxy::url(&handle, "main", "/bytes/1048576")).await;
        assert_eq!(warm.status, StatusCode::OK);
    }
    let baseline = rss_bytes();
    let sampler = RssSampler::start();

    let upload = Request::post(proxy::url(&handle, "main", "/upload"))
        .body(GeneratedBody::chunked(BODY_LEN))
        .unwrap();
    let uploaded = client::send_with_timeout(upload, TRANSFER_LIMIT).await;
    assert_eq!(uploaded.status, StatusCode::OK, "{}", uploaded.text());
    assert_eq!(
        uploaded.json()["body_len"],
        BODY_LEN,
        "every uploaded byte arrives"
    );

    let download = Request::get(proxy::url(&handle, "main", &format!("/bytes/{BODY_LEN}")))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = client::send_streaming(download).await;
    assert_eq!(response.status(), StatusCode::OK);
    let received = tokio::time::timeout(TRANSFER_LIMIT, count_body(response.into_body()))
        .await
        .expect("the download finishes");
    assert_eq!(received, BODY_LEN, "every downloaded byte arrives");

    let peak = sampler.finish();
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "RSS baseline {} KiB, peak {} KiB",
        baseline >> 10,
        peak >> 10
    );
    assert!(
        growth < MAX_RSS_GROWTH,
        "RSS grew by {} MiB (baseline {} MiB, peak {} MiB) while 2 × 200 MiB streamed",
        growth >> 20,
        baseline >> 20,
        peak >> 20
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_200mb_over_h2_both_sides_keeps_memory_flat() {
    let _turn = EXCLUSIVE.lock().await;
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::simple_yaml(&[upstream.addr], "h2"));
    for _ in 0..3 {
        let warm = client::get_h2(&proxy::url(&handle, "main", "/bytes/1048576")).await;
        assert_eq!(warm.status, StatusCode::OK);
    }
    let baseline = rss_bytes();
    let sampler = RssSampler::start();

    let upload = Request::post(proxy::url(&handle, "main", "/upload"))
        .body(GeneratedBody::chunked(BODY_LEN))
        .unwrap();
    let uploaded = client::send_h2(upload).await;
    assert_eq!(uploaded.status, StatusCode::OK, "{}", uploaded.text());
    assert_eq!(
        uploaded.json()["body_len"],
        BODY_LEN,
        "every uploaded byte arrives"
    );

    let download = Request::get(proxy::url(&handle, "main", &format!("/bytes/{BODY_LEN}")))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = client::send_streaming_h2(download).await;
    assert_eq!(response.status(), StatusCode::OK);
    let received = tokio::time::timeout(TRANSFER_LIMIT, count_body(response.into_body()))
        .await
        .expect("the download finishes");
    assert_eq!(received, BODY_LEN, "every downloaded byte arrives");

    let peak = sampler.finish();
    let growth = peak.saturating_sub(baseline);
    eprintln!(
        "RSS baseline {} KiB, peak {} KiB",
        baseline >> 10,
        peak >> 10
    );
    assert!(
        growth < MAX_RSS_GROWTH,
        "RSS grew by {} MiB (baseline {} MiB, peak {} MiB) while 2 × 200 MiB streamed over h2",
        growth >> 20,
        baseline >> 20,
        peak >> 20
    );
}

/// Reads a body to its end, counting bytes without keeping them.
async fn count_body(mut body: hyper::body::Incoming) -> u64 {
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let frame = frame.expect("body streams without error");
        if let Some(data) = frame.data_ref() {
            received += data.len() as u64;
        }
    }
    received
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_connections_leak_no_file_descriptors() {
    let _turn = EXCLUSIVE.lock().await;
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::fill(
        "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
listeners:
  - name: main
    address: 127.0.0.1:0
    limits: { header_read_timeout: 1s }
    routes:
      - { name: default, cluster: upstream }
clusters:
  - { name: upstream, endpoints: ['{upstream}'], idle_timeout: 1s }
",
        &[("upstream", &upstream.addr)],
    ));
    let addr = proxy::listener_addr(&handle, "main");
    let ok = client::get(&proxy::url(&handle, "main", "/warm")).await;
    assert_eq!(ok.status, StatusCode::OK);
    let before = open_fds();

    let bad_inputs: [&[u8]; 5] = [
        b"NOT HTTP AT ALL\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad\x01: v\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\n",
        // Starts a body, then the client goes away mid-body.
        b"POST /cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\npartial",
    ];
    let mut tasks = Vec::new();
    for i in 0..200 {
        let input = bad_inputs[i % bad_inputs.len()];
        tasks.push(tokio::spawn(async move {
            // Short wait: the cut-body case leaves the proxy waiting; we hang up.
            let _ =
                tokio::time::timeout(Duration::from_millis(500), raw_exchange(addr, input)).await;
        }));
        if tasks.len() == 20 {
            for task in tasks.drain(..) {
                task.await.unwrap();
            }
        }
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Clients that hang up in the middle of a large download.
    for _ in 0..20 {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /bytes/100000000 HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut first = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut first)).await;
        drop(stream);
    }

    eventually("open descriptors return to where they were", || async {
        open_fds() <= before + 4
    })
    .await;
    let after = client::get(&proxy::url(&handle, "main", "/after")).await;
    assert_eq!(after.status, StatusCode::OK, "the proxy still serves");
}
