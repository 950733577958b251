//! `cargo xtask bench`: the side-by-side proxy benchmark.
//!
//! The benchmark itself is `bench/run.sh` (it drives nginx, Envoy, wrk and
//! Lacewing as separate processes); this module only runs it from the
//! workspace root and passes the arguments through.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Context, Result, bail};

/// Runs `bench/run.sh` with `args` (e.g. `--rows direct,lacewing`, `--skip-setup`).
pub fn run(args: &[String]) -> Result<()> {
    let workspace_root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(PathBuf::from)
        .context("xtask has no parent directory")?;
    let script = workspace_root.join("bench").join("run.sh");
    let status = Command::new("bash")
        .arg(&script)
        .args(args)
        .current_dir(&workspace_root)
        .status()
        .with_context(|| format!("starting bash {}", script.display()))?;
    if !status.success() {
        bail!(
            "{} failed ({status}); see bench/results/latest.md and bench/work/",
            script.display()
        );
    }
    Ok(())
}
