//! Load balancing: round robin and least request (power of two random choices).

use std::cell::RefCell;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use lacewing_config::LbPolicy;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::endpoint::Endpoint;

thread_local! {
    static RNG: RefCell<SmallRng> = RefCell::new(SmallRng::from_os_rng());
}

/// Picks an endpoint among those a predicate allows.
#[derive(Debug)]
pub(crate) enum Balancer {
    /// Next endpoint in turn; the counter is shared by every worker.
    RoundRobin(AtomicUsize),
    /// Two random eligible endpoints; the one with fewer active requests wins.
    LeastRequest,
}

impl Balancer {
    pub(crate) fn new(policy: LbPolicy) -> Self {
        match policy {
            LbPolicy::RoundRobin => Self::RoundRobin(AtomicUsize::new(0)),
            LbPolicy::LeastRequest => Self::LeastRequest,
        }
    }

    /// The index of the chosen endpoint, or `None` when no endpoint is eligible.
    pub(crate) fn choose(
        &self,
        endpoints: &[Arc<Endpoint>],
        eligible: impl Fn(usize) -> bool,
    ) -> Option<usize> {
        let count = endpoints.len();
        if count == 0 {
            return None;
        }
        match self {
            Self::RoundRobin(next) => {
                let start = next.fetch_add(1, Ordering::Relaxed) % count;
                first_eligible(count, start, &eligible)
            }
            Self::LeastRequest => {
                let (start_a, start_b) = RNG.with(|rng| {
                    let mut rng = rng.borrow_mut();
                    (rng.random_range(0..count), rng.random_range(0..count))
                });
                let a = first_eligible(count, start_a, &eligible)?;
                let b = if count > 1 {
                    // Start the second choice past `a` when both landed on the same endpoint.
                    let start_b = if start_b == a {
                        (a + 1) % count
                    } else {
                        start_b
                    };
                    first_eligible(count, start_b, &|i| i != a && eligible(i))
                } else {
                    None
                };
                Some(match b {
                    Some(b)
                        if endpoints[b].active.load(Ordering::Relaxed)
                            < endpoints[a].active.load(Ordering::Relaxed) =>
                    {
                        b
                    }
                    _ => a,
                })
            }
        }
    }
}

fn first_eligible(count: usize, start: usize, eligible: &impl Fn(usize) -> bool) -> Option<usize> {
    (0..count)
        .map(|offset| (start + offset) % count)
        .find(|&i| eligible(i))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(count: u16) -> Vec<Arc<Endpoint>> {
        (0..count)
            .map(|i| Arc::new(Endpoint::new(([127, 0, 0, 1], 1000 + i).into())))
            .collect()
    }

    #[test]
    fn round_robin_takes_turns_and_skips_ineligible() {
        let eps = endpoints(3);
        let lb = Balancer::new(LbPolicy::RoundRobin);
        let picks: Vec<_> = (0..6).map(|_| lb.choose(&eps, |_| true).unwrap()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        for _ in 0..6 {
            assert_ne!(lb.choose(&eps, |i| i != 1), Some(1));
        }
        assert_eq!(lb.choose(&eps, |_| false), None);
        assert_eq!(lb.choose(&[], |_| true), None);
    }

    #[test]
    fn least_request_prefers_fewer_active() {
        let eps = endpoints(2);
        eps[0].active.store(5, Ordering::Relaxed);
        let lb = Balancer::new(LbPolicy::LeastRequest);
        for _ in 0..50 {
            assert_eq!(lb.choose(&eps, |_| true), Some(1));
        }
        assert_eq!(lb.choose(&eps, |i| i == 0), Some(0));
        let single = endpoints(1);
        assert_eq!(lb.choose(&single, |_| true), Some(0));
    }
}
