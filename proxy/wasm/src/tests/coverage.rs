//! The remaining imports and exports, one small module each: 0.1.0 calls,
//! buffer status, map size, CAS, metric recording, stream close, trailers,
//! `on_log`, the `malloc` fallback, `_initialize`, network callbacks and
//! plugin retirement.

use std::time::Duration;

use lacewing_abi::Status;
use lacewing_core::filter::{FilterStatus, NetworkFilterFactory, PeerType};
use lacewing_core::stream::ConnectionStream;

use super::*;

#[test]
fn v0_1_0_configuration_and_continue_request() {
    let (host, _) = host();
    let bytes = module_with_marker(
        r#"(func (export "proxy_abi_version_0_1_0"))"#,
        r#"(import "env" "proxy_get_configuration" (func $get_config (param i32 i32) (result i32)))
           (import "env" "proxy_continue_request" (func $continue_request (result i32)))
           (import "env" "proxy_continue_response" (func $continue_response (result i32)))
           (import "env" "proxy_clear_route_cache" (func $clear_route_cache (result i32)))"#,
        r#"(global $stream (mut i32) (i32.const 0))
           (data (i32.const 100) "config") (data (i32.const 110) "cont") (data (i32.const 120) "route") (data (i32.const 130) "resp")
           (func (export "proxy_on_configure") (param i32 i32) (result i32)
             (drop (call $get_config (i32.const 2000) (i32.const 2004)))
             (call $record (i32.const 100) (i32.const 6) (i32.load (i32.const 2004)))
             i32.const 1)
           (func (export "proxy_on_context_create") (param i32 i32)
             (if (local.get 1) (then (global.set $stream (local.get 0)))))
           (func (export "proxy_on_request_headers") (param i32 i32) (result i32)
             (call $record (i32.const 120) (i32.const 5) (call $clear_route_cache))
             i32.const 1)
           (func (export "proxy_on_tick") (param i32)
             (drop (call $set_effective (global.get $stream)))
             (call $record (i32.const 130) (i32.const 4) (call $continue_response))
             (call $record (i32.const 110) (i32.const 4) (call $continue_request)))"#,
    );
    let plugin = load(
        &host,
        &config(serde_json::json!({ "configuration": "abc" })),
        &bytes,
    )
    .unwrap();
    assert_eq!(recorded(&host, "config"), Some(3));
    let s = stream("/");
    let mut f = filter(&plugin, &s);
    assert_eq!(f.on_request_headers(&s, true), FilterStatus::StopIteration);
    assert_eq!(recorded(&host, "route"), Some(Status::Unimplemented.code()));
    let (vm, root) = crate::vm::worker_vm(&plugin.shared).unwrap();
    vm.deliver_tick(root);
    assert_eq!(recorded(&host, "cont"), Some(0));
    assert_eq!(recorded(&host, "resp"), Some(0));
}

