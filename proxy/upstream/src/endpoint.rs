//! One upstream address and the counters that load balancing and outlier ejection read.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use http::HeaderValue;

use crate::clock::LazyNow;

static NEXT_ENDPOINT_ID: AtomicU64 = AtomicU64::new(1);

/// An endpoint of a cluster, shared by every worker.
#[derive(Debug)]
pub(crate) struct Endpoint {
    /// Process-unique; names the endpoint's connections in the per-thread pools.
    pub(crate) id: u64,
    pub(crate) addr: SocketAddr,
    /// `ip:port`, the Host (or `:authority`) used when a request carries none.
    pub(crate) host: HeaderValue,
    /// Requests sent to this endpoint still waiting for their response head.
    pub(crate) active: AtomicUsize,
    /// Failures (connect or 5xx) since the last success.
    pub(crate) consecutive_failures: AtomicU32,
    /// Clock time (ms, see [`crate::clock`]) until which the endpoint is ejected; 0 when never.
    pub(crate) ejected_until: AtomicU64,
    /// Ejections in a row; each doubles the next ejection time.
    pub(crate) ejections_in_row: AtomicU32,
    /// Whether the current ejection was caused by failed connects (the endpoint is down).
    pub(crate) ejected_for_connect: AtomicBool,
}

impl Endpoint {
    pub(crate) fn new(addr: SocketAddr) -> Self {
        // A socket address always renders as a valid header value.
        let host = HeaderValue::try_from(addr.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self {
            id: NEXT_ENDPOINT_ID.fetch_add(1, Ordering::Relaxed),
            addr,
            host,
            active: AtomicUsize::new(0),
            consecutive_failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejections_in_row: AtomicU32::new(0),
            ejected_for_connect: AtomicBool::new(false),
        }
    }

    /// Whether the endpoint is ejected at clock time `now`.
    pub(crate) fn is_ejected(&self, now: u64) -> bool {
        self.ejected_until.load(Ordering::Relaxed) > now
    }

    /// [`Self::is_ejected`], reading the clock only for an endpoint that
    /// was ever ejected.
    pub(crate) fn is_ejected_lazy(&self, now: &LazyNow) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && until > now.get()
    }

    /// Counts a request as active until the guard drops.
    pub(crate) fn begin_request(&self) -> ActiveRequest<'_> {
        self.active.fetch_add(1, Ordering::Relaxed);
        ActiveRequest(&self.active)
    }
}

/// Keeps a request counted in [`Endpoint::active`].
pub(crate) struct ActiveRequest<'a>(&'a AtomicUsize);

impl Drop for ActiveRequest<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A set of endpoint indexes; allocation-free for clusters of up to 64 endpoints.
#[derive(Debug, Default)]
pub(crate) struct EndpointSet {
    first: u64,
    rest: Vec<u64>,
}

impl EndpointSet {
    pub(crate) fn insert(&mut self, index: usize) {
        if index < 64 {
            self.first |= 1 << index;
        } else {
            let word = index / 64 - 1;
            if self.rest.len() <= word {
                self.rest.resize(word + 1, 0);
            }
            self.rest[word] |= 1 << (index % 64);
        }
    }

    pub(crate) fn contains(&self, index: usize) -> bool {
        if index < 64 {
            self.first & (1 << index) != 0
        } else {
            self.rest
                .get(index / 64 - 1)
                .is_some_and(|word| word & (1 << (index % 64)) != 0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_set_holds_small_and_large_indexes() {
        let mut set = EndpointSet::default();
        for i in [0, 5, 63, 64, 130, 1000] {
            assert!(!set.contains(i));
            set.insert(i);
            assert!(set.contains(i));
        }
        assert!(!set.contains(1));
        assert!(!set.contains(129));
        assert!(!set.contains(5000));
    }
}
