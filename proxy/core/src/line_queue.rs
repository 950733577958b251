//! A bounded queue of log lines drained by one writer thread.
//!
//! Workers hand finished lines to the queue and never block on, nor make a
//! system call for, the sink: the access log and plugin log lines go through
//! it. The writer thread gathers what is queued into one batch per write
//! (every [`WRITER_POLL`] at most while lines flow, as soon as it is done
//! writing otherwise; an idle writer sleeps until a line comes). A full
//! queue refuses the line, and the caller counts it.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::time::{Duration, Instant};

/// Bytes gathered before they are written even though more lines are queued.
const BATCH_BYTES: usize = 64 * 1024;

/// How long the writer thread sleeps once it has emptied the queue.
pub const WRITER_POLL: Duration = Duration::from_millis(20);

/// Empty polls in a row (about a second) after which the writer thread
/// blocks until the next line.
pub const IDLE_POLLS: u32 = 50;

/// The sending side; cheap to clone. The writer thread ends once every clone
/// is dropped and the queue is drained.
#[derive(Clone)]
pub struct LineQueue {
    queue: SyncSender<Vec<u8>>,
    /// Lines queued and not yet handed to the sink.
    pending: Arc<AtomicU64>,
}

impl std::fmt::Debug for LineQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LineQueue")
    }
}

/// Why a line was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The queue holds as many lines as it may: the sink is behind.
    Full,
    /// The writer thread is gone (its sink panicked).
    WriterGone,
}

impl LineQueue {
    /// Starts a writer thread named `name` that writes to `sink`, with room
    /// for `capacity` waiting lines. `on_write_error` gets the number of
    /// lines of every batch the sink failed to take.
    pub fn spawn(
        name: &str,
        sink: Box<dyn Write + Send>,
        capacity: usize,
        on_write_error: impl Fn(u64) + Send + 'static,
    ) -> std::io::Result<Self> {
        let (queue, lines) = mpsc::sync_channel(capacity);
        let pending = Arc::new(AtomicU64::new(0));
        let written = pending.clone();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || write_lines(&lines, sink, &on_write_error, &written))?;
        Ok(Self { queue, pending })
    }

    /// Queues one line (its bytes, the newline included); never blocks.
    pub fn send(&self, line: Vec<u8>) -> Result<(), Refused> {
        self.pending.fetch_add(1, Ordering::Relaxed);
        let refused = match self.queue.try_send(line) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(_)) => Refused::Full,
            Err(TrySendError::Disconnected(_)) => Refused::WriterGone,
        };
        self.pending.fetch_sub(1, Ordering::Relaxed);
        Err(refused)
    }

    /// Waits until every line queued so far went to the sink, or `timeout`
    /// passed (a process about to exit calls this so its last lines are kept).
    /// Returns whether the queue was drained.
    pub fn flush(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while self.pending.load(Ordering::Acquire) > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }
}

/// The writer thread: writes queued lines in batches, one batch whenever the
/// queue runs empty (or the batch is large).
///
/// While lines flow it polls (sleeping [`WRITER_POLL`] when there is nothing
/// to write) rather than blocking in `recv`: with no receiver waiting, a
/// sender's `try_send` never takes the channel's wake-up lock, so queueing a
/// line stays a lock-free compare-and-swap on the worker. After
/// [`IDLE_POLLS`] empty polls in a row it blocks in `recv` instead, so an idle
/// proxy has no timer wake-ups; the first line after that pays one wake-up.
fn write_lines(
    lines: &Receiver<Vec<u8>>,
    mut sink: Box<dyn Write + Send>,
    on_write_error: &dyn Fn(u64),
    pending: &AtomicU64,
) {
    let write_batch = |sink: &mut Box<dyn Write + Send>, batch: &mut Vec<u8>, count: u64| {
        write_batch(sink.as_mut(), batch, count, on_write_error);
        pending.fetch_sub(count, Ordering::Release);
    };
    let mut batch = Vec::with_capacity(BATCH_BYTES);
    let mut count = 0u64;
    let mut empty_polls = 0u32;
    loop {
        let next = if empty_polls >= IDLE_POLLS {
            empty_polls = 0;
            lines.recv().map_err(|_| TryRecvError::Disconnected)
        } else {
            lines.try_recv()
        };
        match next {
            Ok(line) => {
                empty_polls = 0;
                batch.extend_from_slice(&line);
                count += 1;
                if batch.len() >= BATCH_BYTES {
                    write_batch(&mut sink, &mut batch, count);
                    count = 0;
                }
            }
            Err(TryRecvError::Empty) => {
                write_batch(&mut sink, &mut batch, count);
                count = 0;
                empty_polls += 1;
                std::thread::sleep(WRITER_POLL);
            }
            Err(TryRecvError::Disconnected) => {
                write_batch(&mut sink, &mut batch, count);
                return;
            }
        }
    }
}

/// Writes and flushes `batch` (`count` lines), reporting them lost if the sink fails.
fn write_batch(sink: &mut dyn Write, batch: &mut Vec<u8>, count: u64, lost: &dyn Fn(u64)) {
    if count == 0 {
        return;
    }
    if sink.write_all(batch).and_then(|()| sink.flush()).is_err() {
        lost(count);
    }
    batch.clear();
}
