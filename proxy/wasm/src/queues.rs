//! Shared queues (`proxy_register_shared_queue` and friends), delivered across
//! worker threads.
//!
//! A queue is named by the VM id that registered it and a name; every worker's
//! VM of that plugin registers the same queue and so gets the same id, adding
//! its worker's waker. Enqueueing wakes one live waker (round robin), whose
//! worker then calls `proxy_on_queue_ready` on its VM; that VM dequeues.
//! Wakers whose receiving worker is gone are dropped on the way.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use dashmap::DashMap;
use tokio::sync::mpsc::UnboundedSender;

/// Most items a queue holds before `enqueue` refuses more.
pub const MAX_QUEUE_ITEMS: usize = 16 * 1024;
/// Most bytes a queue holds before `enqueue` refuses more.
pub const MAX_QUEUE_BYTES: usize = 64 * 1024 * 1024;

/// Why a queue operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    /// No queue has that id.
    #[error("no shared queue with id {0}")]
    NotFound(u32),
    /// The queue holds as many items or bytes as it may.
    #[error("shared queue {0} is full")]
    Full(u32),
}

/// Tells one worker thread that a queue it registered has an item: the
/// worker receives the queue id and runs `proxy_on_queue_ready`.
#[derive(Debug, Clone)]
pub struct QueueWaker {
    tx: UnboundedSender<u32>,
}

impl QueueWaker {
    /// A waker sending queue ids into the worker's channel.
    pub fn new(tx: UnboundedSender<u32>) -> Self {
        Self { tx }
    }

    /// Whether the worker still listens.
    fn is_live(&self) -> bool {
        !self.tx.is_closed()
    }
}

#[derive(Debug, Default)]
struct QueueState {
    items: VecDeque<Bytes>,
    bytes: usize,
    wakers: Vec<QueueWaker>,
    /// Index of the waker to try first on the next enqueue.
    next_waker: usize,
}

impl QueueState {
    /// Wakes one live waker, starting at `next_waker`, dropping dead ones.
    fn wake_one(&mut self, id: u32) {
        while !self.wakers.is_empty() {
            let index = self.next_waker % self.wakers.len();
            if self.wakers[index].tx.send(id).is_ok() {
                self.next_waker = index + 1;
                return;
            }
            self.wakers.swap_remove(index);
            self.next_waker = index;
        }
    }
}

#[derive(Debug, Default)]
struct Queue {
    state: Mutex<QueueState>,
}