#[test]
fn sizes_cas_metrics_close_and_trailers() {
    let (host, metrics) = host();
    let bytes = module(
        r#"(import "env" "proxy_get_buffer_status" (func $buffer_status (param i32 i32 i32) (result i32)))
           (import "env" "proxy_get_header_map_size" (func $map_size (param i32 i32) (result i32)))
           (import "env" "proxy_record_metric" (func $record_metric (param i32 i64) (result i32)))"#,
        r#"(data (i32.const 100) "bufsize") (data (i32.const 110) "mapsize") (data (i32.const 120) "cas") (data (i32.const 130) "k")
           (data (i32.const 140) "gauge") (data (i32.const 150) "g") (data (i32.const 160) "trailer") (data (i32.const 170) "x-t")
           (data (i32.const 180) "close") (data (i32.const 190) "now")
           (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
             (drop (call $buffer_status (i32.const 0) (i32.const 2000) (i32.const 2004)))
             (call $record (i32.const 100) (i32.const 7) (i32.load (i32.const 2000)))
             (drop (call $map_size (i32.const 0) (i32.const 2000)))
             (call $record (i32.const 110) (i32.const 7) (i32.load (i32.const 2000)))
             ;; set k, then a write with a stale CAS token fails
             (drop (call $set_shared (i32.const 130) (i32.const 1) (i32.const 130) (i32.const 1) (i32.const 0)))
             (drop (call $set_shared (i32.const 130) (i32.const 1) (i32.const 130) (i32.const 1) (i32.const 0)))
             (call $record (i32.const 120) (i32.const 3)
               (call $set_shared (i32.const 130) (i32.const 1) (i32.const 130) (i32.const 1) (i32.const 12345)))
             (drop (call $define_metric (i32.const 1) (i32.const 150) (i32.const 1) (i32.const 2008)))
             (drop (call $record_metric (i32.load (i32.const 2008)) (i64.const 42)))
             (drop (call $get_metric (i32.load (i32.const 2008)) (i32.const 2016)))
             (call $record (i32.const 140) (i32.const 5) (i32.load (i32.const 2016)))
             (drop (call $now (i32.const 2024)))
             (call $record (i32.const 190) (i32.const 3) (i32.wrap_i64 (i64.shr_u (i64.load (i32.const 2024)) (i64.const 40))))
             i32.const 0)
           (func (export "proxy_on_request_trailers") (param i32 i32) (result i32)
             (call $record (i32.const 160) (i32.const 7) (local.get 1))
             (drop (call $add_value (i32.const 1) (i32.const 170) (i32.const 3) (i32.const 170) (i32.const 3)))
             i32.const 0)
           (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
             (call $record (i32.const 180) (i32.const 5) (call $close_stream (i32.const 1)))
             i32.const 0)"#,
    );
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    let s = stream("/");
    let mut f = filter(&plugin, &s);
    s.borrow_mut().request_body.extend_from_slice(b"12345");
    f.on_request_body(&s, false);
    assert_eq!(recorded(&host, "bufsize"), Some(5));
    let expected = {
        let st = s.borrow();
        let mut list = Vec::new();
        crate::hostcalls::request_pairs_for_tests(&st, &mut list);
        lacewing_abi::pairs::encoded_len(list.iter().map(|(k, v)| (*k, *v)))
    };
    assert_eq!(recorded(&host, "mapsize"), Some(expected as i32));
    assert_eq!(recorded(&host, "cas"), Some(Status::CasMismatch.code()));
    assert_eq!(recorded(&host, "gauge"), Some(42));
    assert!(recorded(&host, "now").unwrap() > 0, "wall clock in ns");
    assert!(metrics.render().contains(r#"name="g",plugin="test"} 42"#));
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-a", "1".parse().unwrap());
    s.borrow_mut().request_trailers = Some(trailers);
    assert_eq!(f.on_request_trailers(&s), FilterStatus::Continue);
    assert_eq!(recorded(&host, "trailer"), Some(1));
    assert_eq!(s.borrow().request_trailers.as_ref().unwrap()["x-t"], "x-t");
    let (parts, ()) = http::Response::builder()
        .status(200)
        .body(())
        .unwrap()
        .into_parts();
    s.borrow_mut().response = Some(parts);
    assert_eq!(
        f.on_response_headers(&s, false),
        FilterStatus::StopIteration
    );
    assert_eq!(recorded(&host, "close"), Some(0));
    assert!(s.borrow().reset);
}

#[test]
fn malloc_fallback_initialize_and_on_log() {
    let (host, _) = host();
    // No proxy_on_memory_allocate: the host allocates with `malloc`.
    let text = format!(
        r#"(module
  {STD_IMPORTS}
  (memory (export "memory") 4)
  (global $bump (mut i32) (i32.const 16384))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $bump))
    (global.set $bump (i32.add (global.get $bump) (local.get $n)))
    (local.get $p))
  (data (i32.const 100) "init") (data (i32.const 110) "path") (data (i32.const 120) "logged")
  (data (i32.const 130) "request\00path")
  (func $record (param i32 i32 i32)
    (i32.store (i32.const 1024) (local.get 2))
    (drop (call $set_shared (local.get 0) (local.get 1) (i32.const 1024) (i32.const 4) (i32.const 0))))
  (func (export "_initialize") (call $record (i32.const 100) (i32.const 4) (i32.const 1)))
  (func (export "proxy_on_log") (param i32)
    (call $record (i32.const 120) (i32.const 6) (i32.const 1))
    (drop (call $get_property (i32.const 130) (i32.const 12) (i32.const 2000) (i32.const 2004)))
    (drop (call $set_shared (i32.const 110) (i32.const 4) (i32.load (i32.const 2000)) (i32.load (i32.const 2004)) (i32.const 0)))))"#
    );
    let bytes = wat::parse_str(&text).unwrap();
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    assert_eq!(recorded(&host, "init"), Some(1));
    let s = stream("/logged");
    let mut f = filter(&plugin, &s);
    f.on_request_headers(&s, true);
    f.on_log(&s);
    assert_eq!(recorded(&host, "logged"), Some(1));
    assert_eq!(&host.shared_data().get(b"path").unwrap().0[..], b"/logged");
}

