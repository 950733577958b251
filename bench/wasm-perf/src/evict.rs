//! Drops one file's pages from the OS page cache, so the next read of it comes
//! from the disk, as after a reboot. Only that file is affected.

use std::os::fd::AsRawFd;
use std::path::Path;

/// Asks the kernel to forget the cached pages of `path` (`POSIX_FADV_DONTNEED`).
/// Pages still mapped by a running process stay; the callers' children have exited.
pub fn evict(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)?;
    // Dirty pages (a just-written artifact) are not dropped: write them out first.
    file.sync_data()?;
    // SAFETY: `file` is an open descriptor for the duration of the call; the
    // call only takes integers and touches no memory of ours.
    let rc = unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    anyhow::ensure!(
        rc == 0,
        "posix_fadvise({}) failed: error {rc}",
        path.display()
    );
    Ok(())
}
