//! Hostcalls seen from a module: maps, buffers, properties, local replies,
//! memory checks, metrics, foreign functions, WASI, contexts.

use lacewing_abi::{Status, pairs};
use lacewing_core::ResponseFlag;
use lacewing_core::filter::FilterStatus;

use super::*;

fn shared_bytes(host: &WasmHost, key: &str) -> Option<Vec<u8>> {
    host.shared_data()
        .get(key.as_bytes())
        .map(|(v, _)| v.to_vec())
}

fn run_request_headers(body: &str) -> (Arc<WasmHost>, SharedStream, FilterStatus) {
    run_with_imports("", body)
}

fn run_with_imports(imports: &str, body: &str) -> (Arc<WasmHost>, SharedStream, FilterStatus) {
    let (host, _) = host();
    let cfg = config(serde_json::json!({ "name": "probe", "env": { "MODE": "test" } }));
    let plugin = load(&host, &cfg, &module(imports, body)).unwrap();
    let s = stream("/a?b=1");
    let mut f = filter(&plugin, &s);
    let status = f.on_request_headers(&s, false);
    (host, s, status)
}

#[test]
fn pairs_round_trip_through_hostcalls() {
    let (host, s, status) = run_request_headers(
        r#"(data (i32.const 100) "pairs") (data (i32.const 110) "x-seen") (data (i32.const 120) "1")
           (data (i32.const 130) ":path") (data (i32.const 140) "/new") (data (i32.const 150) "x-request-id")
           (data (i32.const 170) "set")
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $get_pairs (i32.const 0) (i32.const 2000) (i32.const 2004)))
             (drop (call $set_shared (i32.const 100) (i32.const 5) (i32.load (i32.const 2000)) (i32.load (i32.const 2004)) (i32.const 0)))
             (call $record (i32.const 170) (i32.const 3)
               (call $set_pairs (i32.const 0) (i32.load (i32.const 2000)) (i32.load (i32.const 2004))))
             (drop (call $add_value (i32.const 0) (i32.const 110) (i32.const 6) (i32.const 120) (i32.const 1)))
             (drop (call $replace_value (i32.const 0) (i32.const 130) (i32.const 5) (i32.const 140) (i32.const 4)))
             (drop (call $remove_value (i32.const 0) (i32.const 150) (i32.const 12)))
             i32.const 0)"#,
    );
    assert_eq!(status, FilterStatus::Continue);
    let bytes = shared_bytes(&host, "pairs").unwrap();
    let list = pairs::decode(&bytes).unwrap();
    let expect: Vec<(&[u8], &[u8])> = vec![
        (b":authority", b"example.com"),
        (b":path", b"/a?b=1"),
        (b":method", b"GET"),
        (b":scheme", b"http"),
        (b"x-request-id", b"req-1"),
    ];
    assert_eq!(list, expect);
    assert_eq!(recorded(&host, "set"), Some(0));
    let s = s.borrow();
    assert_eq!(s.request.uri.path_and_query().unwrap().as_str(), "/new");
    assert_eq!(s.request.headers["x-seen"], "1");
    assert_eq!(s.request.headers["host"], "example.com");
    assert!(s.request.headers.get("x-request-id").is_none());
}

#[test]
fn out_of_bounds_pointers_are_invalid_memory_access() {
    let (host, _, status) = run_request_headers(
        r#"(data (i32.const 100) "log") (data (i32.const 110) "pairs") (data (i32.const 120) "buffer") (data (i32.const 130) "value")
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (call $record (i32.const 100) (i32.const 3) (call $log (i32.const 2) (i32.const -16) (i32.const 100)))
             (call $record (i32.const 110) (i32.const 5) (call $get_pairs (i32.const 0) (i32.const -1) (i32.const 2004)))
             (call $record (i32.const 120) (i32.const 6)
               (call $set_buffer (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 262000) (i32.const 1000)))
             (call $record (i32.const 130) (i32.const 5)
               (call $get_value (i32.const 0) (i32.const 2147483647) (i32.const 2147483647) (i32.const 2000) (i32.const 2004)))
             i32.const 0)"#,
    );
    assert_eq!(status, FilterStatus::Continue);
    for key in ["log", "pairs", "buffer", "value"] {
        assert_eq!(
            recorded(&host, key),
            Some(Status::InvalidMemoryAccess.code()),
            "{key}"
        );
    }
}

