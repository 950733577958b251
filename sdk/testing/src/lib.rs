//! Runs a built proxy-wasm `.wasm` in the real Lacewing host (`lacewing-wasm`)
//! from an ordinary `cargo test`: load it with a configuration, drive streams
//! phase by phase, answer its callouts from a real loopback upstream
//! ([`TestUpstream`]), let its timers tick, and read what a user would see:
//! the local reply, the headers sent on, `/metrics`, the log.
//!
//! ```no_run
//! use lacewing_filter_test::{FilterTest, Verdict};
//!
//! let test = FilterTest::builder(lacewing_filter_test::module("authz")?)
//!     .configuration(serde_json::json!({"rules": []}))
//!     .load()?;
//! let mut s = test.stream(http::Request::get("/admin").body(()).unwrap());
//! s.set_property("source.principal", "spiffe://mesh.local/ns/default/sa/web");
//! match s.request_headers(true) {
//!     Verdict::Replied(reply) => assert_eq!(reply.status, 403),
//!     other => panic!("expected a 403, got {other:?}"),
//! }
//! # Ok::<(), lacewing_filter_test::HarnessError>(())
//! ```
//!
//! Works for any proxy-wasm module (the official `proxy-wasm` crate's
//! included): it talks to the module only through the host.

mod logs;
mod upstream;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use lacewing_config::{ClusterConfig, PluginConfig};
use lacewing_core::filter::{FilterStatus, HttpFilter, HttpFilterFactory};
use lacewing_core::metrics::Metrics;
use lacewing_core::stream::{HttpStream, SharedStream, StreamInfo};
use lacewing_wasm::{HostOptions, LogLevel, WasmError, WasmHost, WasmPlugin};
use tokio::task::LocalSet;
use tracing_subscriber::layer::SubscriberExt;

pub use logs::LogLine;
pub use upstream::{Received, TestUpstream};

/// Why a test could not get a running plugin.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot build the module: {0}")]
    Build(String),
    #[error("invalid test setup: {0}")]
    Setup(String),
    /// The host refused the plugin; `logs` are the errors it logged while loading.
    #[error("{error}; plugin logged: {}", logs.join(" | "))]
    Rejected { error: WasmError, logs: Vec<String> },
}

