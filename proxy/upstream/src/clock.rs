//! A cheap monotonic clock in milliseconds, shared by outlier ejection and idle tracking.

use std::cell::Cell;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Milliseconds since the first call in this process, never 0 (0 means "unset" in atomics).
pub(crate) fn now_ms() -> u64 {
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1) + 1
}

/// A duration in whole milliseconds, saturating.
pub(crate) fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// [`now_ms`] read at most once, and only if asked: picking an endpoint and
/// checking out a pooled connection need the time only when an endpoint was
/// ejected or a connection has been idle, and a clock read with its subtraction costs
/// about 75 instructions (callgrind).
#[derive(Debug, Default)]
pub(crate) struct LazyNow(Cell<u64>);

impl LazyNow {
    /// The time of the first call on this value.
    pub(crate) fn get(&self) -> u64 {
        match self.0.get() {
            0 => {
                let now = now_ms();
                self.0.set(now);
                now
            }
            now => now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lazy_now_reads_the_clock_once_and_keeps_it() {
        let now = LazyNow::default();
        let first = now.get();
        assert!(first >= 1);
        std::thread::sleep(Duration::from_millis(3));
        assert_eq!(now.get(), first);
        assert!(now_ms() > first);
    }
}
