//! Lacewing's first-party filters as embedded wasm modules, so a `lacewing`
//! binary that depends on this crate ships them and a configuration can name
//! a filter (`authz`, `telemetry`, …) instead of a module file.
//!
//! The modules are the ones `cargo xtask build-filters` built before this
//! crate was compiled; a filter not built then is absent ([`builtin`] returns
//! `None`). Build order for a release: `cargo xtask build-filters`, then
//! `cargo build --release`. They are loaded, sandboxed and reloaded exactly as
//! user modules are: this crate only supplies the bytes.

include!(concat!(env!("OUT_DIR"), "/modules.rs"));

/// The names of the first-party filters.
pub fn names() -> impl Iterator<Item = &'static str> {
    MODULES.iter().map(|(name, _)| *name)
}

/// The module bytes of first-party filter `name`; `None` for an unknown name
/// or a filter that was not built when this crate was compiled.
pub fn builtin(name: &str) -> Option<&'static [u8]> {
    MODULES
        .iter()
        .find(|(n, _)| *n == name)
        .and_then(|(_, bytes)| *bytes)
}

/// Writes every embedded module to `dir` as `<name>.wasm` (for configurations
/// that name module files); returns the paths written.
pub fn install(dir: &std::path::Path) -> std::io::Result<Vec<std::path::PathBuf>> {
    std::fs::create_dir_all(dir)?;
    let mut written = Vec::new();
    for (name, bytes) in MODULES {
        if let Some(bytes) = bytes {
            let path = dir.join(format!("{name}.wasm"));
            std::fs::write(&path, bytes)?;
            written.push(path);
        }
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_crate_is_listed() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../filters");
        let mut crates: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "header-echo")
            .collect();
        crates.sort();
        assert_eq!(crates, names().collect::<Vec<_>>());
        assert_eq!(builtin("no-such-filter"), None);
    }
}
