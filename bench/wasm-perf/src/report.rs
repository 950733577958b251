//! The markdown report: the machine, one table per figure, the targets and the method.

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

/// Target: cold start of a 2 MB module from the on-disk cache, in microseconds (exclusive).
const COLD_START_TARGET_US: u64 = 50_000;
/// Target: VM overhead beyond linear memory, in KiB (2 MiB, inclusive).
const VM_OVERHEAD_TARGET_KIB: f64 = 2048.0;

/// Cold-start figures of one module.
pub struct ColdStart {
    /// First load into an empty cache (compile and write the artifact), in-process time.
    pub first_total_us: u64,
    /// The same, as wall time of the whole child process.
    pub first_wall_us: u64,
    pub artifact_bytes: u64,
    /// Loads from the cache: (`WasmHost::new`, `load_plugin`, both, process wall) in µs.
    pub cached: Vec<Timing>,
    /// The same with the module and artifact files evicted from the page cache first.
    pub evicted: Vec<Timing>,
}

/// One cold start: (`WasmHost::new`, `load_plugin`, both, process wall) in µs.
pub type Timing = (u64, u64, u64, u64);

/// Memory of `vms` extra VMs of one module.
pub struct VmMemory {
    pub vms: u64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    /// Virtual address space the VMs added.
    pub vm_size_kib: u64,
    /// Rust heap bytes the VMs added, in KiB.
    pub heap_kib: u64,
    /// Accessible linear memory the VMs added.
    pub linear_size_kib: u64,
    /// Resident linear memory the VMs added.
    pub linear_rss_kib: u64,
}

impl VmMemory {
    fn per_vm(&self, kib: u64) -> f64 {
        kib as f64 / self.vms.max(1) as f64
    }
    fn rss_per_vm(&self) -> f64 {
        self.per_vm(self.rss_after_kib.saturating_sub(self.rss_before_kib))
    }
    /// RSS per VM beyond its accessible linear memory (the whole memory, resident or not).
    fn beyond_linear_size(&self) -> f64 {
        self.rss_per_vm() - self.per_vm(self.linear_size_kib)
    }
    /// RSS per VM beyond its resident linear memory pages.
    fn beyond_linear_rss(&self) -> f64 {
        self.rss_per_vm() - self.per_vm(self.linear_rss_kib)
    }
}

/// All figures of one module.
pub struct ModuleFigures {
    pub label: String,
    pub origin: String,
    pub bytes: u64,
    pub initial_pages: Option<u64>,
    pub cold: ColdStart,
    pub vm: VmMemory,
}

/// The whole report.
pub struct Report {
    modules: Vec<ModuleFigures>,
    notes: Vec<String>,
    runs: usize,
    vms: usize,
}

fn median(mut values: Vec<u64>) -> u64 {
    values.sort_unstable();
    match values.len() {
        0 => 0,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2,
    }
}

fn ms(us: u64) -> String {
    format!("{:.1}", us as f64 / 1000.0)
}

