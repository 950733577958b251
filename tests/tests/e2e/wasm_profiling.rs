//! Profiling plugins: with `LACEWING_WASM_PERFMAP=1` the real binary lists
//! the compiled code of its plugins in `/tmp/perf-<pid>.map`, which `perf
//! report` reads to name guest functions instead of bare JIT addresses.

use std::process::Stdio;

use lacewing_tests::{client, eventually, servers, wasm};

#[tokio::test]
async fn the_perf_map_names_the_plugins_functions() {
    let upstream = servers::http_echo().await;
    let port = lacewing_tests::process::free_port();
    let cache = tempfile::tempdir().expect("cache dir");
    let mut child = tokio::process::Command::new(lacewing_tests::process::lacewing_binary())
        .args(["proxy", "--workers", "1", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--upstream")
        .arg(upstream.addr.to_string())
        .arg("--wasm")
        .arg(wasm::module("header-echo"))
        .arg("--wasm-cache-dir")
        .arg(cache.path())
        .env("LACEWING_WASM_PERFMAP", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start lacewing");
    let pid = child.id().expect("pid");
    let map = std::path::PathBuf::from(format!("/tmp/perf-{pid}.map"));
    let names_the_callbacks = |listed: &str| {
        // Each line is `START SIZE NAME`; the module's exported callbacks are there by name.
        listed
            .lines()
            .any(|l| l.split_whitespace().count() >= 3 && l.contains("proxy_on_request_headers"))
    };
    eventually("the plugin's code is in the perf map", || async {
        names_the_callbacks(&std::fs::read_to_string(&map).unwrap_or_default())
    })
    .await;
    // And the plugin serves as usual (once the proxy listens: the module
    // is compiled first).
    eventually("the proxy listens", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let answer = client::get(&format!("http://127.0.0.1:{port}/")).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-lacewing-filter"), Some("header-echo"));
    let listed = std::fs::read_to_string(&map).unwrap_or_default();
    let _ = child.kill().await;
    let _ = std::fs::remove_file(&map);
    assert!(
        names_the_callbacks(&listed),
        "no plugin function in {}:\n{}",
        map.display(),
        listed.lines().take(20).collect::<Vec<_>>().join("\n")
    );
}
