//! This process's memory as Linux reports it: `VmRSS` from `/proc/self/status`
//! and, from `/proc/self/smaps`, the wasm linear memories (their accessible size
//! and resident part), so linear memory can be told apart from VM overhead.

use anyhow::Context;

/// Memory of this process at one moment, in KiB.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemorySample {
    /// Resident set size (`VmRSS`).
    pub rss_kib: u64,
    /// Virtual address space (`VmSize`).
    pub vm_size_kib: u64,
    /// Bytes live on the Rust heap (see [`crate::heap`]), in KiB.
    pub heap_kib: u64,
    /// Number of wasm linear memories found in the address space.
    pub linear_memories: u64,
    /// Their accessible (read-write) size: the wasm `memory.size` in bytes.
    pub linear_size_kib: u64,
    /// Their resident part.
    pub linear_rss_kib: u64,
}

/// A linear memory is a read-write region right below a read-less region of
/// at least this size: wasmtime reserves the rest of the 4 GiB address range
/// (plus a guard) behind every linear memory.
const RESERVATION_MIN_KIB: u64 = 1024 * 1024;

/// One mapping of `/proc/self/smaps`.
struct Mapping {
    start: u64,
    end: u64,
    readable_writable: bool,
    inaccessible: bool,
    rss_kib: u64,
}

/// Reads `VmRSS` and the linear memories now.
pub fn sample() -> anyhow::Result<MemorySample> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no {name} in /proc/self/status"))
    };
    let rss_kib = field("VmRSS:")?;
    let vm_size_kib = field("VmSize:")?;
    let heap_kib = crate::heap::live_bytes() as u64 / 1024;
    let smaps = std::fs::read_to_string("/proc/self/smaps").context("reading /proc/self/smaps")?;
    let (linear_memories, linear_size_kib, linear_rss_kib) = linear_memories(&parse_smaps(&smaps));
    Ok(MemorySample {
        rss_kib,
        vm_size_kib,
        heap_kib,
        linear_memories,
        linear_size_kib,
        linear_rss_kib,
    })
}

/// Count, accessible KiB and resident KiB of the linear memories among `maps`
/// (sorted by address).
fn linear_memories(maps: &[Mapping]) -> (u64, u64, u64) {
    let (mut count, mut size_kib, mut rss_kib) = (0, 0, 0);
    for (i, reservation) in maps.iter().enumerate() {
        if !reservation.inaccessible
            || (reservation.end - reservation.start) / 1024 < RESERVATION_MIN_KIB
        {
            continue;
        }
        // Walk down over the contiguous read-write mappings just below it.
        let mut boundary = reservation.start;
        let mut found = false;
        for m in maps[..i].iter().rev() {
            if m.end != boundary || !m.readable_writable {
                break;
            }
            size_kib += (m.end - m.start) / 1024;
            rss_kib += m.rss_kib;
            boundary = m.start;
            found = true;
        }
        if found {
            count += 1;
        }
    }
    (count, size_kib, rss_kib)
}

fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) =
                (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
        {
            let perms = fields.next().unwrap_or("");
            maps.push(Mapping {
                start,
                end,
                readable_writable: perms.starts_with("rw"),
                inaccessible: perms.starts_with("---"),
                rss_kib: 0,
            });
        } else if first == "Rss:"
            && let Some(last) = maps.last_mut()
        {
            last.rss_kib = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    maps.sort_by_key(|m| m.start);
    maps
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_linear_memory_below_its_reservation() {
        let text = "\
7f0000000000-7f0002000000 ---p 00000000 00:00 0
Size:              32768 kB
Rss:                   0 kB
7f0002000000-7f0002010000 rw-p 00000000 00:00 0
Size:                 64 kB
Rss:                   8 kB
7f0002010000-7f0002110000 rw-p 00000000 00:00 0
Size:               1024 kB
Rss:                  12 kB
7f0002110000-7f0104000000 ---p 00000000 00:00 0
Size:            4225984 kB
Rss:                   0 kB
";
        let maps = parse_smaps(text);
        assert_eq!(maps.len(), 4);
        assert_eq!(maps[2].rss_kib, 12);
        assert_eq!(linear_memories(&maps), (1, 1088, 20));
    }

    #[test]
    fn samples_this_process() {
        let s = sample().unwrap();
        assert!(s.rss_kib > 0);
    }
}