/// Builds the wasm crate `crate_name` of the current workspace (once per test
/// process) with `cargo build --target wasm32-wasip1 --profile wasm -p
/// <crate_name>`, as `cargo xtask build-filters` does, and returns its `.wasm`.
pub fn module(crate_name: &str) -> Result<PathBuf, HarnessError> {
    static BUILT: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let built = BUILT.get_or_init(Mutex::default);
    let mut built = built.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(p) = built.get(crate_name) {
        return Ok(p.clone());
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(&cargo)
        .args([
            "build",
            "--target",
            "wasm32-wasip1",
            "--profile",
            "wasm",
            "-p",
            crate_name,
        ])
        .output()
        .map_err(|e| HarnessError::Build(format!("cannot run cargo: {e}")))?;
    if !output.status.success() {
        return Err(HarnessError::Build(format!(
            "building `{crate_name}` failed:\n{}",
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let file = format!("{}.wasm", crate_name.replace('-', "_"));
    let path = target_dir()?.join("wasm32-wasip1/wasm").join(file);
    if !path.is_file() {
        return Err(HarnessError::Build(format!(
            "{} was not built",
            path.display()
        )));
    }
    built.insert(crate_name.to_string(), path.clone());
    Ok(path)
}

/// `CARGO_TARGET_DIR`, or `target/` of the nearest ancestor whose Cargo.toml has `[workspace]`.
fn target_dir() -> Result<PathBuf, HarnessError> {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let cwd = std::env::current_dir().map_err(|e| HarnessError::Build(e.to_string()))?;
    cwd.ancestors()
        .find(|d| {
            std::fs::read_to_string(d.join("Cargo.toml")).is_ok_and(|t| t.contains("[workspace]"))
        })
        .map(|d| d.join("target"))
        .ok_or_else(|| HarnessError::Build("no cargo workspace above the current directory".into()))
}

/// Builds a [`FilterTest`].
#[derive(Debug)]
pub struct Builder {
    module: PathBuf,
    name: String,
    configuration: Option<serde_json::Value>,
    clusters: Vec<(String, SocketAddr, &'static str)>,
}

impl Builder {
    /// The plugin configuration (a JSON value; a JSON string is passed as its text).
    pub fn configuration(mut self, configuration: serde_json::Value) -> Self {
        self.configuration = Some(configuration);
        self
    }

    /// The plugin's name (default `test`).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.into();
        self
    }

    /// A cluster the plugin may call out to.
    pub fn cluster(mut self, name: &str, addr: SocketAddr) -> Self {
        self.clusters.push((name.into(), addr, "http1"));
        self
    }

    /// A cluster spoken to over HTTP/2 without TLS, for gRPC callouts.
    pub fn grpc_cluster(mut self, name: &str, addr: SocketAddr) -> Self {
        self.clusters.push((name.into(), addr, "h2"));
        self
    }

    /// Loads the module into a fresh host: compile, link, `on_vm_start`, `on_configure`.
    pub fn load(self) -> Result<FilterTest, HarnessError> {
        let bytes = std::fs::read(&self.module).map_err(|source| HarnessError::Read {
            path: self.module.clone(),
            source,
        })?;
        let capture = logs::Capture::default();
        let subscriber = tracing_subscriber::registry().with(capture.clone());
        let guard = tracing::subscriber::set_default(subscriber);
        let metrics = Metrics::new();
        let host = WasmHost::new(HostOptions {
            // Compiled modules are kept across test processes (keyed by sha256).
            cache_dir: Some(std::env::temp_dir().join("lacewing-filter-test-cache")),
            metrics: metrics.clone(),
            log_level: LogLevel::Trace,
        })
        .map_err(|error| HarnessError::Rejected {
            error,
            logs: Vec::new(),
        })?;
        let mut cfg = serde_json::json!({
            "name": self.name,
            "module": self.module.display().to_string(),
        });
        if let Some(c) = self.configuration {
            cfg["configuration"] = c;
        }
        let cfg: PluginConfig =
            serde_json::from_value(cfg).map_err(|e| HarnessError::Setup(e.to_string()))?;
        let clusters: Vec<ClusterConfig> = self
            .clusters
            .iter()
            .map(|(name, addr, protocol)| {
                serde_json::from_value(serde_json::json!({
                    "name": name, "endpoints": [addr.to_string()], "protocol": protocol
                }))
                .map_err(|e| HarnessError::Setup(e.to_string()))
            })
            .collect::<Result<_, _>>()?;
        let upstreams = lacewing_upstream::Upstreams::new(&clusters, &metrics)
            .map_err(|e| HarnessError::Setup(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| HarnessError::Setup(e.to_string()))?;
        let local = LocalSet::new();
        let loaded = local.block_on(&rt, async {
            host.load_plugin_bytes(&cfg, &bytes, upstreams)
        });
        let plugin = loaded.map_err(|error| HarnessError::Rejected {
            error,
            logs: capture
                .lines()
                .into_iter()
                .filter(|l| l.level <= tracing::Level::WARN)
                .map(|l| l.message)
                .collect(),
        })?;
        Ok(FilterTest {
            host,
            metrics,
            plugin,
            rt,
            local,
            capture,
            _guard: guard,
        })
    }
}

/// A plugin loaded into a real host, with the worker runtime its callouts and
/// timers run on (this thread).
pub struct FilterTest {
    host: Arc<WasmHost>,
    metrics: Metrics,
    plugin: Arc<WasmPlugin>,
    rt: tokio::runtime::Runtime,
    local: LocalSet,
    capture: logs::Capture,
    _guard: tracing::subscriber::DefaultGuard,
}

impl std::fmt::Debug for FilterTest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FilterTest")
            .field("plugin", &self.plugin.name())
            .finish_non_exhaustive()
    }
}

impl FilterTest {
    /// A test of the module file at `module` (see [`module`] to build one).
    pub fn builder(module: impl Into<PathBuf>) -> Builder {
        Builder {
            module: module.into(),
            name: "test".into(),
            configuration: None,
            clusters: Vec::new(),
        }
    }

    /// A new stream for `request` (client 127.0.0.1:50000 → 127.0.0.1:8080);
    /// the filter is created when the first phase runs.
    pub fn stream(&self, request: http::Request<()>) -> Stream<'_> {
        let (parts, ()) = request.into_parts();
        let remote: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 50000));
        let local: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080));
        let mut info = StreamInfo::new(1, remote, local, Arc::from("test"));
        info.route_name = Some(Arc::from("test-route"));
        info.cluster_name = Some(Arc::from("test-cluster"));
        Stream {
            test: self,
            stream: HttpStream::new(info, parts).shared(),
            filter: None,
            forwarded_request_body: Vec::new(),
            forwarded_response_body: Vec::new(),
        }
    }

    /// Runs the worker for `d`: timers tick, callouts complete. As in the
    /// proxy, the worker's VM (and so its tick timer) starts with the first
    /// stream, not at load.
    pub fn run_for(&self, d: Duration) {
        self.local
            .block_on(&self.rt, async { tokio::time::sleep(d).await });
    }

    /// The `/metrics` text of the host's registry.
    pub fn metrics_text(&self) -> String {
        self.metrics.render()
    }

    /// The value of the plugin metric `name` (counter, gauge, or a histogram's count).
    pub fn metric(&self, name: &str) -> Option<f64> {
        let label = format!(
            "name=\"{}\"",
            name.replace('\\', "\\\\").replace('"', "\\\"")
        );
        self.metrics_text().lines().find_map(|line| {
            let is_sample = line.starts_with("lacewing_wasm_plugin_counter{")
                || line.starts_with("lacewing_wasm_plugin_gauge{")
                || line.starts_with("lacewing_wasm_plugin_histogram_count{");
            if !is_sample || !line.contains(&label) {
                return None;
            }
            line.rsplit(' ').next()?.parse().ok()
        })
    }

    /// Every line the plugin logged so far.
    pub fn logs(&self) -> Vec<LogLine> {
        self.capture.lines()
    }

    /// A shared-data value, as the plugin stored it.
    pub fn shared_data(&self, key: &str) -> Option<Bytes> {
        self.host.shared_data().get(key.as_bytes()).map(|(v, _)| v)
    }

    fn on_worker<T>(&self, f: impl FnOnce() -> T) -> T {
        self.local.block_on(&self.rt, async { f() })
    }
}

