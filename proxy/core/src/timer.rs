//! A timer for a task's `select!` loop that is polled on every wake-up of
//! the task but fires rarely (a connection's periodic looks, an upstream
//! connection's idle check).
//!
//! A tokio `Sleep` polled again checks the task's budget, its entry's state
//! and swaps the waker each time. Once the entry is registered with the
//! task's waker, whether it fired is one atomic load (`Sleep::is_elapsed`):
//! [`ArmedSleep`] polls the `Sleep` once per arming and only asks after that.
//!
//! [`RequestDeadlines`] builds on it for the deadlines of requests that one
//! task serves one after another (an HTTP/1 connection's route timeouts).

use std::cell::RefCell;
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

/// One timer for the deadlines of requests a task serves one at a time
/// (the route timeouts of an HTTP/1 connection's requests).
///
/// A request's deadline usually comes after the one the timer is armed for
/// (the previous request's, or one before it): the timer is then left as
/// it is, and when it fires the request still waiting compares its own
/// deadline with the clock and moves the timer there. A keep-alive
/// connection so makes and registers a timer about once per timeout instead
/// of once per request (a tokio timer entry made, registered in the wheel
/// and removed: about 600 instructions a request, callgrind). A deadline
/// earlier than the armed one moves the timer at once.
#[derive(Debug, Default)]
pub struct RequestDeadlines {
    /// The timer, with the deadline it is armed for.
    timer: RefCell<Option<(ArmedSleep, Instant)>>,
}

impl RequestDeadlines {
    /// `Ready` once `deadline` has passed; the task is woken then (or
    /// earlier, for a deadline the timer was armed for before). One task
    /// at a time may wait on it.
    pub fn poll_passed(&self, cx: &mut Context<'_>, deadline: Instant) -> Poll<()> {
        let mut slot = self.timer.borrow_mut();
        let (timer, armed) = slot.get_or_insert_with(|| (ArmedSleep::until(deadline), deadline));
        if *armed > deadline {
            timer.reset(deadline);
            *armed = deadline;
        }
        loop {
            if timer.poll_fired(cx).is_pending() {
                return Poll::Pending;
            }
            // Fired: for this deadline, or for an earlier one.
            if *armed == deadline || Instant::now() >= deadline {
                return Poll::Ready(());
            }
            timer.reset(deadline);
            *armed = deadline;
        }
    }

    /// Completes once `deadline` has passed.
    pub fn passed(&self, deadline: Instant) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| self.poll_passed(cx, deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn successive_deadlines_each_pass_at_their_time_on_one_timer() {
        let deadlines = RequestDeadlines::default();
        // Later deadlines keep the timer armed for the first, which then
        // moves to the one still waited for.
        let start = Instant::now();
        deadlines.passed(start + Duration::from_millis(30)).await;
        assert!(Instant::now() >= start + Duration::from_millis(30));
        let second = Instant::now() + Duration::from_millis(60);
        let waited =
            tokio::time::timeout(Duration::from_millis(20), deadlines.passed(second)).await;
        assert!(waited.is_err(), "not passed 20 ms before its deadline");
        deadlines.passed(second).await;
        assert!(Instant::now() >= second);
        // A deadline earlier than the armed one is not kept waiting for it.
        let far = Instant::now() + Duration::from_secs(30);
        let waited = tokio::time::timeout(Duration::from_millis(10), deadlines.passed(far)).await;
        assert!(waited.is_err());
        let near = Instant::now() + Duration::from_millis(20);
        let in_time = tokio::time::timeout(Duration::from_secs(5), deadlines.passed(near)).await;
        assert!(in_time.is_ok(), "an earlier deadline moved the timer");
        assert!(Instant::now() >= near);
    }

    #[tokio::test]
    async fn a_timer_armed_for_a_finished_request_wakes_the_next_one_in_time() {
        let deadlines = RequestDeadlines::default();
        // A request armed the timer for 30 ms and finished long before.
        let first = Instant::now() + Duration::from_millis(30);
        let finished =
            tokio::time::timeout(Duration::from_millis(5), deadlines.passed(first)).await;
        assert!(finished.is_err());
        // The next request's deadline is later: it waits past the first
        // deadline, and no longer than its own.
        let second = Instant::now() + Duration::from_millis(80);
        deadlines.passed(second).await;
        let now = Instant::now();
        assert!(now >= second);
        assert!(
            now < second + Duration::from_secs(2),
            "woken near its deadline"
        );
    }

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
