//! Circuit-breaker limits and the retry budget of one cluster, counted across all workers.
//!
//! Each limit is an atomic counter with a guard that gives the slot back on drop.
//! A request counts against `max_requests` until its response head arrives (or it
//! fails); it counts against `max_pending_requests` while it waits for a new
//! connection; connections count against `max_connections` while open.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use lacewing_config::{CircuitBreaker, RetryBudget};
use prometheus::{IntCounter, IntGauge};

/// Which circuit-breaker limit refused a request (also the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    Connections,
    PendingRequests,
    Requests,
    /// One downstream connection's share (counted by the HTTP server).
    DownstreamShare,
}

impl Limit {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Connections => "max_connections",
            Self::PendingRequests => "max_pending_requests",
            Self::Requests => "max_requests",
            Self::DownstreamShare => "max_upstream_share",
        }
    }
}

/// The open connections of a cluster; shared with connection driver tasks.
#[derive(Debug)]
pub(crate) struct ConnectionCount {
    open: AtomicUsize,
    max: usize,
    active_gauge: IntGauge,
    opened_total: IntCounter,
}

impl ConnectionCount {
    pub(crate) fn new(max: usize, active_gauge: IntGauge, opened_total: IntCounter) -> Self {
        Self {
            open: AtomicUsize::new(0),
            max,
            active_gauge,
            opened_total,
        }
    }

    /// Reserves a connection slot, or `None` when `max_connections` is reached.
    pub(crate) fn reserve(self: &Arc<Self>) -> Option<ConnectionSlot> {
        acquire(&self.open, self.max).then(|| ConnectionSlot {
            count: Arc::clone(self),
            established: false,
        })
    }

    /// Counts a connection handed to a caller (raw TCP) in `upstream_connections_total` only.
    pub(crate) fn count_unpooled(&self) {
        self.opened_total.inc();
    }

    /// Open connections now.
    pub(crate) fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// `max_connections`.
    pub(crate) fn max(&self) -> usize {
        self.max
    }
}

/// One reserved or open connection; released when dropped (the driver task owns it).
#[derive(Debug)]
pub(crate) struct ConnectionSlot {
    count: Arc<ConnectionCount>,
    established: bool,
}

impl ConnectionSlot {
    /// The TCP connection is up: count it in the metrics.
    pub(crate) fn established(&mut self) {
        if !self.established {
            self.established = true;
            self.count.active_gauge.inc();
            self.count.opened_total.inc();
        }
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.count.open.fetch_sub(1, Ordering::Relaxed);
        if self.established {
            self.count.active_gauge.dec();
        }
    }
}

/// Request limits and the retry budget.
#[derive(Debug)]
pub(crate) struct Limits {
    requests: AtomicUsize,
    max_requests: usize,
    pending: AtomicUsize,
    max_pending: usize,
    retries: AtomicUsize,
    budget_ratio: f64,
    budget_min: usize,
}

impl Limits {
    pub(crate) fn new(breaker: &CircuitBreaker, budget: &RetryBudget) -> Self {
        Self {
            requests: AtomicUsize::new(0),
            max_requests: breaker.max_requests,
            pending: AtomicUsize::new(0),
            max_pending: breaker.max_pending_requests,
            retries: AtomicUsize::new(0),
            budget_ratio: if budget.ratio.is_finite() {
                budget.ratio.max(0.0)
            } else {
                0.0
            },
            budget_min: budget.min_concurrent,
        }
    }

    /// Counts a request in flight, or `None` when `max_requests` is reached.
    pub(crate) fn request(&self) -> Option<Held<'_>> {
        acquire(&self.requests, self.max_requests).then(|| Held(&self.requests))
    }

    /// Counts a request waiting for a connection, or `None` when `max_pending_requests` is reached.
    pub(crate) fn pending(&self) -> Option<Held<'_>> {
        acquire(&self.pending, self.max_pending).then(|| Held(&self.pending))
    }

    /// Counts a retrying request, or `None` when the retry budget is spent:
    /// retries in flight stay within `max(min_concurrent, ratio × requests in flight)`.
    pub(crate) fn retry(&self) -> Option<Held<'_>> {
        let active = self.requests.load(Ordering::Relaxed);
        let allowed = self
            .budget_min
            .max((self.budget_ratio * active as f64) as usize);
        acquire(&self.retries, allowed).then(|| Held(&self.retries))
    }

    /// `max_pending_requests` and `max_requests`.
    pub(crate) fn maxima(&self) -> (usize, usize) {
        (self.max_pending, self.max_requests)
    }

    /// Requests in flight now.
    pub(crate) fn requests_in_flight(&self) -> usize {
        self.requests.load(Ordering::Relaxed)
    }
}

/// A counted slot, given back on drop.
#[derive(Debug)]
pub(crate) struct Held<'a>(&'a AtomicUsize);

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn acquire(counter: &AtomicUsize, max: usize) -> bool {
    if counter.fetch_add(1, Ordering::Relaxed) >= max {
        counter.fetch_sub(1, Ordering::Relaxed);
        false
    } else {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_limit_refuses_then_frees() {
        let breaker = CircuitBreaker {
            max_connections: 1,
            max_pending_requests: 1,
            max_requests: 2,
        };
        let limits = Limits::new(&breaker, &RetryBudget::default());
        let a = limits.request().unwrap();
        let _b = limits.request().unwrap();
        assert!(limits.request().is_none());
        drop(a);
        assert!(limits.request().is_some());
        let _p = limits.pending().unwrap();
        assert!(limits.pending().is_none());
    }

    #[test]
    fn retry_budget_follows_ratio_with_minimum() {
        let breaker = CircuitBreaker {
            max_connections: 100,
            max_pending_requests: 100,
            max_requests: 100,
        };
        let budget = RetryBudget {
            ratio: 0.5,
            min_concurrent: 1,
        };
        let limits = Limits::new(&breaker, &budget);
        let first = limits.retry().unwrap();
        assert!(limits.retry().is_none());
        drop(first);
        let held: Vec<_> = (0..6).map(|_| limits.request().unwrap()).collect();
        let retries: Vec<_> = std::iter::from_fn(|| limits.retry()).take(10).collect();
        assert_eq!(retries.len(), 3);
        drop(held);
    }

    #[test]
    fn connection_slots_count_and_release() {
        let count = Arc::new(ConnectionCount::new(
            1,
            IntGauge::new("g", "g").unwrap(),
            IntCounter::new("c", "c").unwrap(),
        ));
        let mut slot = count.reserve().unwrap();
        assert!(count.reserve().is_none());
        slot.established();
        assert_eq!(count.active_gauge.get(), 1);
        drop(slot);
        assert_eq!(count.active_gauge.get(), 0);
        assert_eq!(count.open(), 0);
        assert!(count.reserve().is_some());
    }
}
