//! Plugin log lines as the `lacewing` binary writes them: the layout of its
//! text log, the plugin's name, and a plugin's control characters escaped,
//! so a plugin (or the request data it logs) cannot paint the terminal or
//! forge a line of its own.

use std::process::Stdio;

use bytes::Bytes;
use http_body_util::Full;
use lacewing_tests::{client, eventually, servers, wasm};

#[tokio::test]
async fn a_plugin_line_names_its_plugin_and_escapes_control_characters() {
    let upstream = servers::http_echo().await;
    let port = lacewing_tests::process::free_port();
    let dir = tempfile::tempdir().expect("temp dir");
    let log_path = dir.path().join("stderr.log");
    let log_file = std::fs::File::create(&log_path).expect("log file");
    let mut child = tokio::process::Command::new(lacewing_tests::process::lacewing_binary())
        .args(["proxy", "--workers", "1", "--listen"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("--upstream")
        .arg(upstream.addr.to_string())
        .arg("--wasm")
        .arg(wasm::module("conformance-filter"))
        .arg("--wasm-cache-dir")
        .arg(dir.path().join("cache"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file)
        .kill_on_drop(true)
        .spawn()
        .expect("start lacewing");
    eventually("the proxy listens", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
    })
    .await;
    let request = http::Request::get(format!("http://127.0.0.1:{port}/"))
        .header("x-test", "log-controls")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let answer = client::request(request).await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-log-status"), Some("Ok"));
    let line = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .find(|l| l.contains("cleared"))
            .map(str::to_string)
    };
    eventually("the plugin's line is in the log", || async {
        line().is_some()
    })
    .await;
    let line = line().unwrap_or_default();
    let _ = child.kill().await;
    // One line, in the text log's layout, with the plugin's name.
    assert!(
        line.contains(" INFO lacewing_wasm::hostcalls::log: conformance-filter: "),
        "{line}"
    );
    assert!(line.ends_with("plugin=\"conformance_filter\""), "{line}");
    // The escape, the line break and the invalid byte are shown, not obeyed.
    assert!(
        line.contains("\\x1b[2Jcleared\\x0aforged line \u{fffd} plugin="),
        "{line}"
    );
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        !log.contains('\u{1b}'),
        "a raw escape reached the log:\n{log}"
    );
    assert!(
        !log.lines().any(|l| l.starts_with("forged line")),
        "a plugin forged a line:\n{log}"
    );
}
