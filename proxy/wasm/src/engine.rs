//! One wasmtime `Engine` per process: epoch interruption with one engine-wide
//! ticker thread (started with the first module, so a proxy without plugins
//! has none), and compiled modules cached by sha256 in memory and, as
//! precompiled artifacts, on disk (see [`artifacts`] for when one is trusted).

mod artifacts;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use wasmtime::{Config, Engine, Module};

use self::artifacts::ArtifactCache;
pub(crate) use self::artifacts::Refusal;

/// How often the ticker advances the epoch; callback deadlines are counted in
/// these ticks (see `plugin::deadline_ticks`): a deadline fires after its
/// timeout and less than two ticks later. 10 ms
/// rather than 1 ms: the ticker's thousand wake-ups a second took about 1.2%
/// of a core from a busy one-worker proxy (perf, telemetry plugin under load).
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(10);

/// The engine, its ticker and the module cache.
pub(crate) struct WasmEngine {
    pub engine: Engine,
    cache: Mutex<HashMap<[u8; 32], Module>>,
    artifacts: Option<ArtifactCache>,
    artifact_tag: String,
    stop_ticker: Arc<AtomicBool>,
    /// Set once the ticker runs, or why it could not start.
    ticker: OnceLock<Result<(), String>>,
}

/// Set to `1`, plugins' compiled code is listed in `/tmp/perf-<pid>.map`,
/// so `perf report` names the guest functions (see docs/sdk.md, "Profiling").
pub const PERFMAP_ENV: &str = "LACEWING_WASM_PERFMAP";

impl WasmEngine {
    /// Builds the engine; its epoch ticker starts with the first module.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, String> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        if std::env::var_os(PERFMAP_ENV).is_some_and(|v| v == "1") {
            // Names the JIT code of plugins in `perf report` (/tmp/perf-PID.map).
            config.profiler(wasmtime::ProfilingStrategy::PerfMap);
        }
        let engine = Engine::new(&config).map_err(|e| e.to_string())?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let artifact_tag = format!("wasmtime48-{:016x}", hasher.finish());
        Ok(Self {
            engine,
            cache: Mutex::new(HashMap::new()),
            artifacts: cache_dir.map(ArtifactCache::new),
            artifact_tag,
            stop_ticker: Arc::new(AtomicBool::new(false)),
            ticker: OnceLock::new(),
        })
    }

    /// Starts the thread that advances the epoch every [`EPOCH_TICK`], once.
    /// Code runs only in instances of a module, and every module comes from
    /// [`WasmEngine::module_from`], which calls this first: a proxy without
    /// plugins saves the ticker's thousand wake-ups a second.
    fn start_ticker(&self) -> Result<(), String> {
        self.ticker
            .get_or_init(|| {
                let engine = self.engine.clone();
                let stop = self.stop_ticker.clone();
                std::thread::Builder::new()
                    .name("wasm-epoch".into())
                    .spawn(move || {
                        while !stop.load(Ordering::Relaxed) {
                            std::thread::sleep(EPOCH_TICK);
                            engine.increment_epoch();
                        }
                    })
                    .map(drop)
                    .map_err(|e| format!("cannot start the epoch ticker: {e}"))
            })
            .clone()
    }

    /// The compiled module for `bytes` (whose digest is `sha256`), from memory,
    /// from the on-disk artifact, or freshly compiled (then saved).
    pub fn module(&self, sha256: &[u8; 32], bytes: &[u8]) -> Result<Module, String> {
        self.module_from(sha256, bytes).map(|(module, _)| module)
    }

    /// [`WasmEngine::module`], also saying where the module came from.
    pub(crate) fn module_from(
        &self,
        sha256: &[u8; 32],
        bytes: &[u8],
    ) -> Result<(Module, ModuleSource), String> {
        self.start_ticker()?;
        if let Some(m) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sha256)
        {
            return Ok((m.clone(), ModuleSource::Memory));
        }
        let name = format!("{}-{}.cwasm", hex(sha256), self.artifact_tag);
        let (module, source) = match self.load_artifact(&name) {
            Ok(m) => (m, ModuleSource::Disk),
            Err(refusal) => {
                let m = Module::new(&self.engine, bytes).map_err(|e| format!("{e:#}"))?;
                self.save_artifact(&m, &name);
                (m, ModuleSource::Compiled(refusal))
            }
        };
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(*sha256, module.clone());
        Ok((module, source))
    }

    /// The module of a trusted artifact; otherwise why none was used (logged
    /// unless the cache is off or simply has no artifact yet).
    fn load_artifact(&self, name: &str) -> Result<Module, Refusal> {
        let Some(cache) = &self.artifacts else {
            return Err(Refusal::Absent);
        };
        let refused = |reason: String| {
            tracing::warn!(
                artifact = name,
                "compiling the module instead of using its cached artifact: {reason}"
            );
            Refusal::Untrusted(reason)
        };
        let bytes = match cache.load(name) {
            Ok(bytes) => bytes,
            Err(Refusal::Untrusted(reason)) => return Err(refused(reason)),
            Err(Refusal::Absent) => return Err(Refusal::Absent),
        };
        // SAFETY: `Module::deserialize` maps `bytes` as native code. `cache.load`
        // returned them only after checking that the file is a regular 0600 file
        // of the proxy's user, alone in a directory that only this user can
        // access, and that the bytes read (the same ones passed here, not a
        // second read of the file) have the sha256 the proxy recorded when it
        // wrote the artifact with `Module::serialize` from this engine's
        // configuration. wasmtime also checks the header and refuses artifacts
        // of another version or configuration.
        #[allow(unsafe_code)]
        let module = unsafe { Module::deserialize(&self.engine, &bytes) };
        module.map_err(|e| refused(format!("wasmtime refused it: {e:#}")))
    }

    fn save_artifact(&self, module: &Module, name: &str) {
        let Some(cache) = &self.artifacts else {
            return;
        };
        let result = module
            .serialize()
            .map_err(|e| format!("{e:#}"))
            .and_then(|bytes| cache.store(name, &bytes));
        if let Err(e) = result {
            tracing::warn!(artifact = name, "cannot save module artifact: {e}");
        }
    }
}

/// Where [`WasmEngine::module_from`] found a module.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ModuleSource {
    /// Compiled earlier by this engine.
    Memory,
    /// Deserialized from a trusted on-disk artifact.
    Disk,
    /// Compiled now, because no artifact was usable.
    Compiled(Refusal),
}

impl Drop for WasmEngine {
    fn drop(&mut self) {
        self.stop_ticker.store(true, Ordering::Relaxed);
    }
}

/// Lower-case hex of bytes.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[(b >> 4) as usize] as char);
        s.push(DIGITS[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_ticker_starts_with_the_first_module() {
        let engine = WasmEngine::new(None).unwrap();
        assert!(engine.ticker.get().is_none(), "no module, no ticker");
        let bytes = crate::tests::module("", "");
        let sha = [7u8; 32];
        engine.module(&sha, &bytes).unwrap();
        // That it then advances the epoch is shown by
        // `tests::sandbox::infinite_loop_hits_deadline_and_vm_is_recreated`.
        assert_eq!(engine.ticker.get(), Some(&Ok(())));
    }
}