/// A local reply the filter sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub details: String,
}

impl Reply {
    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// What the data plane does after a phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The stream goes on.
    Continue,
    /// The filter paused the stream (waiting for a callout).
    Paused,
    /// The filter asked to buffer the body.
    Buffering,
    /// The filter took the body chunk without buffering it (proxy-wasm's
    /// StopIterationNoBuffer): it is neither forwarded nor kept.
    Holding,
    /// The filter answered locally.
    Replied(Reply),
    /// The filter reset the stream.
    Reset,
}

/// The local reply a filter set on the stream, taken as the client would get it.
fn take_reply(s: &mut HttpStream) -> Option<Reply> {
    s.local_reply.take().map(|reply| Reply {
        status: reply.status.as_u16(),
        headers: reply.headers,
        body: reply.body,
        details: reply.details,
    })
}

/// Which way a body flows.
#[derive(Debug, Clone, Copy)]
enum Direction {
    Request,
    Response,
}

/// One HTTP stream through the plugin.
pub struct Stream<'t> {
    test: &'t FilterTest,
    stream: SharedStream,
    filter: Option<Box<dyn HttpFilter>>,
    forwarded_request_body: Vec<u8>,
    forwarded_response_body: Vec<u8>,
}

impl std::fmt::Debug for Stream<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").finish_non_exhaustive()
    }
}

