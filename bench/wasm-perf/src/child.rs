//! What runs in a child process, so that nothing is warm in memory: one cold
//! start of the host with a module, or many VMs of one module for their RSS.
//! Each prints its figures as `key=value` lines for the parent to read.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use lacewing_config::PluginConfig;
use lacewing_core::callout::Upstreams;
use lacewing_core::filter::{HttpFilter, HttpFilterFactory};
use lacewing_core::metrics::Metrics;
use lacewing_core::stream::{HttpStream, SharedStream, StreamInfo};
use lacewing_wasm::{HostOptions, LogLevel, WasmHost, WasmPlugin};

use crate::procfs;

/// A plugin configuration for `module` with the default limits.
fn plugin_config(name: &str, module: &Path) -> anyhow::Result<PluginConfig> {
    let value = serde_json::json!({
        "name": name,
        "module": module.to_string_lossy(),
    });
    Ok(serde_json::from_value(value)?)
}

/// The proxy's callout target, with no clusters (the modules make no callouts).
fn no_clusters(metrics: &Metrics) -> anyhow::Result<Arc<dyn Upstreams>> {
    let upstreams: Arc<dyn Upstreams> = lacewing_upstream::Upstreams::new(&[], metrics)?;
    Ok(upstreams)
}

/// Times `WasmHost::new` and `load_plugin` (read, sha256, compile or load the
/// cached artifact, link, instantiate, `proxy_on_configure`) for `module` with
/// the on-disk cache in `cache_dir`.
pub fn cold_start(module: &Path, cache_dir: &Path) -> anyhow::Result<()> {
    let cached_before = count_artifacts(cache_dir);
    let metrics = Metrics::new();
    let upstreams = no_clusters(&metrics)?;
    let cfg = plugin_config("cold-start", module)?;

    let started = Instant::now();
    let host = WasmHost::new(HostOptions {
        cache_dir: Some(cache_dir.to_path_buf()),
        metrics,
        log_level: LogLevel::Warn,
    })?;
    let host_ready = Instant::now();
    let plugin = host.load_plugin(&cfg, upstreams)?;
    let loaded = Instant::now();

    println!("cached_before={cached_before}");
    println!("host_new_us={}", (host_ready - started).as_micros());
    println!("load_plugin_us={}", (loaded - host_ready).as_micros());
    println!("total_us={}", (loaded - started).as_micros());
    println!("artifact_bytes={}", artifact_bytes(cache_dir));
    drop(plugin);
    Ok(())
}

fn artifacts(cache_dir: &Path) -> Vec<std::fs::DirEntry> {
    std::fs::read_dir(cache_dir)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
                .collect()
        })
        .unwrap_or_default()
}

fn count_artifacts(cache_dir: &Path) -> usize {
    artifacts(cache_dir).len()
}

fn artifact_bytes(cache_dir: &Path) -> u64 {
    artifacts(cache_dir)
        .iter()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// A GET stream like the data plane makes for a request.
fn stream(i: usize) -> anyhow::Result<SharedStream> {
    let (parts, ()) = http::Request::builder()
        .method("GET")
        .uri("/")
        .header("host", "example.com")
        .header("x-request-id", format!("vm-{i}"))
        .body(())?
        .into_parts();
    let info = StreamInfo::new(
        i as u64,
        "127.0.0.1:50000".parse()?,
        "127.0.0.1:8080".parse()?,
        Arc::from("main"),
    );
    Ok(HttpStream::new(info, parts).shared())
}

/// Loads `vms + 1` plugins of `module` (each plugin gets its own VM on a
/// worker; the module comes from the artifact in `cache_dir` when there is
/// one, so no compiler garbage is left on the heap), then on one worker-like thread (current-thread runtime and
/// `LocalSet`) starts the first plugin's VM as a warm-up, samples memory,
/// starts the other `vms` VMs by creating one HTTP filter each (keeping them
/// alive), and samples again.
pub fn vm_memory(module: &Path, vms: usize, cache_dir: Option<&Path>) -> anyhow::Result<()> {
    let bytes = std::fs::read(module).with_context(|| format!("reading {}", module.display()))?;
    let metrics = Metrics::new();
    let upstreams = no_clusters(&metrics)?;
    let host = WasmHost::new(HostOptions {
        cache_dir: cache_dir.map(Path::to_path_buf),
        metrics,
        log_level: LogLevel::Warn,
    })?;
    let plugins: Vec<Arc<WasmPlugin>> = (0..=vms)
        .map(|i| {
            let cfg = plugin_config(&format!("vm-{i}"), module)?;
            Ok(host.load_plugin_bytes(&cfg, &bytes, upstreams.clone())?)
        })
        .collect::<anyhow::Result<_>>()?;
    let streams: Vec<SharedStream> = (0..=vms).map(stream).collect::<anyhow::Result<_>>()?;

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async {
        let mut filters: Vec<Box<dyn HttpFilter>> = Vec::with_capacity(vms + 1);
        filters.push(create(&plugins[0], &streams[0])?);
        let before = procfs::sample()?;
        for (plugin, stream) in plugins.iter().zip(&streams).skip(1) {
            filters.push(create(plugin, stream)?);
        }
        let after = procfs::sample()?;
        anyhow::ensure!(
            after.linear_memories >= before.linear_memories + vms as u64,
            "expected {vms} more linear memories, found {} before and {} after",
            before.linear_memories,
            after.linear_memories
        );
        println!("vms={vms}");
        println!("rss_before_kib={}", before.rss_kib);
        println!("rss_after_kib={}", after.rss_kib);
        println!(
            "vm_size_kib={}",
            after.vm_size_kib.saturating_sub(before.vm_size_kib)
        );
        println!(
            "heap_kib={}",
            after.heap_kib.saturating_sub(before.heap_kib)
        );
        println!("linear_memories_before={}", before.linear_memories);
        println!("linear_memories_after={}", after.linear_memories);
        println!(
            "linear_size_kib={}",
            after.linear_size_kib.saturating_sub(before.linear_size_kib)
        );
        println!(
            "linear_rss_kib={}",
            after.linear_rss_kib.saturating_sub(before.linear_rss_kib)
        );
        drop(filters);
        Ok(())
    })
}

/// One filter of `plugin`, which starts its VM on this thread.
fn create(plugin: &WasmPlugin, stream: &SharedStream) -> anyhow::Result<Box<dyn HttpFilter>> {
    HttpFilterFactory::create(plugin, stream)
        .with_context(|| format!("plugin {} took no part in the stream", plugin.name()))
}