fn size(bytes: u64) -> String {
    if bytes >= 1024 * 1024 {
        format!("{:.2} MiB ({bytes} B)", bytes as f64 / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB ({bytes} B)", bytes as f64 / 1024.0)
    }
}

/// `YYYY-MM-DD HH:MM UTC` for a Unix time (proleptic Gregorian calendar).
fn utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

impl Report {
    pub fn new(modules: Vec<ModuleFigures>, notes: Vec<String>, runs: usize, vms: usize) -> Self {
        Self {
            modules,
            notes,
            runs,
            vms,
        }
    }

    pub fn markdown(&self) -> String {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
        let mut o = String::new();
        let _ = writeln!(o, "# Wasm host figures\n");
        let _ = writeln!(
            o,
            "Measured {} on {cores} cores ({}), load average at the end {}; wasmtime 48 with \
             Lacewing's engine configuration. Command: `cargo run --release -p wasm-perf` \
             (see bench/README.md, \"Wasm host figures\").\n",
            utc(now),
            cpu_model(),
            load_average()
        );

        let _ = writeln!(o, "## Targets\n");
        let _ = writeln!(o, "| Target | Measured | Verdict |\n|---|---|---|");
        if let Some(big) = self.modules.iter().find(|m| m.bytes >= 2 * 1024 * 1024) {
            let warm = median(big.cold.cached.iter().map(|c| c.2).collect());
            let evicted = median(big.cold.evicted.iter().map(|c| c.2).collect());
            let _ = writeln!(
                o,
                "| cold start of a 2 MB module from the on-disk cache < 50 ms | {} ms with the artifact in the page cache, {} ms read from disk ({}, {}) | {} |",
                ms(warm),
                ms(evicted),
                big.label,
                size(big.bytes),
                if warm.max(evicted) < COLD_START_TARGET_US {
                    "met"
                } else {
                    "**missed**"
                }
            );
        }
        for m in &self.modules {
            let overhead = m.vm.beyond_linear_rss();
            let _ = writeln!(
                o,
                "| VM instance overhead ≤ 2 MB beyond its linear memory ({}) | {:.0} KiB | {} |",
                m.label,
                overhead,
                if overhead <= VM_OVERHEAD_TARGET_KIB {
                    "met"
                } else {
                    "**missed**"
                }
            );
        }

        let _ = writeln!(o, "\n## Cold start\n");
        let _ = writeln!(
            o,
            "Milliseconds: `WasmHost::new` through `load_plugin` returning, in a fresh process; the \
             median of {} processes (min–max in brackets). \"Page cache\": the artifact file was \
             read recently; \"disk\": the module and artifact files were evicted from the page cache \
             just before (`POSIX_FADV_DONTNEED`), as after a reboot.\n",
            self.runs
        );
        let _ = writeln!(
            o,
            "| Module | Size | Artifact | First load: compile + write | From cache (page cache) | of which `WasmHost::new` | of which `load_plugin` | whole process | From cache (disk) | whole process |\n|---|---|---|---|---|---|---|---|---|---|"
        );
        for m in &self.modules {
            let c = &m.cold;
            let spread = |timings: &[Timing]| -> String {
                let totals: Vec<u64> = timings.iter().map(|t| t.2).collect();
                let lo = totals.iter().copied().min().unwrap_or(0);
                let hi = totals.iter().copied().max().unwrap_or(0);
                format!("**{}** ({}–{})", ms(median(totals)), ms(lo), ms(hi))
            };
            let med = |timings: &[Timing], f: fn(&Timing) -> u64| -> String {
                ms(median(timings.iter().map(f).collect()))
            };
            let _ = writeln!(
                o,
                "| {} | {} | {} | {} (process {}) | {} | {} | {} | {} | {} | {} |",
                m.label,
                size(m.bytes),
                size(c.artifact_bytes),
                ms(c.first_total_us),
                ms(c.first_wall_us),
                spread(&c.cached),
                med(&c.cached, |t| t.0),
                med(&c.cached, |t| t.1),
                med(&c.cached, |t| t.3),
                spread(&c.evicted),
                med(&c.evicted, |t| t.3),
            );
        }

        let _ = writeln!(o, "\n## VM instance memory\n");
        let _ = writeln!(
            o,
            "KiB per VM, from {} extra VMs of each module in one process.\n",
            self.vms
        );
        let _ = writeln!(
            o,
            "| Module | Initial memory | RSS added per VM | Linear memory per VM: accessible / resident | Overhead: RSS − resident linear memory | RSS − whole linear memory | Rust heap per VM | Address space per VM |\n|---|---|---|---|---|---|---|---|"
        );
        for m in &self.modules {
            let v = &m.vm;
            let initial = m
                .initial_pages
                .map(|p| format!("{p} pages ({} KiB)", p * 64))
                .unwrap_or_else(|| "n/a".into());
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {:.0} / {:.0} | **{:.0}** | {:.0} | {:.1} | {:.1} GiB |",
                m.label,
                initial,
                v.rss_per_vm(),
                v.per_vm(v.linear_size_kib),
                v.per_vm(v.linear_rss_kib),
                v.beyond_linear_rss(),
                v.beyond_linear_size(),
                v.per_vm(v.heap_kib),
                v.per_vm(v.vm_size_kib) / (1024.0 * 1024.0),
            );
        }

        let _ = writeln!(o, "\n## Modules\n");
        for m in &self.modules {
            let _ = writeln!(o, "- {}: {}, {}.", m.label, size(m.bytes), m.origin);
        }
        for n in &self.notes {
            let _ = writeln!(o, "- Note: {n}.");
        }
        let _ = writeln!(o, "\n## Method\n");
        o.push_str(METHOD);
        o
    }
}

