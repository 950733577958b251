//! Wasm modules for tests: crates under `tests/modules/` and `filters/` built
//! once per test process for `wasm32-wasip1`, AssemblyScript projects under
//! `tests/modules/` built by `cargo xtask build-filters`, WAT text compiled to
//! files, and proxies in front of an echo upstream that run them.

use std::collections::HashMap;
use std::fmt::Display;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lacewing_proxy::ProxyHandle;

use crate::client::{self, Response};
use crate::proxy;
use crate::servers::{self, TestServer};

/// The Cargo profile wasm modules are built with.
pub const WASM_PROFILE: &str = "wasm";
/// The target wasm modules are built for.
pub const WASM_TARGET: &str = "wasm32-wasip1";

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the workspace")
        .to_path_buf()
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// One build slot per crate, so concurrent tests asking for the same module
/// build it once and tests asking for different modules do not wait on each
/// other (cargo's own lock still orders the builds).
fn build_slot(crate_name: &str) -> Arc<OnceLock<PathBuf>> {
    static SLOTS: OnceLock<Mutex<HashMap<String, Arc<OnceLock<PathBuf>>>>> = OnceLock::new();
    let slots = SLOTS.get_or_init(Mutex::default);
    let mut slots = slots.lock().unwrap_or_else(PoisonError::into_inner);
    slots.entry(crate_name.to_string()).or_default().clone()
}

/// Builds the wasm crate `crate_name` (once per test process) with
/// `cargo build --target wasm32-wasip1 --profile wasm -p <crate_name>` and
/// returns the path of its `.wasm`. Panics with cargo's output when the build fails.
pub fn module(crate_name: &str) -> PathBuf {
    let slot = build_slot(crate_name);
    slot.get_or_init(|| build(crate_name)).clone()
}

/// Runs cargo with `args` in the workspace to build module `name`; panics
/// with cargo's output when that fails.
fn cargo_build(name: &str, args: &[&str]) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .args(args)
        .current_dir(workspace_root())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cargo:?} to build `{name}`: {e}"));
    assert!(
        output.status.success(),
        "building wasm module `{name}` failed ({}):\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

fn build(crate_name: &str) -> PathBuf {
    cargo_build(
        crate_name,
        &[
            "build",
            "--target",
            WASM_TARGET,
            "--profile",
            WASM_PROFILE,
            "-p",
            crate_name,
        ],
    );
    let path = target_dir()
        .join(WASM_TARGET)
        .join(WASM_PROFILE)
        .join(format!("{}.wasm", crate_name.replace('-', "_")));
    assert!(
        path.is_file(),
        "cargo built `{crate_name}` but {} does not exist",
        path.display()
    );
    path
}

/// Where `cargo xtask build-filters` writes the module of the AssemblyScript
/// project `tests/modules/<name>`.
fn assemblyscript_output(name: &str) -> PathBuf {
    target_dir()
        .join("assemblyscript")
        .join(format!("{name}.wasm"))
}

/// The module of the AssemblyScript project `tests/modules/<name>`, built (once
/// per test process) with `cargo xtask build-filters <name>`: the project's
/// npm packages are installed from its lock file and `asc` compiles it.
/// Panics with the build's output when it fails.
pub fn assemblyscript_module(name: &str) -> PathBuf {
    let slot = build_slot(&format!("assemblyscript:{name}"));
    slot.get_or_init(|| {
        cargo_build(
            name,
            &["run", "--quiet", "-p", "xtask", "--", "build-filters", name],
        );
        let path = assemblyscript_output(name);
        assert!(path.is_file(), "{} was not built", path.display());
        path
    })
    .clone()
}

/// A directory for this test process's generated modules.
fn scratch_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lacewing-tests-{}", std::process::id()));
        std::fs::create_dir_all(&dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
        dir
    })
    .clone()
}

/// Compiles `wat` to a binary module and writes it to `<temp>/lacewing-tests-<pid>/<name>.wasm`.
/// Panics with the WAT error when the text does not parse.
pub fn wat_file(name: &str, wat: &str) -> PathBuf {
    let binary = wat::parse_str(wat).unwrap_or_else(|e| panic!("WAT module `{name}`: {e}"));
    bytes_file(name, &binary)
}

/// Writes raw bytes (a module, or deliberately not one) to `<temp>/lacewing-tests-<pid>/<name>.wasm`.
pub fn bytes_file(name: &str, bytes: &[u8]) -> PathBuf {
    let path = scratch_dir().join(format!("{name}.wasm"));
    std::fs::write(&path, bytes).unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    path
}