#[test]
fn map_access_follows_the_stream_phase() {
    let (host, _) = host();
    let bytes = module(
        "",
        r#"(data (i32.const 100) "missing") (data (i32.const 110) "resp") (data (i32.const 120) "root") (data (i32.const 130) "late")
           (data (i32.const 140) "x-a") (data (i32.const 150) "status") (data (i32.const 160) ":status")
           (func (export "proxy_on_configure") (param i32 i32) (result i32)
             (call $record (i32.const 120) (i32.const 4) (call $get_pairs (i32.const 0) (i32.const 2000) (i32.const 2004)))
             i32.const 1)
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (call $record (i32.const 100) (i32.const 7)
               (call $get_value (i32.const 0) (i32.const 140) (i32.const 3) (i32.const 2000) (i32.const 2004)))
             (call $record (i32.const 110) (i32.const 4) (call $get_pairs (i32.const 2) (i32.const 2000) (i32.const 2004)))
             i32.const 0)
           (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
             (call $record (i32.const 130) (i32.const 4)
               (call $add_value (i32.const 0) (i32.const 140) (i32.const 3) (i32.const 140) (i32.const 3)))
             (drop (call $get_value (i32.const 2) (i32.const 160) (i32.const 7) (i32.const 2000) (i32.const 2004)))
             (call $record (i32.const 150) (i32.const 6) (i32.load16_u (i32.load (i32.const 2000))))
             (drop (call $add_value (i32.const 2) (i32.const 140) (i32.const 3) (i32.const 140) (i32.const 3)))
             i32.const 0)"#,
    );
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    assert_eq!(
        recorded(&host, "root"),
        Some(Status::BadArgument.code()),
        "no request map on a root context"
    );
    let s = stream("/");
    let mut f = filter(&plugin, &s);
    f.on_request_headers(&s, true);
    assert_eq!(recorded(&host, "missing"), Some(Status::NotFound.code()));
    assert_eq!(
        recorded(&host, "resp"),
        Some(Status::NotFound.code()),
        "no response yet"
    );
    let (parts, ()) = http::Response::builder()
        .status(204)
        .body(())
        .unwrap()
        .into_parts();
    s.borrow_mut().response = Some(parts);
    f.on_response_headers(&s, true);
    assert_eq!(
        recorded(&host, "late"),
        Some(Status::BadArgument.code()),
        "request headers went upstream"
    );
    assert_eq!(
        recorded(&host, "status"),
        Some(i32::from(u16::from_le_bytes(*b"20")))
    );
    assert_eq!(s.borrow().response.as_ref().unwrap().headers["x-a"], "x-a");
}

#[test]
fn local_response_and_pause_mapping() {
    let (host, _) = host();
    let headers = pairs::encode([("x-why", "policy")].iter().map(|(k, v)| (*k, *v)));
    let bytes = module(
        "",
        &format!(
            r#"(data (i32.const 100) "denied") (data (i32.const 110) "no entry") (data (i32.const 200) "{}")
               (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
                 (drop (call $local_response (i32.const 403) (i32.const 100) (i32.const 6) (i32.const 110) (i32.const 8)
                   (i32.const 200) (i32.const {}) (i32.const -1)))
                 i32.const 1)"#,
            wat_bytes(&headers),
            headers.len()
        ),
    );
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    let s = stream("/");
    let mut f = filter(&plugin, &s);
    assert_eq!(f.on_request_headers(&s, true), FilterStatus::StopIteration);
    let reply = s.borrow().local_reply.clone().unwrap();
    assert_eq!(reply.status, 403);
    assert_eq!(reply.body, "no entry");
    assert_eq!(reply.details, "denied");
    assert_eq!(reply.flag, ResponseFlag::LocalReply);
    assert_eq!(reply.headers["x-why"], "policy");
}

