//! The embedded modules run in the real host (when they were built before
//! this crate was compiled, as `cargo xtask build-filters && cargo test` does).

use lacewing_filter_test::{FilterTest, Verdict};

#[test]
fn embedded_headers_module_runs() {
    let Some(bytes) = lacewing_filters::builtin("headers") else {
        eprintln!("headers.wasm was not built before this crate; run `cargo xtask build-filters`");
        return;
    };
    let dir = std::env::temp_dir().join(format!("lacewing-builtin-{}", std::process::id()));
    let written = lacewing_filters::install(&dir).unwrap();
    assert!(written.iter().any(|p| p.ends_with("headers.wasm")));
    assert_eq!(std::fs::read(dir.join("headers.wasm")).unwrap(), bytes);
    let test = FilterTest::builder(dir.join("headers.wasm"))
        .configuration(serde_json::json!({"request": {"set": {"x-from": "builtin"}}}))
        .load()
        .unwrap();
    let mut s = test.stream(http::Request::get("/").body(()).unwrap());
    assert_eq!(s.request_headers(true), Verdict::Continue);
    assert_eq!(s.request_header("x-from").as_deref(), Some("builtin"));
    drop(s);
    let _ = std::fs::remove_dir_all(dir);
}
