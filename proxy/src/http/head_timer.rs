//! The timer hyper's HTTP/1 server uses for `header_read_timeout`, without a
//! timer-wheel entry per request.
//!
//! hyper starts that timer each time it waits for a request head (an idle
//! keep-alive connection included) and drops it once the head is read:
//! with tokio's timer, an entry made, registered and removed on every
//! request (this saves about 0.5k instructions a request, callgrind). Here the sleep is
//! only a deadline, checked whenever hyper polls it; it never wakes the task
//! itself. The connection's own periodic look (`serve_io`'s `head` look,
//! every half `header_read_timeout`) wakes the task, and with it hyper, so
//! an expired head read ends between one and one and a half
//! `header_read_timeout`s after it started.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// hyper's HTTP/1 timer for a connection served by `serve_io`.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HeadTimer;

impl hyper::rt::Timer for HeadTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep_until(Instant::now() + duration)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(Deadline(deadline))
    }

    fn now(&self) -> Instant {
        Instant::now()
    }
}

/// Ready once `Instant::now()` has reached it, when polled; registers no waker.
#[derive(Debug)]
struct Deadline(Instant);

impl Future for Deadline {
    type Output = ();

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.0 {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }
}

impl hyper::rt::Sleep for Deadline {}

/// How often `serve_io` wakes an HTTP/1 connection so that an expired
/// [`HeadTimer`] deadline is seen: half the `header_read_timeout`.
pub(crate) fn look_period(header_read_timeout: Duration) -> Duration {
    (header_read_timeout / 2).max(Duration::from_millis(5))
}

#[cfg(test)]
mod tests {
    use std::task::Waker;

    use hyper::rt::Timer as _;

    use super::*;

    #[test]
    fn a_deadline_is_pending_until_it_passes_and_ready_after() {
        let mut cx = Context::from_waker(Waker::noop());
        let mut later = HeadTimer.sleep(Duration::from_secs(60));
        assert!(later.as_mut().poll(&mut cx).is_pending());
        let mut passed = HeadTimer.sleep_until(Instant::now() - Duration::from_millis(1));
        assert!(passed.as_mut().poll(&mut cx).is_ready());
        let mut soon = HeadTimer.sleep(Duration::from_millis(20));
        std::thread::sleep(Duration::from_millis(25));
        assert!(soon.as_mut().poll(&mut cx).is_ready());
    }

    #[test]
    fn the_look_comes_twice_per_timeout_and_not_in_a_busy_loop() {
        assert_eq!(look_period(Duration::from_secs(10)), Duration::from_secs(5));
        assert_eq!(look_period(Duration::ZERO), Duration::from_millis(5));
    }
}
