//! Publishing generations leaks nothing: across 1,000 publishes that each
//! replace a plugin (new VMs on every worker) and move a route, the process
//! keeps its file descriptor count and its memory.
//!
//! This measures the whole process, so it lives in its own test binary.

use std::time::Duration;

use http::StatusCode;
use lacewing_tests::client;
use lacewing_tests::generations::Generations;
use lacewing_tests::process::{open_fds, rss_bytes};
use lacewing_tests::{eventually_with, proxy};

const PUBLISHES: usize = 1_000;
const WARM_UP: usize = 50;
/// Descriptors that may come and go independently of publishing (the test
/// client's pooled connections, the runtime's own).
const FD_SLACK: usize = 8;
/// Allocator slack. Measured: about 1 MiB across 3,000 publishes; a queue
/// delivery task left behind by each retired VM made it 6.6 MiB per 1,000.
const MAX_RSS_GROWTH: u64 = 4 * 1024 * 1024;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_publishes_keep_fds_and_memory_flat() {
    let up = Generations::start().await;
    let configs = [
        up.config("a", "A tick_ms=50", 2),
        up.config("b", "B tick_ms=50", 2),
    ];
    let handle = proxy::start(
        &proxy::simple_yaml(&[up.a.addr], "http1").replace("workers: 1", "workers: 2"),
    );
    let url = proxy::url(&handle, "main", "/");
    let publisher = handle.publisher();

    let run = |count: usize, offset: usize| {
        let publisher = publisher.clone();
        let configs = configs.clone();
        tokio::task::spawn_blocking(move || {
            for i in offset..offset + count {
                publisher
                    .publish(configs[i % 2].clone(), "test")
                    .unwrap_or_else(|e| panic!("publish {i}: {e}"));
            }
        })
    };
    let check = |i: usize| {
        let url = url.clone();
        async move {
            let response = client::get(&url).await;
            assert_eq!(response.status, StatusCode::OK);
            let tag = ["A", "B"][i % 2];
            assert_eq!(response.header("x-response-chain"), Some(tag));
        }
    };

    run(WARM_UP, 0).await.expect("warm-up publishes");
    check(WARM_UP - 1).await;
    let fds = open_fds();
    let rss = rss_bytes();

    // Publish in batches, with a request through each batch's last generation.
    let batch = 100;
    for start in (WARM_UP..WARM_UP + PUBLISHES).step_by(batch) {
        run(batch, start).await.expect("publishes");
        check(start + batch - 1).await;
    }

    // Retired VMs go within a worker's next look; descriptors settle.
    eventually_with(
        "file descriptors return to their count before the publishes",
        200,
        Duration::from_millis(50),
        || async { open_fds() <= fds + FD_SLACK },
    )
    .await;
    let grown = rss_bytes().saturating_sub(rss);
    eprintln!(
        "{PUBLISHES} publishes: fds {fds} -> {}, RSS {} KiB -> {} KiB",
        open_fds(),
        rss / 1024,
        rss_bytes() / 1024
    );
    assert!(
        grown <= MAX_RSS_GROWTH,
        "RSS grew by {} KiB across {PUBLISHES} publishes (from {} KiB)",
        grown / 1024,
        rss / 1024
    );
    assert_eq!(
        handle.generation().map(|g| g.number),
        Some((1 + WARM_UP + PUBLISHES) as u64)
    );
    handle.shutdown();
}
