//! Bounded polling of conditions that become true after a while.

use std::future::Future;
use std::time::Duration;

/// How often [`eventually`] polls.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// How many times [`eventually`] polls before giving up (10 s in all).
const POLL_ATTEMPTS: u32 = 200;

/// Polls `condition` until it returns true; panics naming `what` if it never does.
pub async fn eventually<F, Fut>(what: &str, condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    eventually_with(what, POLL_ATTEMPTS, POLL_INTERVAL, condition).await;
}

/// [`eventually`] with an explicit number of attempts and interval.
pub async fn eventually_with<F, Fut>(
    what: &str,
    attempts: u32,
    interval: Duration,
    mut condition: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    for _ in 0..attempts {
        if condition().await {
            return;
        }
        tokio::time::sleep(interval).await;
    }
    panic!("condition never became true: {what}");
}
