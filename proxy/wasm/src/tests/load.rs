//! Loading: ABI detection, link checks, start callbacks, sha256 pin, module cache.

use super::*;
use crate::AbiVersion;

const CONFIGURE_OK: &str =
    r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 1)"#;

#[test]
fn abi_version_detected_from_marker() {
    let (host, _) = host();
    for (marker, expected) in [
        ("proxy_abi_version_0_1_0", AbiVersion::V0_1_0),
        ("proxy_abi_version_0_2_0", AbiVersion::V0_2_0),
        ("proxy_abi_version_0_2_1", AbiVersion::V0_2_1),
    ] {
        let bytes = module_with_marker(&format!(r#"(func (export "{marker}"))"#), "", CONFIGURE_OK);
        let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
        assert_eq!(plugin.abi_version(), expected, "{marker}");
    }
    // Without a marker the module is refused.
    let none = module_with_marker("", "", "");
    let err = load(&host, &config(serde_json::json!({})), &none)
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy_abi_version"), "{err}");
}

#[test]
fn module_without_allocator_is_refused() {
    let (host, _) = host();
    let bytes = wat::parse_str(
        r#"(module (memory (export "memory") 1) (func (export "proxy_abi_version_0_2_1")))"#,
    )
    .unwrap();
    let err = load(&host, &config(serde_json::json!({})), &bytes)
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy_on_memory_allocate"), "{err}");
}

#[test]
fn v0_1_0_header_callback_gets_two_arguments() {
    let (host, _) = host();
    let bytes = module_with_marker(
        r#"(func (export "proxy_abi_version_0_1_0"))"#,
        "",
        r#"(data (i32.const 100) "n")
           (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (result i32)
             i32.const 100 i32.const 1 local.get $n call $record
             i32.const 0)"#,
    );
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    let s = stream("/a");
    let mut f = filter(&plugin, &s);
    assert_eq!(
        f.on_request_headers(&s, true),
        lacewing_core::filter::FilterStatus::Continue
    );
    // :authority :path :method :scheme + x-request-id (host is shown as :authority).
    assert_eq!(recorded(&host, "n"), Some(5));
}

#[test]
fn unknown_import_is_named_in_the_error() {
    let (host, _) = host();
    let bytes = module(r#"(import "env" "foo" (func $foo))"#, "");
    let err = load(&host, &config(serde_json::json!({})), &bytes)
        .unwrap_err()
        .to_string();
    assert!(err.contains("env.foo"), "{err}");
    assert!(err.contains("plugin `test`"), "{err}");
    let wasi = module(
        r#"(import "wasi_snapshot_preview1" "path_open" (func $open))"#,
        "",
    );
    let err = load(&host, &config(serde_json::json!({})), &wasi)
        .unwrap_err()
        .to_string();
    assert!(err.contains("wasi_snapshot_preview1.path_open"), "{err}");
}

#[test]
fn legacy_wasi_unstable_imports_are_linked() {
    let (host, _) = host();
    // What an AssemblyScript module imports: proc_exit for `abort`, plus a clock.
    let bytes = module(
        r#"(import "wasi_unstable" "proc_exit" (func $exit (param i32)))
           (import "wasi_unstable" "clock_time_get" (func $clock (param i32 i64 i32) (result i32)))"#,
        r#"(data (i32.const 100) "clock")
           (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
             i32.const 100 i32.const 5
             (call $clock (i32.const 0) (i64.const 1) (i32.const 200))
             call $record
             i32.const 1)"#,
    );
    load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    assert_eq!(recorded(&host, "clock"), Some(0), "clock_time_get errno");
    let unknown = module(r#"(import "wasi_unstable" "path_open" (func $open))"#, "");
    let err = load(&host, &config(serde_json::json!({})), &unknown)
        .unwrap_err()
        .to_string();
    assert!(err.contains("wasi_unstable.path_open"), "{err}");
}

#[test]
fn import_with_wrong_signature_is_rejected() {
    let (host, _) = host();
    let bytes = module(
        r#"(import "env" "proxy_log" (func $log_wrong (param i32) (result i32)))"#,
        "",
    );
    let err = load(&host, &config(serde_json::json!({})), &bytes)
        .unwrap_err()
        .to_string();
    assert!(err.contains("proxy_log"), "{err}");
}

#[test]
fn trap_in_on_configure_rejects_plugin_with_reason() {
    let (host, _) = host();
    let bytes = module(
        "",
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) unreachable)"#,
    );
    let err = load(&host, &config(serde_json::json!({ "name": "x" })), &bytes)
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("plugin `x`: proxy_on_configure trapped"),
        "{err}"
    );
    assert!(err.contains("unreachable"), "{err}");
}

#[test]
fn false_from_start_callbacks_rejects_plugin() {
    let (host, _) = host();
    let bytes = module(
        "",
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) i32.const 0)"#,
    );
    let err = load(&host, &config(serde_json::json!({ "name": "x" })), &bytes)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "plugin `x`: on_configure returned false");
    let bytes = module(
        "",
        r#"(func (export "proxy_on_vm_start") (param i32 i32) (result i32) i32.const 0)"#,
    );
    let err = load(&host, &config(serde_json::json!({ "name": "x" })), &bytes)
        .unwrap_err()
        .to_string();
    assert_eq!(err, "plugin `x`: on_vm_start returned false");
}

