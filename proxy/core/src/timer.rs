//! A timer for a task's `select!` loop that is polled on every wake-up of
//! the task but fires rarely (a connection's periodic looks, an upstream
//! connection's idle check).
//!
//! A tokio `Sleep` polled again checks the task's budget, its entry's state
//! and swaps the waker each time. Once the entry is registered with the
//! task's waker, whether it fired is one atomic load (`Sleep::is_elapsed`):
//! [`ArmedSleep`] polls the `Sleep` once per arming and only asks after that.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

/// A `Sleep` polled in full only until it is registered with the task's
/// waker (again after [`ArmedSleep::reset`], or when the waker changes).
#[derive(Debug)]
pub struct ArmedSleep {
    sleep: Pin<Box<Sleep>>,
    /// The waker the entry is registered with, once a poll left it armed.
    armed_for: Option<Waker>,
}

impl ArmedSleep {
    /// A timer due at `deadline`.
    pub fn until(deadline: Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(deadline)),
            armed_for: None,
        }
    }

    /// Sets a new deadline, whether or not the timer fired.
    pub fn reset(&mut self, deadline: Instant) {
        self.sleep.as_mut().reset(deadline);
        self.armed_for = None;
    }

    /// `Ready` once the deadline has passed (until the next `reset`).
    pub fn poll_fired(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if let Some(waker) = &self.armed_for
            && waker.will_wake(cx.waker())
        {
            return if self.sleep.is_elapsed() {
                Poll::Ready(())
            } else {
                Poll::Pending
            };
        }
        // Outside the task's budget, so that `Pending` means the entry is
        // registered with this waker (with the budget spent, a poll returns
        // `Pending` without registering it).
        match Pin::new(&mut tokio::task::unconstrained(self.sleep.as_mut())).poll(cx) {
            Poll::Ready(()) => Poll::Ready(()),
            Poll::Pending => {
                self.armed_for = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }

    /// A future for one `select!` branch: completes when the timer fires.
    pub fn fired(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| self.poll_fired(cx))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn fires_at_its_deadline_and_again_after_a_reset() {
        let start = Instant::now();
        let mut timer = ArmedSleep::until(start + Duration::from_millis(100));
        timer.fired().await;
        assert!(Instant::now() >= start + Duration::from_millis(100));
        timer.reset(Instant::now() + Duration::from_millis(50));
        let again = Instant::now();
        timer.fired().await;
        assert!(Instant::now() >= again + Duration::from_millis(50));
    }

    #[tokio::test]
    async fn a_select_loop_woken_by_other_branches_still_sees_it_fire() {
        // The deadline is far past the wake-ups (about 60 ms of them), so a
        // loaded machine does not let the timer fire before the last one.
        let start = Instant::now();
        let mut timer = ArmedSleep::until(start + Duration::from_secs(1));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        tokio::spawn(async move {
            // Wake the loop many times before the deadline.
            for _ in 0..20 {
                tokio::time::sleep(Duration::from_millis(3)).await;
                let _ = tx.send(());
            }
        });
        let mut woken = 0;
        loop {
            tokio::select! {
                Some(()) = rx.recv() => woken += 1,
                () = timer.fired() => break,
            }
        }
        assert_eq!(woken, 20, "the other branch ran between the polls");
        assert!(Instant::now() >= start + Duration::from_secs(1));
    }

    #[tokio::test]
    async fn a_spent_budget_does_not_leave_it_unarmed() {
        // The task spends its whole budget (tokio's cooperative scheduling)
        // on a channel, then polls the timer: the timer must still fire.
        let start = Instant::now();
        let mut timer = ArmedSleep::until(start + Duration::from_millis(20));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u32>();
        for i in 0..1000 {
            tx.send(i).unwrap();
        }
        let mut received = 0;
        let fired = tokio::time::timeout(
            Duration::from_secs(10),
            std::future::poll_fn(|cx| {
                while let Poll::Ready(Some(_)) = rx.poll_recv(cx) {
                    received += 1;
                }
                timer.poll_fired(cx)
            }),
        )
        .await;
        assert!(fired.is_ok(), "the timer fired");
        assert_eq!(received, 1000);
        assert!(Instant::now() >= start + Duration::from_millis(20));
        drop(tx);
    }
}