#[test]
fn network_filter_callbacks() {
    let (host, _) = host();
    let bytes = module(
        "",
        r#"(data (i32.const 100) "new") (data (i32.const 110) "down") (data (i32.const 120) "up") (data (i32.const 130) "dclose")
           (data (i32.const 140) "uclose") (data (i32.const 150) "log") (data (i32.const 160) "!") (data (i32.const 170) "port")
           (data (i32.const 180) "destination\00port")
           (func (export "proxy_on_new_connection") (param i32) (result i32)
             (call $record (i32.const 100) (i32.const 3) (i32.const 1))
             (drop (call $get_property (i32.const 180) (i32.const 16) (i32.const 2000) (i32.const 2004)))
             (call $record (i32.const 170) (i32.const 4) (i32.load (i32.load (i32.const 2000))))
             i32.const 0)
           (func (export "proxy_on_downstream_data") (param i32 i32 i32) (result i32)
             (call $record (i32.const 110) (i32.const 4) (local.get 1))
             ;; append "!" to the data
             (drop (call $set_buffer (i32.const 2) (local.get 1) (i32.const 0) (i32.const 160) (i32.const 1)))
             i32.const 0)
           (func (export "proxy_on_upstream_data") (param i32 i32 i32) (result i32)
             (call $record (i32.const 120) (i32.const 2) (local.get 1))
             i32.const 1)
           (func (export "proxy_on_downstream_connection_close") (param i32 i32)
             (call $record (i32.const 130) (i32.const 6) (local.get 1)))
           (func (export "proxy_on_upstream_connection_close") (param i32 i32)
             (call $record (i32.const 140) (i32.const 6) (local.get 1)))
           (func (export "proxy_on_log") (param i32)
             (call $record (i32.const 150) (i32.const 3) (i32.const 1)))"#,
    );
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    let remote = "127.0.0.1:50000".parse().unwrap();
    let local = "127.0.0.1:9000".parse().unwrap();
    let conn = ConnectionStream::new(lacewing_core::stream::StreamInfo::new(
        3,
        remote,
        local,
        Arc::from("raw"),
    ))
    .shared();
    let mut f = NetworkFilterFactory::create(&*plugin, &conn).unwrap();
    assert_eq!(f.on_new_connection(&conn), FilterStatus::Continue);
    assert_eq!(recorded(&host, "port"), Some(9000));
    conn.borrow_mut()
        .downstream_data
        .extend_from_slice(b"hello");
    assert_eq!(f.on_downstream_data(&conn, false), FilterStatus::Continue);
    assert_eq!(&conn.borrow().downstream_data[..], b"hello!");
    conn.borrow_mut().upstream_data.extend_from_slice(b"abc");
    assert_eq!(
        f.on_upstream_data(&conn, false),
        FilterStatus::StopIteration
    );
    f.on_downstream_close(&conn, PeerType::Remote);
    f.on_upstream_close(&conn, PeerType::Local);
    f.on_log(&conn);
    assert_eq!(recorded(&host, "new"), Some(1));
    assert_eq!(recorded(&host, "down"), Some(5));
    assert_eq!(recorded(&host, "up"), Some(3));
    assert_eq!(recorded(&host, "dclose"), Some(2));
    assert_eq!(recorded(&host, "uclose"), Some(1));
    assert_eq!(recorded(&host, "log"), Some(1));
}