impl Stream<'_> {
    /// Sets a property the filter reads, e.g. `source.principal` (the peer's
    /// SPIFFE id, which the data plane sets from the client certificate).
    pub fn set_property(&mut self, path: &str, value: &str) -> &mut Self {
        self.stream
            .borrow_mut()
            .filter_state
            .insert(path.to_string(), Bytes::copy_from_slice(value.as_bytes()));
        self
    }

    fn run(
        &mut self,
        f: impl FnOnce(&mut dyn HttpFilter, &SharedStream) -> FilterStatus,
    ) -> Verdict {
        let test = self.test;
        let stream = self.stream.clone();
        let filter = &mut self.filter;
        let status = test.on_worker(|| {
            if filter.is_none() {
                *filter = HttpFilterFactory::create(&*test.plugin, &stream);
            }
            match filter.as_mut() {
                Some(f_) => f(f_.as_mut(), &stream),
                None => FilterStatus::Continue,
            }
        });
        let mut s = self.stream.borrow_mut();
        if let Some(reply) = take_reply(&mut s) {
            return Verdict::Replied(reply);
        }
        if s.reset {
            return Verdict::Reset;
        }
        match status {
            FilterStatus::Continue => Verdict::Continue,
            FilterStatus::StopIteration => Verdict::Paused,
            FilterStatus::StopAndBuffer => Verdict::Buffering,
            FilterStatus::StopNoBuffer => Verdict::Holding,
        }
    }

    /// Runs the request-headers phase.
    pub fn request_headers(&mut self, end_of_stream: bool) -> Verdict {
        self.run(|f, s| f.on_request_headers(s, end_of_stream))
    }

    /// Delivers a request body chunk. Bytes the filter lets through (on
    /// `Continue`) are collected in [`Stream::forwarded_request_body`].
    pub fn request_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Verdict {
        self.body(chunk, end_of_stream, Direction::Request)
    }

    /// Buffers `chunk` in one direction's body, runs that body phase, and
    /// moves the buffer to what went on when the filter continues.
    fn body(&mut self, chunk: &[u8], end_of_stream: bool, dir: Direction) -> Verdict {
        fn buffer(s: &mut HttpStream, dir: Direction) -> &mut bytes::BytesMut {
            match dir {
                Direction::Request => &mut s.request_body,
                Direction::Response => &mut s.response_body,
            }
        }
        buffer(&mut self.stream.borrow_mut(), dir).extend_from_slice(chunk);
        let v = self.run(|f, s| match dir {
            Direction::Request => f.on_request_body(s, end_of_stream),
            Direction::Response => f.on_response_body(s, end_of_stream),
        });
        if v == Verdict::Holding {
            // The chunk was taken: nothing of it stays for the next call.
            buffer(&mut self.stream.borrow_mut(), dir).clear();
        }
        if v == Verdict::Continue {
            let data = buffer(&mut self.stream.borrow_mut(), dir).split();
            match dir {
                Direction::Request => self.forwarded_request_body.extend_from_slice(&data),
                Direction::Response => self.forwarded_response_body.extend_from_slice(&data),
            }
        }
        v
    }

    /// Delivers request trailers.
    pub fn request_trailers(&mut self, trailers: http::HeaderMap) -> Verdict {
        self.stream.borrow_mut().request_trailers = Some(trailers);
        self.run(|f, s| f.on_request_trailers(s))
    }

    /// Delivers the upstream's response head and runs the response-headers phase.
    pub fn response_headers(
        &mut self,
        response: http::Response<()>,
        end_of_stream: bool,
    ) -> Verdict {
        let (parts, ()) = response.into_parts();
        {
            let mut s = self.stream.borrow_mut();
            s.info.response_code = Some(parts.status.as_u16());
            s.response = Some(parts);
        }
        self.run(|f, s| f.on_response_headers(s, end_of_stream))
    }

    /// Delivers a response body chunk (see [`Stream::request_body`]).
    pub fn response_body(&mut self, chunk: &[u8], end_of_stream: bool) -> Verdict {
        self.body(chunk, end_of_stream, Direction::Response)
    }

    /// Ends the stream: the log phase runs and the filter is dropped.
    pub fn finish(&mut self) {
        let test = self.test;
        let stream = self.stream.clone();
        if let Some(mut f) = self.filter.take() {
            test.on_worker(|| {
                f.on_log(&stream);
                drop(f);
            });
        }
    }

    /// Waits (running the worker) until the filter resumes the paused stream,
    /// or `limit` passes. Returns the verdict then: `Continue` if resumed,
    /// `Replied` if the filter answered locally instead, `Paused` if neither.
    pub fn wait_resumed(&mut self, limit: Duration) -> Verdict {
        let resumed = self.stream.borrow().resumed();
        let stream = self.stream.clone();
        let done = self.test.local.block_on(&self.test.rt, async move {
            tokio::select! {
                () = resumed.notified() => true,
                () = async {
                    // A local reply from a continuation ends the wait too.
                    while stream.borrow().local_reply.is_none() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                } => true,
                () = tokio::time::sleep(limit) => false,
            }
        });
        let mut s = self.stream.borrow_mut();
        if let Some(reply) = take_reply(&mut s) {
            return Verdict::Replied(reply);
        }
        if done {
            Verdict::Continue
        } else {
            Verdict::Paused
        }
    }

    /// A request header as it goes upstream.
    pub fn request_header(&self, name: &str) -> Option<String> {
        let s = self.stream.borrow();
        s.request
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// Every value of a request header, in order.
    pub fn request_header_all(&self, name: &str) -> Vec<String> {
        let s = self.stream.borrow();
        s.request
            .headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_string))
            .collect()
    }

    /// A response header as it goes downstream.
    pub fn response_header(&self, name: &str) -> Option<String> {
        let s = self.stream.borrow();
        s.response
            .as_ref()?
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    /// The request body bytes let through so far.
    pub fn forwarded_request_body(&self) -> &[u8] {
        &self.forwarded_request_body
    }

    /// The response body bytes let through so far.
    pub fn forwarded_response_body(&self) -> &[u8] {
        &self.forwarded_response_body
    }
}

impl Drop for Stream<'_> {
    fn drop(&mut self) {
        self.finish();
    }
}