#[test]
fn body_pause_buffers_and_splice_edits_the_body() {
    let (host, _) = host();
    let bytes = module(
        "",
        r#"(data (i32.const 100) "<<") (data (i32.const 110) "size")
           (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
             (if (i32.eqz (local.get 2)) (then (return (i32.const 1))))
             (call $record (i32.const 110) (i32.const 4) (local.get 1))
             (drop (call $set_buffer (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 100) (i32.const 2)))
             i32.const 0)"#,
    );
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    let s = stream("/");
    let mut f = filter(&plugin, &s);
    assert!(f.wants_request_body());
    assert!(!f.wants_response_body());
    s.borrow_mut().request_body.extend_from_slice(b"abc");
    assert_eq!(f.on_request_body(&s, false), FilterStatus::StopAndBuffer);
    s.borrow_mut().request_body.extend_from_slice(b"def");
    assert_eq!(f.on_request_body(&s, true), FilterStatus::Continue);
    assert_eq!(recorded(&host, "size"), Some(6));
    assert_eq!(&s.borrow().request_body[..], b"<<abcdef");
}

#[test]
fn properties_read_and_write() {
    let (host, s, _) = run_request_headers(
        r#"(data (i32.const 100) "request\00path") (data (i32.const 120) "plugin_name") (data (i32.const 140) "my\00key")
           (data (i32.const 150) "v1") (data (i32.const 160) "nope") (data (i32.const 170) "source\00port")
           (data (i32.const 200) "path") (data (i32.const 210) "name") (data (i32.const 220) "mine") (data (i32.const 230) "port")
           (data (i32.const 240) "unknown")
           (func $share (param $key i32) (param $key_len i32)
             (drop (call $set_shared (local.get $key) (local.get $key_len) (i32.load (i32.const 2000)) (i32.load (i32.const 2004)) (i32.const 0))))
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $get_property (i32.const 100) (i32.const 12) (i32.const 2000) (i32.const 2004)))
             (call $share (i32.const 200) (i32.const 4))
             (drop (call $get_property (i32.const 120) (i32.const 11) (i32.const 2000) (i32.const 2004)))
             (call $share (i32.const 210) (i32.const 4))
             (drop (call $set_property (i32.const 140) (i32.const 6) (i32.const 150) (i32.const 2)))
             (drop (call $get_property (i32.const 140) (i32.const 6) (i32.const 2000) (i32.const 2004)))
             (call $share (i32.const 220) (i32.const 4))
             (drop (call $get_property (i32.const 170) (i32.const 11) (i32.const 2000) (i32.const 2004)))
             (call $share (i32.const 230) (i32.const 4))
             (call $record (i32.const 240) (i32.const 7)
               (call $get_property (i32.const 160) (i32.const 4) (i32.const 2000) (i32.const 2004)))
             i32.const 0)"#,
    );
    assert_eq!(shared_bytes(&host, "path").unwrap(), b"/a?b=1");
    assert_eq!(shared_bytes(&host, "name").unwrap(), b"probe");
    assert_eq!(shared_bytes(&host, "mine").unwrap(), b"v1");
    assert_eq!(shared_bytes(&host, "port").unwrap(), 50000i64.to_le_bytes());
    assert_eq!(recorded(&host, "unknown"), Some(Status::NotFound.code()));
    assert_eq!(&s.borrow().filter_state["my.key"][..], b"v1");
}

