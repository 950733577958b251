//! Facts about this test process (the proxy runs in it) and the `lacewing` binary.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

/// A loopback port free at the time of the call, for a `lacewing` process
/// that must be told where to listen before it starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

/// Resident set size of this process in bytes, from `/proc/self/status`.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("read /proc/self/status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map(|kib| kib * 1024)
        .expect("/proc/self/status has a VmRSS line in kB")
}

/// Number of open file descriptors of this process.
pub fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("list /proc/self/fd")
        .count()
}

/// Path of the `lacewing` binary in this workspace's target directory.
///
/// The first call in a process runs `cargo build -p lacewing` (a quick no-op
/// when the binary is up to date), so the tests never run a stale binary.
pub fn lacewing_binary() -> PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY
        .get_or_init(|| {
            let workspace = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("tests/ lives in the workspace")
                .to_path_buf();
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace.join("target"));
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = Command::new(cargo)
                .args(["build", "--quiet", "-p", "lacewing"])
                .current_dir(&workspace)
                .status()
                .expect("run cargo build -p lacewing");
            assert!(status.success(), "cargo build -p lacewing failed");
            let binary = target.join("debug").join("lacewing");
            assert!(binary.exists(), "{} was not built", binary.display());
            binary
        })
        .clone()
}