impl Queue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding the lock cannot leave the state torn (every
        // update is a single push/pop plus counters), so keep using it.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Every shared queue of one proxy.
#[derive(Debug)]
pub struct SharedQueues {
    ids: DashMap<(String, String), u32>,
    queues: DashMap<u32, Queue>,
    next_id: AtomicU32,
}

impl Default for SharedQueues {
    fn default() -> Self {
        Self::new()
    }
}

impl SharedQueues {
    /// No queues yet.
    pub fn new() -> Self {
        Self {
            ids: DashMap::new(),
            queues: DashMap::new(),
            // 0 is never a queue id.
            next_id: AtomicU32::new(1),
        }
    }

    /// Opens (creating if needed) the queue `name` of VM `vm_id` and adds the
    /// caller's waker to it. The same `(vm_id, name)` always gets the same id.
    /// A waker on a channel already registered for that queue is not added
    /// twice, so a recreated VM on the same worker keeps one share of wakeups.
    pub fn register(&self, vm_id: &str, name: &str, waker: QueueWaker) -> u32 {
        let id = *self
            .ids
            .entry((vm_id.to_owned(), name.to_owned()))
            .or_insert_with(|| {
                // Created before the id is published, so whoever resolves
                // the id finds the queue.
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                self.queues.insert(id, Queue::default());
                id
            });
        let queue = self.queues.entry(id).or_default();
        let mut state = queue.lock();
        state.wakers.retain(QueueWaker::is_live);
        if !state.wakers.iter().any(|w| w.tx.same_channel(&waker.tx)) {
            state.wakers.push(waker);
        }
        id
    }

    /// The id of queue `name` of VM `vm_id`, if it was registered.
    pub fn resolve(&self, vm_id: &str, name: &str) -> Option<u32> {
        self.ids
            .get(&(vm_id.to_owned(), name.to_owned()))
            .map(|id| *id)
    }

    /// Appends `value` to queue `id` and wakes one worker that registered it.
    pub fn enqueue(&self, id: u32, value: Bytes) -> Result<(), QueueError> {
        let queue = self.queues.get(&id).ok_or(QueueError::NotFound(id))?;
        let mut state = queue.lock();
        if state.items.len() >= MAX_QUEUE_ITEMS
            || state.bytes.saturating_add(value.len()) > MAX_QUEUE_BYTES
        {
            return Err(QueueError::Full(id));
        }
        state.bytes += value.len();
        state.items.push_back(value);
        state.wake_one(id);
        Ok(())
    }

    /// Takes the oldest item of queue `id`; `None` when it is empty.
    pub fn dequeue(&self, id: u32) -> Result<Option<Bytes>, QueueError> {
        let queue = self.queues.get(&id).ok_or(QueueError::NotFound(id))?;
        let mut state = queue.lock();
        let item = state.items.pop_front();
        if let Some(item) = &item {
            state.bytes = state.bytes.saturating_sub(item.len());
        }
        Ok(item)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

    fn waker() -> (QueueWaker, UnboundedReceiver<u32>) {
        let (tx, rx) = unbounded_channel();
        (QueueWaker::new(tx), rx)
    }

    #[test]
    fn same_name_gets_same_id_and_resolves() {
        let queues = SharedQueues::new();
        let (w1, _r1) = waker();
        let (w2, _r2) = waker();
        let (w3, _r3) = waker();
        let a = queues.register("vm", "q", w1);
        let b = queues.register("vm", "q", w2);
        let other = queues.register("vm2", "q", w3);
        assert_eq!(a, b);
        assert_ne!(a, other);
        assert_ne!(a, 0);
        assert_eq!(queues.resolve("vm", "q"), Some(a));
        assert_eq!(queues.resolve("vm", "missing"), None);
        assert_eq!(queues.resolve("nope", "q"), None);
    }

    #[test]
    fn unknown_id_is_not_found() {
        let queues = SharedQueues::new();
        assert_eq!(
            queues.enqueue(42, Bytes::new()),
            Err(QueueError::NotFound(42))
        );
        assert_eq!(queues.dequeue(42), Err(QueueError::NotFound(42)));
    }

    #[test]
    fn dequeue_is_fifo_and_empty_is_none() {
        let queues = SharedQueues::new();
        let (w, _r) = waker();
        let id = queues.register("vm", "q", w);
        assert_eq!(queues.dequeue(id), Ok(None));
        for item in ["one", "two", "three"] {
            queues.enqueue(id, Bytes::from(item)).unwrap();
        }
        assert_eq!(queues.dequeue(id), Ok(Some(Bytes::from("one"))));
        assert_eq!(queues.dequeue(id), Ok(Some(Bytes::from("two"))));
        assert_eq!(queues.dequeue(id), Ok(Some(Bytes::from("three"))));
        assert_eq!(queues.dequeue(id), Ok(None));
    }

    #[test]
    fn enqueue_without_any_live_waker_still_stores() {
        let queues = SharedQueues::new();
        let (w, r) = waker();
        let id = queues.register("vm", "q", w);
        drop(r);
        queues.enqueue(id, Bytes::from("kept")).unwrap();
        assert_eq!(queues.dequeue(id), Ok(Some(Bytes::from("kept"))));
    }

    #[test]
    fn wakeups_rotate_and_skip_dead_wakers() {
        let queues = SharedQueues::new();
        let (w1, mut r1) = waker();
        let (w2, r2) = waker();
        let (w3, mut r3) = waker();
        let id = queues.register("vm", "q", w1);
        queues.register("vm", "q", w2);
        queues.register("vm", "q", w3);
        drop(r2);
        for _ in 0..4 {
            queues.enqueue(id, Bytes::new()).unwrap();
        }
        let mut got1 = 0;
        while r1.try_recv() == Ok(id) {
            got1 += 1;
        }
        let mut got3 = 0;
        while r3.try_recv() == Ok(id) {
            got3 += 1;
        }
        assert_eq!((got1, got3), (2, 2));
    }

    #[test]
    fn same_channel_registered_twice_is_one_waker() {
        let queues = SharedQueues::new();
        let (w, mut r) = waker();
        let id = queues.register("vm", "q", w.clone());
        queues.register("vm", "q", w);
        queues.enqueue(id, Bytes::new()).unwrap();
        queues.enqueue(id, Bytes::new()).unwrap();
        assert_eq!(r.try_recv(), Ok(id));
        assert_eq!(r.try_recv(), Ok(id));
        assert!(r.try_recv().is_err());
    }

    #[test]
    fn full_queue_refuses_items() {
        let queues = SharedQueues::new();
        let (w, _r) = waker();
        let id = queues.register("vm", "q", w);
        for _ in 0..MAX_QUEUE_ITEMS {
            queues.enqueue(id, Bytes::new()).unwrap();
        }
        assert_eq!(queues.enqueue(id, Bytes::new()), Err(QueueError::Full(id)));
        queues.dequeue(id).unwrap();
        queues.enqueue(id, Bytes::new()).unwrap();
        assert_eq!(
            queues.enqueue(id, Bytes::from(vec![0u8; MAX_QUEUE_BYTES + 1])),
            Err(QueueError::Full(id))
        );
    }

    #[test]
    fn exactly_one_worker_thread_is_woken() {
        let queues = Arc::new(SharedQueues::new());
        let (w1, mut r1) = waker();
        let (w2, mut r2) = waker();
        let id = queues.register("vm", "q", w1);
        assert_eq!(queues.register("vm", "q", w2), id);

        // Each worker thread blocks on its own receiver until the channel
        // closes, counting the wakeups it got.
        let worker1 = std::thread::spawn(move || {
            let mut ids = Vec::new();
            while let Some(got) = r1.blocking_recv() {
                ids.push(got);
            }
            ids
        });
        let worker2 = std::thread::spawn(move || {
            let mut ids = Vec::new();
            while let Some(got) = r2.blocking_recv() {
                ids.push(got);
            }
            ids
        });

        let producer = {
            let queues = Arc::clone(&queues);
            std::thread::spawn(move || queues.enqueue(id, Bytes::from("only")))
        };
        producer.join().unwrap().unwrap();
        assert_eq!(queues.dequeue(id), Ok(Some(Bytes::from("only"))));
        // Dropping the store drops the wakers, which ends both workers' loops.
        drop(queues);
        let ids1 = worker1.join().unwrap();
        let ids2 = worker2.join().unwrap();
        let mut all = ids1.clone();
        all.extend(&ids2);
        assert_eq!(
            all,
            vec![id],
            "worker 1 got {ids1:?}, worker 2 got {ids2:?}"
        );
    }
}