const METHOD: &str = "\
- Every measurement runs in a fresh child process (`wasm-perf --cold-start` or `--vm-memory`),
  so no compiled module, artifact mapping or allocator state is warm in memory.
- Cold start: a new, empty cache directory per module. The first child compiles the module and
  writes the artifact (\"first load\"). Then each following child times, with `Instant`,
  `WasmHost::new(HostOptions { cache_dir, .. })` through `load_plugin` returning: read the file,
  sha256, load the artifact with `Module::deserialize_file`, link (`instantiate_pre`), instantiate
  a VM, run `proxy_on_vm_start` and `proxy_on_configure`. The child checks that the artifact was
  there before it started. Runs alternate between the artifact left in the OS page cache and the
  module and artifact files evicted from it with `posix_fadvise(POSIX_FADV_DONTNEED)` (only those
  two files), so the second kind reads them from the disk. \"Whole process\" is the parent's wall
  time from spawning the child to its exit (exec, dynamic linking, runtime start-up included).
- VM memory: the child loads `vms + 1` plugins of the module from the artifact cache (each plugin
  has its own VM per worker thread), then on one thread running a current-thread tokio runtime
  and a `LocalSet`, like a worker, starts the first plugin's VM (a warm-up, so one-time
  per-thread costs are not counted), samples memory, starts the other VMs by creating one HTTP filter each through
  `HttpFilterFactory::create` (which instantiates the VM, runs its start-up, creates the root
  context, runs `proxy_on_configure` and creates a stream context), keeps every filter alive and
  samples again. Plugins and streams exist before the first sample, so only VMs are in the
  difference.
- Memory samples: `VmRSS` and `VmSize` from `/proc/self/status`; linear memories from
  `/proc/self/smaps`: each is a read-write region directly below wasmtime's read-less
  reservation (≥ 1 GiB) for that memory; its size is the wasm memory size, its `Rss` the
  resident part. The child checks that the number of linear memories grew by the number of VMs
  started. \"Rust heap\" is exact: the binary's global allocator (mimalloc, as in the `lacewing`
  binary, wrapped in a counter) counts live bytes.
- Overhead per VM (the target's figure) = (RSS added − resident linear memory added) / VMs:
  everything a VM costs that is not the module's own data (store, instance, tables, host state,
  contexts, metric handles). The Rust heap column is a cross-check of it (RSS counts whole pages,
  so it can be a little above or below). \"RSS − whole linear memory\" subtracts the full wasm
  memory size (initial pages plus growth during start-up) whether resident or not; it is
  negative when, as here, most of the initial linear memory is never touched, and is shown only
  because it is the simpler formula.
- Address space per VM is virtual, not memory: wasmtime reserves 4 GiB plus guard regions per
  linear memory so bounds checks are free. It bounds the VMs per process (about 30 000 in a
  47-bit user address space), not RAM use.
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even() {
        assert_eq!(median(vec![3, 1, 2]), 2);
        assert_eq!(median(vec![4, 1, 2, 3]), 2);
    }

    #[test]
    fn utc_date() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_795_000_000), "2026-11-18 11:06 UTC");
    }
}
