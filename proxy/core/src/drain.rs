//! Drain signal: tells listeners to stop accepting and connections to finish.

use tokio::sync::watch;

/// Sender half, held by whoever decides to drain (the signal handler).
#[derive(Debug, Clone)]
pub struct DrainTrigger {
    tx: watch::Sender<bool>,
}

/// Receiver half, cloned into every listener and connection.
#[derive(Debug, Clone)]
pub struct DrainWatch {
    rx: watch::Receiver<bool>,
}

/// A new drain channel, not yet draining.
pub fn channel() -> (DrainTrigger, DrainWatch) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger { tx }, DrainWatch { rx })
}

impl DrainTrigger {
    /// Starts draining; idempotent.
    pub fn drain(&self) {
        self.tx.send_replace(true);
    }

    /// A new watch on this trigger.
    pub fn watch(&self) -> DrainWatch {
        DrainWatch {
            rx: self.tx.subscribe(),
        }
    }
}

impl DrainWatch {
    /// True once draining started.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }

    /// Completes when draining starts (at once if it already has).
    pub async fn signaled(&mut self) {
        // An error means the trigger is gone: treat as drain, there is no one left to stop it.
        let _ = self.rx.wait_for(|draining| *draining).await;
    }
}
