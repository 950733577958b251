//! Embeds the first-party filter modules that `cargo xtask build-filters` has
//! built (`target/wasm32-wasip1/wasm/<name>.wasm`). A module not built yet is
//! embedded as absent, so the host workspace builds without the wasm target.

use std::fmt::Write as _;
use std::path::PathBuf;

const FILTERS: &[&str] = &["authz", "headers", "ratelimit", "seal", "telemetry"];

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../../target"));
    let dir = target.join("wasm32-wasip1").join("wasm");
    let mut code = String::from(
        "/// Every first-party filter: name and module bytes, if built.\npub static MODULES: &[(&str, Option<&[u8]>)] = &[\n",
    );
    for name in FILTERS {
        let path = dir.join(format!("{name}.wasm"));
        println!("cargo:rerun-if-changed={}", path.display());
        if path.is_file() {
            let _ = writeln!(
                code,
                "    ({name:?}, Some(include_bytes!({:?}))),",
                path.display().to_string()
            );
        } else {
            let _ = writeln!(code, "    ({name:?}, None),");
        }
    }
    code.push_str("];\n");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default()).join("modules.rs");
    if let Err(e) = std::fs::write(&out, code) {
        panic!("cannot write {}: {e}", out.display());
    }
}
