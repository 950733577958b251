//! Passive health: endpoints that fail (connect failures or 5xx) several times in a row
//! are ejected for a while, never more than a configured share of the cluster at once.
//!
//! The n-th ejection in a row lasts `base_ejection_time × 2^(n-1)`, capped at
//! [`MAX_EJECTION`] (or the base time when larger). An endpoint is re-admitted
//! lazily: it is ejected while the clock is before its `ejected_until`. The row
//! of ejections resets once the endpoint succeeds after having stayed in for a
//! full base ejection time.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lacewing_config::OutlierDetection;
use prometheus::IntCounter;

use crate::clock::{millis, now_ms};
use crate::endpoint::Endpoint;

/// The longest a single ejection lasts (unless the base time is longer).
pub(crate) const MAX_EJECTION: Duration = Duration::from_secs(300);

/// What went wrong with one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Failure {
    /// The connection could not be opened.
    Connect,
    /// A 5xx response or a connection broken mid-request.
    Response,
}

/// Outlier detection of one cluster.
#[derive(Debug)]
pub(crate) struct OutlierDetector {
    threshold: u32,
    base_ms: u64,
    cap_ms: u64,
    max_percent: u64,
    ejections: IntCounter,
    /// Serialises the (rare) ejection decisions so two workers cannot both
    /// pass the max-ejection-percent check at once.
    deciding: Mutex<()>,
}

impl OutlierDetector {
    pub(crate) fn new(config: &OutlierDetection, ejections: IntCounter) -> Self {
        let base_ms = millis(config.base_ejection_time.0).max(1);
        Self {
            threshold: config.consecutive_failures,
            base_ms,
            cap_ms: millis(MAX_EJECTION).max(base_ms),
            max_percent: u64::from(config.max_ejection_percent.min(100)),
            ejections,
            deciding: Mutex::new(()),
        }
    }

    /// Records a good attempt (a response below 500).
    pub(crate) fn success(&self, endpoint: &Endpoint) {
        if endpoint.consecutive_failures.load(Ordering::Relaxed) != 0 {
            endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if endpoint.ejections_in_row.load(Ordering::Relaxed) != 0 {
            let until = endpoint.ejected_until.load(Ordering::Relaxed);
            if now_ms() >= until.saturating_add(self.base_ms) {
                endpoint.ejections_in_row.store(0, Ordering::Relaxed);
            }
        }
    }

    /// Records a failed attempt; ejects `endpoints[index]` when it reached the threshold
    /// and the cluster can spare it. Returns whether it was ejected.
    pub(crate) fn failure(&self, endpoints: &[Arc<Endpoint>], index: usize, kind: Failure) -> bool {
        let Some(endpoint) = endpoints.get(index) else {
            return false;
        };
        if self.threshold == 0 {
            return false;
        }
        let failures = endpoint
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        if failures < self.threshold {
            return false;
        }
        // A poisoned lock only means another thread panicked mid-decision; the data is atomics.
        let _deciding = self
            .deciding
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = now_ms();
        if endpoint.is_ejected(now) {
            return false;
        }
        let ejected = endpoints.iter().filter(|e| e.is_ejected(now)).count() as u64;
        if (ejected + 1) * 100 > self.max_percent * endpoints.len() as u64 {
            // Keep counting: the endpoint is ejected as soon as the cluster can spare it.
            return false;
        }
        let row = endpoint
            .ejections_in_row
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let duration = self
            .base_ms
            .saturating_mul(1u64 << (row - 1).min(20))
            .min(self.cap_ms);
        endpoint
            .ejected_for_connect
            .store(kind == Failure::Connect, Ordering::Relaxed);
        endpoint
            .ejected_until
            .store(now.saturating_add(duration), Ordering::Relaxed);
        endpoint.consecutive_failures.store(0, Ordering::Relaxed);
        self.ejections.inc();
        tracing::info!(endpoint = %endpoint.addr, ejection_ms = duration, "upstream endpoint ejected");
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lacewing_config::units::Dur;

    fn detector(threshold: u32, percent: u32) -> OutlierDetector {
        let config = OutlierDetection {
            consecutive_failures: threshold,
            base_ejection_time: Dur(Duration::from_secs(10)),
            max_ejection_percent: percent,
        };
        OutlierDetector::new(&config, IntCounter::new("e", "e").unwrap())
    }

    fn endpoints(count: u16) -> Vec<Arc<Endpoint>> {
        (0..count)
            .map(|i| Arc::new(Endpoint::new(([127, 0, 0, 1], 2000 + i).into())))
            .collect()
    }

    #[test]
    fn ejects_after_threshold_and_success_resets_count() {
        let eps = endpoints(2);
        let d = detector(3, 50);
        assert!(!d.failure(&eps, 0, Failure::Response));
        assert!(!d.failure(&eps, 0, Failure::Response));
        d.success(&eps[0]);
        assert!(!d.failure(&eps, 0, Failure::Response));
        assert!(!d.failure(&eps, 0, Failure::Response));
        assert!(d.failure(&eps, 0, Failure::Connect));
        assert!(eps[0].is_ejected(now_ms()));
        assert!(eps[0].ejected_for_connect.load(Ordering::Relaxed));
        assert_eq!(d.ejections.get(), 1);
    }

    #[test]
    fn never_ejects_more_than_max_percent() {
        let eps = endpoints(2);
        let d = detector(1, 50);
        assert!(d.failure(&eps, 0, Failure::Response));
        assert!(!d.failure(&eps, 1, Failure::Response));
        assert!(!eps[1].is_ejected(now_ms()));
        let single = endpoints(1);
        assert!(!detector(1, 50).failure(&single, 0, Failure::Connect));
        assert!(detector(1, 100).failure(&single, 0, Failure::Connect));
    }

    #[test]
    fn ejection_time_doubles_and_is_capped() {
        let eps = endpoints(1);
        let d = detector(1, 100);
        let mut last = 0;
        for _ in 0..12 {
            eps[0].ejected_until.store(0, Ordering::Relaxed);
            let before = now_ms();
            assert!(d.failure(&eps, 0, Failure::Response));
            let length = eps[0].ejected_until.load(Ordering::Relaxed) - before;
            assert!(length >= last.min(300_000), "{length} after {last}");
            assert!(length <= 300_000 + 1000);
            last = length;
        }
        assert!(last >= 299_000);
    }

    #[test]
    fn zero_threshold_disables_ejection() {
        let eps = endpoints(2);
        let d = detector(0, 100);
        for _ in 0..10 {
            assert!(!d.failure(&eps, 0, Failure::Connect));
        }
    }
}
