//! Errors of loading and running plugins.

/// Why a plugin could not be loaded, or a host not started.
#[derive(Debug, thiserror::Error)]
pub enum WasmError {
    /// The module file could not be read.
    #[error("plugin `{plugin}`: cannot read module {path}: {source}")]
    Read {
        plugin: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The module's sha256 is not the pinned one.
    #[error("plugin `{plugin}`: module sha256 is {actual}, expected {expected}")]
    Sha256Mismatch {
        plugin: String,
        expected: String,
        actual: String,
    },
    /// The bytes are not a valid wasm module.
    #[error("plugin `{plugin}`: cannot compile module: {reason}")]
    Compile { plugin: String, reason: String },
    /// The module needs something the host does not provide.
    #[error("plugin `{plugin}`: {reason}")]
    Link { plugin: String, reason: String },
    /// Instantiating or starting the plugin failed (trap, `false` from a start callback).
    #[error("plugin `{plugin}`: {reason}")]
    Start { plugin: String, reason: String },
    /// The wasm engine could not be set up.
    #[error("wasm engine: {0}")]
    Engine(String),
}