#[test]
fn proc_exit_during_start_rejects_plugin() {
    let (host, _) = host();
    let bytes = module(
        r#"(import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))"#,
        r#"(func (export "_start") i32.const 3 call $exit)"#,
    );
    let err = load(&host, &config(serde_json::json!({})), &bytes)
        .unwrap_err()
        .to_string();
    assert!(err.contains("proc_exit(3)"), "{err}");
}

#[test]
fn configurations_reach_the_start_callbacks() {
    let (host, _) = host();
    let bytes = module(
        "",
        r#"(data (i32.const 100) "vm") (data (i32.const 110) "plugin") (data (i32.const 120) "first")
           (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
             i32.const 100 i32.const 2 local.get 1 call $record
             i32.const 1)
           (func (export "proxy_on_configure") (param i32 i32) (result i32)
             i32.const 110 i32.const 6 local.get 1 call $record
             ;; read the plugin configuration and record its first byte
             i32.const 7 i32.const 0 i32.const 100 i32.const 2000 i32.const 2004 call $get_buffer drop
             i32.const 120 i32.const 5 i32.const 2000 i32.load i32.load8_u call $record
             i32.const 1)"#,
    );
    let cfg =
        config(serde_json::json!({ "configuration": "hello", "vm_configuration": { "a": 1 } }));
    load(&host, &cfg, &bytes).unwrap();
    assert_eq!(recorded(&host, "vm"), Some(r#"{"a":1}"#.len() as i32));
    assert_eq!(recorded(&host, "plugin"), Some(5));
    assert_eq!(recorded(&host, "first"), Some(i32::from(b'h')));
}

#[test]
fn sha256_pin_is_checked() {
    let (host, _) = host();
    let bytes = module("", "");
    let err = load(
        &host,
        &config(serde_json::json!({ "sha256": "00" })),
        &bytes,
    )
    .unwrap_err();
    assert!(matches!(err, WasmError::Sha256Mismatch { .. }), "{err}");
    let plugin = load(&host, &config(serde_json::json!({})), &bytes).unwrap();
    let pinned = config(serde_json::json!({ "sha256": plugin.sha256().to_uppercase() }));
    load(&host, &pinned, &bytes).unwrap();
}

#[test]
fn garbage_is_a_compile_error() {
    let (host, _) = host();
    let err = load(&host, &config(serde_json::json!({})), b"not wasm").unwrap_err();
    assert!(matches!(err, WasmError::Compile { .. }), "{err}");
}

#[test]
fn missing_file_is_a_read_error() {
    let (host, metrics) = host();
    let cfg = config(serde_json::json!({ "module": "/nonexistent/x.wasm" }));
    let err = host
        .load_plugin(&cfg, upstreams(&[], &metrics))
        .unwrap_err()
        .to_string();
    assert!(err.contains("/nonexistent/x.wasm"), "{err}");
}

/// A module file in a fresh directory, and the cache directory beside it (not yet created).
struct CacheFixture {
    dir: std::path::PathBuf,
    bytes: Vec<u8>,
    cfg: PluginConfig,
}

impl CacheFixture {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "lacewing-wasm-cache-{}-{}",
            std::process::id(),
            crate::host::next_uid()
        ));
        let bytes = module("", CONFIGURE_OK);
        let path = dir.join("m.wasm");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&path, &bytes).unwrap();
        let cfg = config(serde_json::json!({ "module": path.to_str().unwrap() }));
        Self { dir, bytes, cfg }
    }

    fn cache(&self) -> std::path::PathBuf {
        self.dir.join("cache")
    }

    /// A fresh host on the cache directory (so nothing is in its memory yet).
    fn host(&self) -> (Arc<WasmHost>, Metrics) {
        let metrics = Metrics::new();
        let host = WasmHost::new(HostOptions {
            cache_dir: Some(self.cache()),
            metrics: metrics.clone(),
            log_level: LogLevel::Info,
        })
        .unwrap();
        (host, metrics)
    }

    /// Where a fresh host finds the module; then checks that the plugin loads
    /// and configures (so a recompiled module works).
    fn load_fresh(&self) -> crate::engine::ModuleSource {
        use sha2::Digest;
        let (host, metrics) = self.host();
        let sha: [u8; 32] = sha2::Sha256::digest(&self.bytes).into();
        let (_, source) = host.engine.module_from(&sha, &self.bytes).unwrap();
        host.load_plugin(&self.cfg, upstreams(&[], &metrics))
            .unwrap();
        source
    }

    /// The one artifact in the cache directory.
    fn artifact(&self) -> std::path::PathBuf {
        let artifacts: Vec<_> = std::fs::read_dir(self.cache())
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "cwasm"))
            .collect();
        assert_eq!(artifacts.len(), 1, "{artifacts:?}");
        artifacts[0].clone()
    }

    fn untrusted_reason(source: crate::engine::ModuleSource) -> String {
        match source {
            crate::engine::ModuleSource::Compiled(crate::engine::Refusal::Untrusted(why)) => why,
            other => panic!("expected a refused artifact, got {other:?}"),
        }
    }
}

