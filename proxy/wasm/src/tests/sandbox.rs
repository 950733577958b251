//! The sandbox: CPU deadline, memory cap, traps, fail policies, VM restarts.

use lacewing_core::ResponseFlag;
use lacewing_core::filter::FilterStatus;

use super::*;

/// `on_request_headers` loops forever the first time (when shared key "looped"
/// is absent), and continues afterwards.
const LOOP_ONCE: &str = "";
const LOOP_ONCE_BODY: &str = r#"
  (data (i32.const 100) "looped")
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (call $get_shared (i32.const 100) (i32.const 6) (i32.const 2000) (i32.const 2004) (i32.const 2008)) (i32.const 1))
      (then
        (call $record (i32.const 100) (i32.const 6) (i32.const 1))
        (loop $forever (br $forever))))
    i32.const 0)"#;

#[test]
fn infinite_loop_hits_deadline_and_vm_is_recreated() {
    let (host, metrics) = host();
    let bytes = module(LOOP_ONCE, LOOP_ONCE_BODY);
    let cfg = config(serde_json::json!({ "limits": { "callback_timeout": "20ms" } }));
    let plugin = load(&host, &cfg, &bytes).unwrap();

    let first = stream("/");
    let mut f = filter(&plugin, &first);
    assert_eq!(
        f.on_request_headers(&first, true),
        FilterStatus::StopIteration
    );
    let reply = first
        .borrow()
        .local_reply
        .clone()
        .expect("fail closed answers");
    assert_eq!(reply.status, 503);
    assert_eq!(reply.flag, ResponseFlag::FilterFailure);
    assert!(String::from_utf8_lossy(&reply.body).contains("test"));
    assert!(reply.details.contains("deadline"), "{}", reply.details);
    drop(f);
    assert_eq!(
        metric(
            &metrics,
            r#"lacewing_wasm_deadline_exceeded_total{plugin="test"}"#
        ),
        Some(1.0)
    );

    // The next stream gets a fresh VM, which no longer loops.
    let second = stream("/");
    let mut f = filter(&plugin, &second);
    assert_eq!(f.on_request_headers(&second, true), FilterStatus::Continue);
    assert!(second.borrow().local_reply.is_none());
    assert_eq!(
        metric(
            &metrics,
            r#"lacewing_wasm_vm_restarts_total{plugin="test"}"#
        ),
        Some(1.0)
    );
    assert!(metrics.render().contains(r#"lacewing_wasm_callback_duration_seconds_count{callback="proxy_on_request_headers",plugin="test"}"#));
}

#[test]
fn every_callback_is_counted_and_one_in_eight_is_timed() {
    let (host, metrics) = host();
    let bytes = module(
        "",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             i32.const 0)"#,
    );
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    for _ in 0..17 {
        let s = stream("/");
        let mut f = filter(&plugin, &s);
        assert_eq!(f.on_request_headers(&s, true), FilterStatus::Continue);
    }
    let labels = r#"{callback="proxy_on_request_headers",plugin="test"}"#;
    let series = |name: &str| metric(&metrics, &format!("{name}{labels}"));
    assert_eq!(series("lacewing_wasm_callbacks_total"), Some(17.0));
    // The 1st, 9th and 17th.
    assert_eq!(
        series("lacewing_wasm_callback_duration_seconds_count"),
        Some(3.0)
    );
    assert!(series("lacewing_wasm_callback_duration_seconds_sum").is_some_and(|s| s > 0.0));
}

#[test]
fn memory_grow_bomb_is_capped() {
    let (host, _) = host();
    let bytes = module(
        "",
        r#"(data (i32.const 100) "pages")
           (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (block $done (loop $grow
               (br_if $done (i32.eq (memory.grow (i32.const 1)) (i32.const -1)))
               (br $grow)))
             (call $record (i32.const 100) (i32.const 5) (memory.size))
             i32.const 0)"#,
    );
    let cfg = config(serde_json::json!({ "limits": { "memory": "1MiB" } }));
    let plugin = load(&host, &cfg, &bytes).unwrap();
    let s = stream("/");
    let mut f = filter(&plugin, &s);
    assert_eq!(f.on_request_headers(&s, true), FilterStatus::Continue);
    assert_eq!(
        recorded(&host, "pages"),
        Some(16),
        "1 MiB is 16 pages of 64 KiB"
    );
}

#[test]
fn trap_after_memory_exhaustion_is_reported_as_memory() {
    let (host, metrics) = host();
    let bytes = module(
        "",
        r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
             (block $done (loop $grow
               (br_if $done (i32.eq (memory.grow (i32.const 16)) (i32.const -1)))
               (br $grow)))
             unreachable)"#,
    );
    let cfg = config(serde_json::json!({ "limits": { "memory": "2MiB" } }));
    let plugin = load(&host, &cfg, &bytes).unwrap();
    let s = stream("/");
    let mut f = filter(&plugin, &s);
    assert_eq!(f.on_request_headers(&s, true), FilterStatus::StopIteration);
    let reply = s.borrow().local_reply.clone().unwrap();
    assert!(reply.details.contains("memory limit"), "{}", reply.details);
    assert_eq!(
        metric(&metrics, r#"lacewing_wasm_traps_total{plugin="test"}"#),
        Some(1.0)
    );
}

#[test]
fn initial_memory_above_the_cap_is_rejected() {
    let (host, _) = host();
    // The test modules declare 4 pages (256 KiB).
    let err = load(
        &host,
        &config(serde_json::json!({ "limits": { "memory": "128KiB" } })),
        &module("", ""),
    )
    .unwrap_err();
    assert!(matches!(err, WasmError::Start { .. }), "{err}");
}

const TRAP_ON_HEADERS: &str =
    r#"(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) unreachable)"#;

#[test]
fn trap_fails_closed_with_503() {
    let (host, metrics) = host();
    let plugin = load(
        &host,
        &config(serde_json::json!({ "name": "authz" })),
        &module("", TRAP_ON_HEADERS),
    )
    .unwrap();
    let s = stream("/");
    let mut f = filter(&plugin, &s);
    assert_eq!(f.on_request_headers(&s, true), FilterStatus::StopIteration);
    let reply = s.borrow().local_reply.clone().unwrap();
    assert_eq!(reply.status, 503);
    assert_eq!(reply.flag, ResponseFlag::FilterFailure);
    assert_eq!(reply.body, "plugin `authz` failed\n");
    assert_eq!(
        metric(&metrics, r#"lacewing_wasm_traps_total{plugin="authz"}"#),
        Some(1.0)
    );
}

#[test]
fn fail_open_skips_the_plugin_for_the_rest_of_the_stream() {
    let (host, _) = host();
    let bytes = module(
        "",
        &format!(
            r#"{TRAP_ON_HEADERS}
               (data (i32.const 100) "body")
               (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
                 (call $record (i32.const 100) (i32.const 4) (i32.const 1))
                 i32.const 1)"#
        ),
    );
    let plugin = load(
        &host,
        &config(serde_json::json!({ "fail": "open" })),
        &bytes,
    )
    .unwrap();
    let s = stream("/");
    let mut f = filter(&plugin, &s);
    assert_eq!(f.on_request_headers(&s, false), FilterStatus::Continue);
    assert!(s.borrow().local_reply.is_none());
    assert_eq!(f.on_request_body(&s, true), FilterStatus::Continue);
    assert_eq!(
        recorded(&host, "body"),
        None,
        "the plugin is skipped after failing"
    );
}

#[test]
fn vm_restarts_are_rate_limited() {
    let (host, metrics) = host();
    let plugin = load(
        &host,
        &config(serde_json::json!({})),
        &module("", TRAP_ON_HEADERS),
    )
    .unwrap();
    for _ in 0..(crate::workers::MAX_RESTARTS + 3) {
        let s = stream("/");
        let mut f = filter(&plugin, &s);
        assert_eq!(f.on_request_headers(&s, true), FilterStatus::StopIteration);
        assert_eq!(
            s.borrow().local_reply.as_ref().map(|r| r.status.as_u16()),
            Some(503)
        );
    }
    let restarts = metric(
        &metrics,
        r#"lacewing_wasm_vm_restarts_total{plugin="test"}"#,
    );
    assert_eq!(restarts, Some(crate::workers::MAX_RESTARTS as f64));
}

#[test]
fn fail_open_plugin_without_vm_takes_no_part() {
    let (host, _) = host();
    let plugin = load(
        &host,
        &config(serde_json::json!({ "fail": "open" })),
        &module("", TRAP_ON_HEADERS),
    )
    .unwrap();
    let mut absent = 0;
    for _ in 0..(crate::workers::MAX_RESTARTS + 3) {
        let s = stream("/");
        match HttpFilterFactory::create(&*plugin, &s) {
            Some(mut f) => assert_eq!(f.on_request_headers(&s, true), FilterStatus::Continue),
            None => absent += 1,
        }
    }
    assert!(absent >= 1, "past the restart limit the plugin is left out");
}