#[test]
fn network_filter_trap_closes_the_connection() {
    let (host, _) = host();
    let bytes = module(
        "",
        r#"(func (export "proxy_on_new_connection") (param i32) (result i32) unreachable)"#,
    );
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    let conn = ConnectionStream::new(lacewing_core::stream::StreamInfo::new(
        3,
        "127.0.0.1:1".parse().unwrap(),
        "127.0.0.1:2".parse().unwrap(),
        Arc::from("raw"),
    ))
    .shared();
    let mut f = NetworkFilterFactory::create(&*plugin, &conn).unwrap();
    assert_eq!(f.on_new_connection(&conn), FilterStatus::StopIteration);
    assert!(conn.borrow().close);
}

/// Runs `task` as a worker does: a current-thread runtime inside a `LocalSet`.
fn on_worker_thread(task: impl std::future::Future<Output = ()>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    tokio::task::LocalSet::new().block_on(&rt, task);
}

#[test]
fn dropped_plugin_stops_ticking() {
    let (host, _) = host();
    let ticking = module(
        "",
        r#"(global $ticks (mut i32) (i32.const 0))
           (data (i32.const 100) "ticks")
           (func (export "proxy_on_configure") (param i32 i32) (result i32)
             (drop (call $set_tick (i32.const 2)))
             i32.const 1)
           (func (export "proxy_on_tick") (param i32)
             (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
             (call $record (i32.const 100) (i32.const 5) (global.get $ticks)))"#,
    );
    let other = module("", "");
    on_worker_thread(async {
        let plugin = load(
            &host,
            &config(serde_json::json!({ "name": "ticker" })),
            &ticking,
        )
        .unwrap();
        {
            let s = stream("/");
            let _f = filter(&plugin, &s);
        }
        for _ in 0..500 {
            if recorded(&host, "ticks").is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(recorded(&host, "ticks").is_some());
        drop(plugin);
        // The next VM lookup on this worker retires the dropped plugin.
        let next = load(
            &host,
            &config(serde_json::json!({ "name": "next" })),
            &other,
        )
        .unwrap();
        let s = stream("/");
        let _f = filter(&next, &s);
        tokio::time::sleep(Duration::from_millis(10)).await;
        let after = recorded(&host, "ticks");
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(
            recorded(&host, "ticks"),
            after,
            "no tick after the plugin was dropped"
        );
    });
}

#[test]
fn a_plugin_started_on_a_worker_ends_its_root_context_when_retired() {
    let (host, _) = host();
    let bytes = module(
        "",
        r#"(data (i32.const 100) "configured")
           (data (i32.const 120) "done")
           (data (i32.const 140) "deleted")
           (func (export "proxy_on_configure") (param i32 i32) (result i32)
             (call $record (i32.const 100) (i32.const 10) (local.get 0))
             i32.const 1)
           (func (export "proxy_on_done") (param i32) (result i32)
             (call $record (i32.const 120) (i32.const 4) (local.get 0))
             i32.const 1)
           (func (export "proxy_on_delete") (param i32)
             (call $record (i32.const 140) (i32.const 7) (local.get 0)))"#,
    );
    on_worker_thread(async {
        let plugin = load(
            &host,
            &config(serde_json::json!({ "name": "eager" })),
            &bytes,
        )
        .unwrap();
        plugin.start_on_worker().unwrap();
        let root = recorded(&host, "configured").expect("on_configure ran");
        // The load-time instance is thrown away without callbacks.
        assert_eq!(recorded(&host, "done"), None);

        drop(plugin);
        host.retire_dropped_plugins();
        assert_eq!(
            recorded(&host, "done"),
            Some(root),
            "on_done on the root context"
        );
        assert_eq!(recorded(&host, "deleted"), Some(root), "then on_delete");
    });
}