impl Drop for CacheFixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn precompiled_artifact_is_written_private_and_reused() {
    use crate::engine::{ModuleSource, Refusal};
    use std::os::unix::fs::MetadataExt;
    let fixture = CacheFixture::new();
    assert_eq!(
        fixture.load_fresh(),
        ModuleSource::Compiled(Refusal::Absent)
    );
    let dir_mode = std::fs::metadata(fixture.cache()).unwrap().mode() & 0o777;
    assert_eq!(dir_mode, 0o700, "cache directory mode {dir_mode:o}");
    for entry in std::fs::read_dir(fixture.cache()).unwrap() {
        let meta = entry.unwrap().metadata().unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
    }
    let artifact = fixture.artifact();
    // A fresh host maps the artifact instead of compiling.
    assert_eq!(fixture.load_fresh(), ModuleSource::Disk);
    assert_eq!(fixture.artifact(), artifact);
}

#[test]
fn tampered_artifact_is_recompiled_and_still_works() {
    use crate::engine::ModuleSource;
    let fixture = CacheFixture::new();
    fixture.load_fresh();
    let artifact = fixture.artifact();
    // Same owner, mode and name; different bytes.
    let mut bytes = std::fs::read(&artifact).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xff;
    std::fs::write(&artifact, &bytes).unwrap();

    let why = CacheFixture::untrusted_reason(fixture.load_fresh());
    assert!(why.contains("differs from the digest"), "{why}");
    // The recompiled module replaced the tampered artifact.
    assert_ne!(std::fs::read(&artifact).unwrap(), bytes);
    assert_eq!(fixture.load_fresh(), ModuleSource::Disk);
}

#[test]
fn artifact_not_0600_is_recompiled() {
    use std::os::unix::fs::PermissionsExt;
    let fixture = CacheFixture::new();
    fixture.load_fresh();
    let artifact = fixture.artifact();
    std::fs::set_permissions(&artifact, std::fs::Permissions::from_mode(0o644)).unwrap();

    let why = CacheFixture::untrusted_reason(fixture.load_fresh());
    assert!(why.contains("mode 0644"), "{why}");
}

#[test]
fn loose_cache_directory_is_made_private_and_its_files_discarded() {
    use crate::engine::ModuleSource;
    use crate::engine::Refusal;
    use std::os::unix::fs::PermissionsExt;
    let fixture = CacheFixture::new();
    fixture.load_fresh();
    std::fs::set_permissions(fixture.cache(), std::fs::Permissions::from_mode(0o777)).unwrap();

    // The artifact inside cannot be proved the proxy's own any more: it is
    // discarded, the directory closed, and the module compiled and saved anew.
    assert!(matches!(
        fixture.load_fresh(),
        ModuleSource::Compiled(Refusal::Absent)
    ));
    let mode = std::fs::metadata(fixture.cache())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o700);
    assert!(matches!(fixture.load_fresh(), ModuleSource::Disk));
}

#[test]
fn world_writable_directory_with_foreign_files_is_not_trusted() {
    use std::os::unix::fs::PermissionsExt;
    let fixture = CacheFixture::new();
    fixture.load_fresh();
    std::fs::write(fixture.cache().join("notes.txt"), b"not a cache file").unwrap();
    std::fs::set_permissions(fixture.cache(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let before: Vec<_> = std::fs::read_dir(fixture.cache()).unwrap().collect();

    // Not provably a cache directory: neither repaired nor used.
    let why = CacheFixture::untrusted_reason(fixture.load_fresh());
    assert!(why.contains("mode 0777"), "{why}");
    let after: Vec<_> = std::fs::read_dir(fixture.cache()).unwrap().collect();
    assert_eq!(
        before.len(),
        after.len(),
        "nothing written to an untrusted directory"
    );
}

#[test]
fn plugins_with_the_same_vm_id_share_a_vm() {
    let (host, _) = host();
    let bytes = module("", CONFIGURE_OK);
    let a = load(
        &host,
        &config(serde_json::json!({ "name": "a", "vm_id": "shared" })),
        &bytes,
    )
    .unwrap();
    let b = load(
        &host,
        &config(serde_json::json!({ "name": "b", "vm_id": "shared" })),
        &bytes,
    )
    .unwrap();
    let c = load(&host, &config(serde_json::json!({ "name": "c" })), &bytes).unwrap();
    let (vm_a, root_a) = crate::vm::worker_vm(&a.shared).unwrap();
    let (vm_b, root_b) = crate::vm::worker_vm(&b.shared).unwrap();
    let (vm_c, _) = crate::vm::worker_vm(&c.shared).unwrap();
    assert!(std::rc::Rc::ptr_eq(&vm_a, &vm_b));
    assert_ne!(root_a, root_b);
    assert!(!std::rc::Rc::ptr_eq(&vm_a, &vm_c));
}