/// A bump allocator exported as `proxy_on_memory_allocate`, for WAT modules.
/// Data segments may use the first page; allocations start at the second and
/// grow memory as needed (0 when memory cannot grow).
pub const WAT_ALLOCATOR: &str = r#"
  (global $heap (mut i32) (i32.const 65536))
  (func $proxy_on_memory_allocate (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $start i32) (local $end i32) (local $have i32)
    (local.set $start (global.get $heap))
    (local.set $end
      (i32.and (i32.add (i32.add (local.get $start) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (local.set $have (i32.mul (memory.size) (i32.const 65536)))
    (if (i32.gt_u (local.get $end) (local.get $have))
      (then
        (if (i32.eq
              (memory.grow (i32.add (i32.shr_u (i32.sub (local.get $end) (local.get $have)) (i32.const 16)) (i32.const 1)))
              (i32.const -1))
          (then (return (i32.const 0))))))
    (global.set $heap (local.get $end))
    (local.get $start))
"#;

/// What a hand-written proxy-wasm module exports besides its callbacks.
#[derive(Debug, Clone, Copy)]
pub struct WatShape<'a> {
    /// The ABI marker export, e.g. `proxy_abi_version_0_2_1`; `None` leaves it out.
    pub abi_marker: Option<&'a str>,
    /// Whether `proxy_on_memory_allocate` is exported.
    pub allocator: bool,
}

impl WatShape<'static> {
    /// A well-formed module for ABI 0.2.1.
    pub const V0_2_1: WatShape<'static> = WatShape {
        abi_marker: Some("proxy_abi_version_0_2_1"),
        allocator: true,
    };
}

/// The text of a proxy-wasm module: `imports` (WAT import fields), then two
/// pages of exported memory, the allocator and marker per `shape`, an empty
/// `proxy_on_context_create`, then `body` (functions, globals, data segments).
pub fn proxy_wat(imports: &str, shape: WatShape<'_>, body: &str) -> String {
    let marker = shape
        .abi_marker
        .map(|name| format!("  (func (export \"{name}\"))\n"))
        .unwrap_or_default();
    let allocator = if shape.allocator { WAT_ALLOCATOR } else { "" };
    format!(
        "(module\n{imports}\n  (memory (export \"memory\") 2)\n{marker}{allocator}\n  \
         (func (export \"proxy_on_context_create\") (param i32 i32))\n{body}\n)\n"
    )
}

/// A module path quoted for a YAML config.
pub fn yaml_path(path: &Path) -> String {
    format!("\"{}\"", path.display())
}

/// Where a test proxy's plugins go: HTTP listener `main` with `routes`,
/// `clusters` besides `echo`, and `plugins` (each item a YAML flow mapping,
/// e.g. `{ name: all, cluster: echo, filters: [guarded] }`), and
/// `listener_fields`, more fields of `main` as one YAML line (e.g.
/// `filters: [first]`) or empty.
#[derive(Debug, Clone, Copy)]
pub struct PluginRoutes<'a> {
    pub listener_fields: &'a str,
    pub routes: &'a [&'a str],
    pub clusters: &'a [&'a str],
    pub plugins: &'a [&'a str],
}

/// A proxy config for `routes`: admin on `127.0.0.1:0`, one worker, a 1 s
/// drain timeout, listener `main` on `127.0.0.1:0`, and cluster `echo` with
/// the one endpoint `echo`. Each `{name}` in the routes and plugins is
/// replaced with its value from `values` (see [`proxy::fill`]).
pub fn echo_proxy_yaml(
    echo: SocketAddr,
    routes: PluginRoutes<'_>,
    values: &[(&str, &dyn Display)],
) -> String {
    let items = |entries: &[&str], indent: &str| -> String {
        entries
            .iter()
            .map(|entry| format!("{indent}- {entry}\n"))
            .collect()
    };
    let listener_fields = match routes.listener_fields {
        "" => String::new(),
        fields => format!("    {fields}\n"),
    };
    let template = format!(
        "admin: {{ address: 127.0.0.1:0 }}
workers: 1
drain_timeout: 1s
listeners:
  - name: main
    address: 127.0.0.1:0
{listener_fields}    routes:
{}clusters:
  - {{ name: echo, endpoints: [\"{echo}\"] }}
{}plugins:
{}",
        items(routes.routes, "      "),
        items(routes.clusters, "  "),
        items(routes.plugins, "  "),
    );
    proxy::fill(&template, values)
}

/// An echo upstream and a proxy in front of it running wasm plugins; both
/// stop when this is dropped.
pub struct EchoProxy {
    pub proxy: ProxyHandle,
    pub echo: TestServer,
}

impl EchoProxy {
    /// Starts an echo upstream ([`servers::http_echo`]) and a proxy with the
    /// config [`echo_proxy_yaml`] writes for it.
    pub async fn start(routes: PluginRoutes<'_>, values: &[(&str, &dyn Display)]) -> Self {
        let echo = servers::http_echo().await;
        let proxy = proxy::start(&echo_proxy_yaml(echo.addr, routes, values));
        Self { proxy, echo }
    }

    /// `http://<listener main><path>`.
    pub fn url(&self, path: &str) -> String {
        proxy::url(&self.proxy, "main", path)
    }

    /// GET `path` on listener `main` with `headers`.
    pub async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        get_with(&self.url(path), headers).await
    }
}

/// GET `url` with `headers` (an empty body).
pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Response {
    let mut builder = Request::get(url);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    client::request(
        builder
            .body(Full::new(Bytes::new()))
            .expect("valid request"),
    )
    .await
}
