//! One wasmtime `Engine` per process: epoch interruption with one engine-wide
//! ticker thread, and compiled modules cached by sha256 in memory and, as
//! precompiled artifacts, on disk.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use wasmtime::{Config, Engine, Module};

/// How often the ticker advances the epoch; callback deadlines are counted in these ticks.
pub(crate) const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The engine, its ticker and the module cache.
pub(crate) struct WasmEngine {
    pub engine: Engine,
    cache: Mutex<HashMap<[u8; 32], Module>>,
    cache_dir: Option<PathBuf>,
    artifact_tag: String,
    stop_ticker: Arc<AtomicBool>,
}

impl WasmEngine {
    /// Builds the engine and starts the epoch ticker.
    pub fn new(cache_dir: Option<PathBuf>) -> Result<Self, String> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        let engine = Engine::new(&config).map_err(|e| e.to_string())?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        engine.precompile_compatibility_hash().hash(&mut hasher);
        let artifact_tag = format!("wasmtime48-{:016x}", hasher.finish());
        let stop_ticker = Arc::new(AtomicBool::new(false));
        let ticker_engine = engine.clone();
        let stop = stop_ticker.clone();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(EPOCH_TICK);
                    ticker_engine.increment_epoch();
                }
            })
            .map_err(|e| format!("cannot start the epoch ticker: {e}"))?;
        Ok(Self {
            engine,
            cache: Mutex::new(HashMap::new()),
            cache_dir,
            artifact_tag,
            stop_ticker,
        })
    }

    /// The compiled module for `bytes` (whose digest is `sha256`), from memory,
    /// from the on-disk artifact, or freshly compiled (then saved).
    pub fn module(&self, sha256: &[u8; 32], bytes: &[u8]) -> Result<Module, String> {
        if let Some(m) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sha256)
        {
            return Ok(m.clone());
        }
        let artifact = self
            .cache_dir
            .as_ref()
            .map(|dir| dir.join(format!("{}-{}.cwasm", hex(sha256), self.artifact_tag)));
        let module = match artifact.as_deref().and_then(|p| self.load_artifact(p)) {
            Some(m) => m,
            None => {
                let m = Module::new(&self.engine, bytes).map_err(|e| format!("{e:#}"))?;
                if let Some(path) = artifact.as_deref() {
                    save_artifact(&m, path);
                }
                m
            }
        };
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(*sha256, module.clone());
        Ok(module)
    }

    fn load_artifact(&self, path: &Path) -> Option<Module> {
        if !path.is_file() {
            return None;
        }
        // SAFETY: the file is an artifact this host wrote with `Module::serialize`
        // into its own cache directory, named by the module digest and by the
        // engine's compatibility hash; wasmtime also checks the header and
        // rejects artifacts of another version or configuration.
        match unsafe { Module::deserialize_file(&self.engine, path) } {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring unusable module artifact: {e}");
                None
            }
        }
    }
}

fn save_artifact(module: &Module, path: &Path) {
    let result = module
        .serialize()
        .map_err(|e| e.to_string())
        .and_then(|bytes| {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            }
            // Write then rename, so a concurrent reader never sees a partial file.
            let tmp = path.with_extension(format!("tmp{}", std::process::id()));
            std::fs::write(&tmp, bytes).map_err(|e| e.to_string())?;
            std::fs::rename(&tmp, path).map_err(|e| e.to_string())
        });
    if let Err(e) = result {
        tracing::warn!(path = %path.display(), "cannot save module artifact: {e}");
    }
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
