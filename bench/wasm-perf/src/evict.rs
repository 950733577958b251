//! Drops one file's pages from the OS page cache, so the next read of it comes
//! from the disk, as after a reboot. Only that file is affected.

use std::path::Path;

use rustix::fs::{Advice, fadvise};

/// Asks the kernel to forget the cached pages of `path` (`POSIX_FADV_DONTNEED`).
/// Pages still mapped by a running process stay; the callers' children have exited.
pub fn evict(path: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::open(path)?;
    // Dirty pages (a just-written artifact) are not dropped: write them out first.
    file.sync_data()?;
    fadvise(&file, 0, None, Advice::DontNeed)
        .map_err(|e| anyhow::anyhow!("posix_fadvise({}) failed: {e}", path.display()))
}