/// `lacewing_return_buffer`: a value that fits goes into the lent buffer
/// while the flag is set (which the host clears), else through
/// `proxy_on_memory_allocate`; a buffer outside memory is refused.
#[test]
fn returned_values_go_into_the_lent_buffer_while_offered() {
    // Arguments at 300: flag at 3000, buffer at 3100, 8 bytes; at 320: a
    // buffer that ends past the 4 pages of memory.
    let (host, _, _) = run_request_headers(
        r#"(data (i32.const 100) "lacewing_return_buffer") (data (i32.const 130) "plugin_name")
           (data (i32.const 150) "request\00path")
           (data (i32.const 300) "\b8\0b\00\00\1c\0c\00\00\08\00\00\00")
           (data (i32.const 320) "\b8\0b\00\00\00\00\04\00\08\00\00\00")
           (data (i32.const 400) "bad") (data (i32.const 410) "lent") (data (i32.const 420) "flag")
           (data (i32.const 430) "name") (data (i32.const 440) "late") (data (i32.const 450) "large")
           (data (i32.const 460) "path")
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (call $record (i32.const 400) (i32.const 3)
               (call $foreign (i32.const 100) (i32.const 22) (i32.const 320) (i32.const 12) (i32.const 2000) (i32.const 2004)))
             (drop (call $foreign (i32.const 100) (i32.const 22) (i32.const 300) (i32.const 12) (i32.const 2000) (i32.const 2004)))
             ;; offered: "probe" lands in the buffer and the flag is cleared
             (i32.store8 (i32.const 3000) (i32.const 1))
             (drop (call $get_property (i32.const 130) (i32.const 11) (i32.const 2000) (i32.const 2004)))
             (call $record (i32.const 410) (i32.const 4) (i32.load (i32.const 2000)))
             (call $record (i32.const 420) (i32.const 4) (i32.load8_u (i32.const 3000)))
             (drop (call $set_shared (i32.const 430) (i32.const 4) (i32.load (i32.const 2000)) (i32.load (i32.const 2004)) (i32.const 0)))
             ;; not offered: allocated as usual
             (drop (call $get_property (i32.const 130) (i32.const 11) (i32.const 2000) (i32.const 2004)))
             (call $record (i32.const 440) (i32.const 4) (i32.load (i32.const 2000)))
             ;; offered, but "/a?b=1"... fits; a longer value than 8 bytes does not
             (i32.store8 (i32.const 3000) (i32.const 1))
             (drop (call $get_property (i32.const 150) (i32.const 12) (i32.const 2000) (i32.const 2004)))
             (call $record (i32.const 460) (i32.const 4) (i32.load (i32.const 2000)))
             (i32.store8 (i32.const 3000) (i32.const 1))
             (drop (call $get_pairs (i32.const 0) (i32.const 2000) (i32.const 2004)))
             (call $record (i32.const 450) (i32.const 5) (i32.load (i32.const 2000)))
             i32.const 0)"#,
    );
    assert_eq!(recorded(&host, "bad"), Some(Status::BadArgument.code()));
    assert_eq!(recorded(&host, "lent"), Some(3100));
    assert_eq!(recorded(&host, "flag"), Some(0));
    assert_eq!(shared_bytes(&host, "name").unwrap(), b"probe");
    assert!(recorded(&host, "late").unwrap() >= 16384, "allocated");
    assert_eq!(recorded(&host, "path"), Some(3100));
    assert!(recorded(&host, "large").unwrap() >= 16384, "allocated");
}

#[test]
fn metrics_foreign_functions_and_log_level() {
    let (host, s, _) = run_request_headers(
        r#"(data (i32.const 100) "hits") (data (i32.const 110) "sha256") (data (i32.const 120) "abc") (data (i32.const 130) "nope")
           (data (i32.const 200) "value") (data (i32.const 210) "digest") (data (i32.const 220) "unknown") (data (i32.const 230) "level")
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (drop (call $define_metric (i32.const 0) (i32.const 100) (i32.const 4) (i32.const 2008)))
             (drop (call $increment_metric (i32.load (i32.const 2008)) (i64.const 3)))
             (drop (call $get_metric (i32.load (i32.const 2008)) (i32.const 2016)))
             (call $record (i32.const 200) (i32.const 5) (i32.load (i32.const 2016)))
             (drop (call $foreign (i32.const 110) (i32.const 6) (i32.const 120) (i32.const 3) (i32.const 2000) (i32.const 2004)))
             (drop (call $set_shared (i32.const 210) (i32.const 6) (i32.load (i32.const 2000)) (i32.load (i32.const 2004)) (i32.const 0)))
             (call $record (i32.const 220) (i32.const 7)
               (call $foreign (i32.const 130) (i32.const 4) (i32.const 120) (i32.const 3) (i32.const 2000) (i32.const 2004)))
             (drop (call $get_log_level (i32.const 2024)))
             (call $record (i32.const 230) (i32.const 5) (i32.load (i32.const 2024)))
             i32.const 0)"#,
    );
    drop(s);
    assert_eq!(recorded(&host, "value"), Some(3));
    assert_eq!(
        crate::engine::hex(&shared_bytes(&host, "digest").unwrap()),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    assert_eq!(recorded(&host, "unknown"), Some(Status::NotFound.code()));
    assert_eq!(recorded(&host, "level"), Some(LogLevel::Trace as i32));
}

