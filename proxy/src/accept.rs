//! Accepting under descriptor pressure: the soft open-files limit is raised
//! to the hard one at start, and an accept loop that fails (out of
//! descriptors, out of memory) backs off, from 10 ms doubling up to 1 s, and
//! logs once per interval with a count instead of once per failure.

use std::io;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// First wait after a failed accept.
pub const BACKOFF_START: Duration = Duration::from_millis(10);
/// Longest wait between accept attempts while they fail.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// At most one log line per listener per interval while accepts fail.
pub const LOG_INTERVAL: Duration = Duration::from_secs(5);

/// The open-files limit before and after [`raise_open_files_limit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenFilesLimit {
    /// The soft limit the process started with (`None`: unlimited).
    pub inherited: Option<u64>,
    /// The soft limit now in force (`None`: unlimited).
    pub current: Option<u64>,
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (when the hard limit is
/// unlimited, to the kernel's `fs.nr_open`), so a proxy started from a shell
/// with the common 1,024 is not capped there. Never lowers it; when the
/// kernel refuses, the inherited limit stays and a warning says why.
pub fn raise_open_files_limit() -> OpenFilesLimit {
    let limit = getrlimit(Resource::Nofile);
    let inherited = limit.current;
    let target = match limit.maximum {
        Some(hard) => Some(hard),
        // Linux refuses an unlimited descriptor count: its ceiling is nr_open.
        None => std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok()),
    };
    let current = match (inherited, target) {
        (Some(soft), Some(target)) if target > soft => {
            let raised = Rlimit {
                current: Some(target),
                maximum: limit.maximum,
            };
            match setrlimit(Resource::Nofile, raised) {
                Ok(()) => Some(target),
                Err(e) => {
                    tracing::warn!(error = %e, soft, target, "cannot raise the open files limit");
                    inherited
                }
            }
        }
        _ => inherited,
    };
    OpenFilesLimit { inherited, current }
}

/// The backoff and log state of one accept loop.
#[derive(Debug)]
pub struct AcceptBackoff {
    listener: String,
    failures: IntCounter,
    delay: Duration,
    /// Failures since the last log line.
    unlogged: u64,
    last_log: Option<Instant>,
}

impl AcceptBackoff {
    /// The state of the accept loop of `listener`; failures are counted on `failures`.
    pub fn new(listener: &str, failures: IntCounter) -> Self {
        Self {
            listener: listener.to_string(),
            failures,
            delay: BACKOFF_START,
            unlogged: 0,
            last_log: None,
        }
    }

    /// Records a failed accept and returns how long to wait before the next
    /// attempt. Logs the first failure at once, then at most once per
    /// [`LOG_INTERVAL`] with the count of failures since the last line.
    pub fn failed(&mut self, error: &io::Error) -> Duration {
        self.failures.inc();
        self.unlogged += 1;
        let now = Instant::now();
        if self
            .last_log
            .is_none_or(|at| now.duration_since(at) >= LOG_INTERVAL)
        {
            tracing::warn!(
                listener = %self.listener,
                error = %error,
                failures = self.unlogged,
                retry_in_ms = self.delay.as_millis() as u64,
                "accept failing; backing off"
            );
            self.unlogged = 0;
            self.last_log = Some(now);
        }
        let wait = self.delay;
        self.delay = (self.delay * 2).min(BACKOFF_MAX);
        wait
    }

    /// Records a successful accept: the backoff starts over, and a recovery
    /// after failures is logged once.
    pub fn succeeded(&mut self) {
        if self.last_log.is_some() {
            tracing::info!(
                listener = %self.listener,
                failures = self.unlogged,
                "accepting again"
            );
            self.unlogged = 0;
            self.last_log = None;
            self.delay = BACKOFF_START;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_cap_and_starts_over_after_a_success() {
        let counter = IntCounter::new("failures", "test").unwrap();
        let mut backoff = AcceptBackoff::new("main", counter.clone());
        let error = io::Error::from_raw_os_error(24);
        let waits: Vec<Duration> = (0..10).map(|_| backoff.failed(&error)).collect();
        assert_eq!(waits[0], BACKOFF_START);
        assert_eq!(waits[1], BACKOFF_START * 2);
        assert_eq!(waits[9], BACKOFF_MAX);
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(counter.get(), 10);
        // Nine failures after the first line wait for the next interval's line.
        assert_eq!(backoff.unlogged, 9);
        backoff.succeeded();
        assert_eq!(backoff.failed(&error), BACKOFF_START);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let limit = raise_open_files_limit();
        let now = getrlimit(Resource::Nofile);
        assert_eq!(limit.current, now.current);
        if let (Some(hard), Some(soft)) = (now.maximum, now.current) {
            assert_eq!(soft, hard);
        }
        assert!(limit.current >= limit.inherited || limit.current.is_none());
    }
}