#[test]
fn wasi_functions_behave() {
    let (host, _, _) = run_with_imports(
        r#"(import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "environ_sizes_get" (func $env_sizes (param i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "environ_get" (func $env_get (param i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes (param i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))
           (import "wasi_snapshot_preview1" "random_get" (func $random (param i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "fd_prestat_get" (func $prestat (param i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "fd_close" (func $fd_close (param i32) (result i32)))
           (import "wasi_snapshot_preview1" "fd_seek" (func $fd_seek (param i32 i64 i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "fd_fdstat_get" (func $fdstat (param i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "fd_prestat_dir_name" (func $prestat_name (param i32 i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "clock_res_get" (func $clock_res (param i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
           (import "wasi_snapshot_preview1" "sched_yield" (func $yield (result i32)))"#,
        r#"(data (i32.const 100) "hello from wasm\n")
           (data (i32.const 200) "write") (data (i32.const 210) "envc") (data (i32.const 220) "env") (data (i32.const 230) "args")
           (data (i32.const 240) "clock") (data (i32.const 250) "random") (data (i32.const 260) "prestat") (data (i32.const 270) "poll")
           (data (i32.const 280) "bad-fd") (data (i32.const 290) "read") (data (i32.const 300) "fdclose") (data (i32.const 310) "seek")
           (data (i32.const 320) "fdstat") (data (i32.const 330) "filetype") (data (i32.const 340) "prename") (data (i32.const 350) "res")
           (data (i32.const 360) "argsget") (data (i32.const 370) "yield")
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (i32.store (i32.const 3000) (i32.const 100))
             (i32.store (i32.const 3004) (i32.const 16))
             (call $record (i32.const 200) (i32.const 5) (call $fd_write (i32.const 1) (i32.const 3000) (i32.const 1) (i32.const 3008)))
             (call $record (i32.const 280) (i32.const 6) (call $fd_write (i32.const 9) (i32.const 3000) (i32.const 1) (i32.const 3008)))
             (drop (call $env_sizes (i32.const 3100) (i32.const 3104)))
             (call $record (i32.const 210) (i32.const 4) (i32.load (i32.const 3100)))
             (drop (call $env_get (i32.const 3200) (i32.const 3300)))
             (drop (call $set_shared (i32.const 220) (i32.const 3) (i32.load (i32.const 3200)) (i32.const 9) (i32.const 0)))
             (drop (call $args_sizes (i32.const 3100) (i32.const 3104)))
             (call $record (i32.const 230) (i32.const 4) (i32.load (i32.const 3100)))
             (call $record (i32.const 240) (i32.const 5) (call $clock (i32.const 0) (i64.const 0) (i32.const 3400)))
             (call $record (i32.const 250) (i32.const 6) (call $random (i32.const 3500) (i32.const 16)))
             (call $record (i32.const 260) (i32.const 7) (call $prestat (i32.const 3) (i32.const 3600)))
             (call $record (i32.const 270) (i32.const 4) (call $poll (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 3700)))
             (call $record (i32.const 290) (i32.const 4) (call $fd_read (i32.const 0) (i32.const 3000) (i32.const 1) (i32.const 3800)))
             (call $record (i32.const 300) (i32.const 7) (call $fd_close (i32.const 5)))
             (call $record (i32.const 310) (i32.const 4) (call $fd_seek (i32.const 1) (i64.const 0) (i32.const 0) (i32.const 3800)))
             (call $record (i32.const 320) (i32.const 6) (call $fdstat (i32.const 1) (i32.const 3900)))
             (call $record (i32.const 330) (i32.const 8) (i32.load8_u (i32.const 3900)))
             (call $record (i32.const 340) (i32.const 7) (call $prestat_name (i32.const 3) (i32.const 3800) (i32.const 4)))
             (call $record (i32.const 350) (i32.const 3) (call $clock_res (i32.const 1) (i32.const 3800)))
             (call $record (i32.const 360) (i32.const 7) (call $args_get (i32.const 3800) (i32.const 3900)))
             (call $record (i32.const 370) (i32.const 5) (call $yield))
             i32.const 0)"#,
    );
    assert_eq!(recorded(&host, "write"), Some(0));
    assert_eq!(recorded(&host, "bad-fd"), Some(8));
    assert_eq!(recorded(&host, "envc"), Some(1));
    assert_eq!(shared_bytes(&host, "env").unwrap(), b"MODE=test");
    assert_eq!(recorded(&host, "args"), Some(0));
    assert_eq!(recorded(&host, "clock"), Some(0));
    assert_eq!(recorded(&host, "random"), Some(0));
    assert_eq!(recorded(&host, "prestat"), Some(8));
    assert_eq!(recorded(&host, "poll"), Some(58));
    assert_eq!(recorded(&host, "read"), Some(0));
    assert_eq!(recorded(&host, "fdclose"), Some(8));
    assert_eq!(recorded(&host, "seek"), Some(70));
    assert_eq!(recorded(&host, "fdstat"), Some(0));
    assert_eq!(recorded(&host, "filetype"), Some(2));
    assert_eq!(recorded(&host, "prename"), Some(8));
    assert_eq!(recorded(&host, "res"), Some(0));
    assert_eq!(recorded(&host, "argsget"), Some(0));
    assert_eq!(recorded(&host, "yield"), Some(0));
}

#[test]
fn deferred_done_and_effective_context() {
    let (host, _) = host();
    let bytes = module(
        "",
        r#"(global $stream (mut i32) (i32.const 0))
           (data (i32.const 100) "deleted") (data (i32.const 110) "done") (data (i32.const 120) "bad-ctx") (data (i32.const 130) "resumed")
           (data (i32.const 140) "no-status")
           (func (export "proxy_on_context_create") (param i32 i32)
             (if (local.get 1) (then (global.set $stream (local.get 0)))))
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             i32.const 1)
           (func (export "proxy_on_done") (param i32) (result i32) i32.const 0)
           (func (export "proxy_on_delete") (param i32)
             (call $record (i32.const 100) (i32.const 7) (local.get 0)))
           (func (export "proxy_on_tick") (param i32)
             (call $record (i32.const 120) (i32.const 7) (call $set_effective (i32.const 999)))
             (call $record (i32.const 140) (i32.const 9) (call $get_status (i32.const 2000) (i32.const 2004) (i32.const 2008)))
             (drop (call $set_effective (global.get $stream)))
             (call $record (i32.const 130) (i32.const 7) (call $continue_stream (i32.const 0)))
             (call $record (i32.const 110) (i32.const 4) (call $done)))"#,
    );
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    let s = stream("/");
    let mut f = filter(&plugin, &s);
    assert_eq!(f.on_request_headers(&s, true), FilterStatus::StopIteration);
    let resumed = s.borrow().resumed();
    drop(f);
    assert_eq!(
        recorded(&host, "deleted"),
        None,
        "on_done returned false: the context is kept"
    );
    let (vm, root) = crate::vm::worker_vm(&plugin.shared).unwrap();
    vm.deliver_tick(root);
    assert_eq!(recorded(&host, "bad-ctx"), Some(Status::BadArgument.code()));
    assert_eq!(recorded(&host, "no-status"), Some(Status::NotFound.code()));
    assert_eq!(recorded(&host, "resumed"), Some(0));
    assert_eq!(recorded(&host, "done"), Some(0));
    assert!(
        recorded(&host, "deleted").is_some(),
        "proxy_done deletes the context"
    );
    // continue_stream from another callback woke the stream.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        tokio::time::timeout(std::time::Duration::from_secs(5), resumed.notified())
            .await
            .unwrap()
    });
}
