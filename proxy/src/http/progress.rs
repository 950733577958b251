//! What one downstream connection's timers and fair-share limit look at:
//! whether a request has come yet, whether response data is waiting for the
//! client and whether the client takes any (on the whole connection, and on
//! each HTTP/2 stream), and how many exchanges the connection holds on each
//! cluster.
//!
//! Everything here lives on the worker thread that serves the connection, so
//! it is plain `Cell`s: an update is a load and a store, no atomic, no clock
//! read. The connection's loop in [`super::server`] reads it when one of its
//! timers fires.

use std::cell::{Cell, OnceCell, RefCell};
use std::future::Future;
use std::rc::Rc;
use std::sync::Arc;

use lacewing_core::ResponseFlag;
use lacewing_upstream::Cluster;
use tokio::task::AbortHandle;

use super::proxy::ConnContext;

/// The progress of one downstream connection.
#[derive(Debug, Default)]
pub struct ConnProgress {
    /// Request heads that reached the proxy on this connection.
    requests: Cell<u64>,
    /// Exchanges not over yet (their handling, then their upstream body).
    open: Cell<usize>,
    /// Upstream response bodies that have data for the client, or that the
    /// client has not asked for yet (not waiting on their upstream).
    waiting_on_client: Cell<usize>,
    /// Response body frames handed over for the client, ever.
    frames: Cell<u64>,
    /// Why a timer closed the connection: the flag the exchanges it cut record.
    cut: Cell<Option<ResponseFlag>>,
    /// Exchanges held per cluster, by the cluster's address. A connection
    /// talks to few clusters, so a short vector beats a map.
    held: RefCell<Vec<(usize, usize)>>,
    /// The HTTP/2 streams whose tasks are running, each at its `index`.
    streams: RefCell<Vec<Rc<StreamWatch>>>,
}

impl ConnProgress {
    /// Whether any request head arrived.
    pub fn has_request(&self) -> bool {
        self.requests.get() > 0
    }

    /// The idleness view: (requests ever started, exchanges open now).
    pub fn exchange_view(&self) -> (u64, usize) {
        (self.requests.get(), self.open.get())
    }

    /// Response data is waiting for the client (or stopped waiting).
    pub(super) fn set_waiting_on_client(&self, waiting: bool) {
        let n = self.waiting_on_client.get();
        self.waiting_on_client
            .set(if waiting { n + 1 } else { n.saturating_sub(1) });
    }

    /// A response body frame went to the client.
    pub(super) fn frame_sent(&self) {
        self.frames.set(self.frames.get().wrapping_add(1));
    }

    /// The write-progress view: (bodies waiting on the client, frames sent).
    pub fn write_view(&self) -> (usize, u64) {
        (self.waiting_on_client.get(), self.frames.get())
    }

    /// Marks the connection as closed by a timer.
    pub fn cut(&self, flag: ResponseFlag) {
        self.cut.set(Some(flag));
    }

    /// The flag of the timer that closed the connection, if one did.
    pub(super) fn cut_flag(&self) -> Option<ResponseFlag> {
        self.cut.get()
    }

    /// The write timer's look at each HTTP/2 stream: a stream whose response
    /// data waited on the client at the previous look and still does, no
    /// frame taken in between, is cut (its task aborted, which resets the
    /// stream and drops its upstream body). Returns how many were cut.
    /// Costs one pass over the open streams per `write_timeout`.
    pub fn cut_stalled_streams(&self) -> usize {
        let mut stalled = Vec::new();
        for watch in self.streams.borrow().iter() {
            if watch.cut.get() {
                continue;
            }
            let frames = watch.frames.get();
            let waiting = watch.waiting.get();
            if waiting && watch.looked.get() == Some(frames) {
                watch.cut.set(true);
                stalled.extend(watch.abort.get().cloned());
            } else {
                watch.looked.set(waiting.then_some(frames));
            }
        }
        // Aborted once the registry is no longer borrowed: a task's end
        // takes its stream out of it.
        for task in &stalled {
            task.abort();
        }
        stalled.len()
    }
}

/// One HTTP/2 stream's response as the connection's write timer sees it,
/// kept up to date by the stream's upstream body. hyper polls a stream's
/// body only while the client has opened a window for it, so a stalled
/// stream's body cannot time itself: the connection looks at it instead.
#[derive(Debug, Default)]
pub struct StreamWatch {
    /// Its place in the connection's registry.
    index: Cell<usize>,
    /// Response data is waiting on the client.
    waiting: Cell<bool>,
    /// Response body frames handed over for the client.
    frames: Cell<u64>,
    /// `frames` at the write timer's last look, if data was waiting then.
    looked: Cell<Option<u64>>,
    /// The write timer cut the stream.
    cut: Cell<bool>,
    /// Ends the stream's task.
    abort: OnceCell<AbortHandle>,
}

impl StreamWatch {
    /// Response data is waiting on the client (or stopped waiting).
    pub(super) fn set_waiting_on_client(&self, waiting: bool) {
        self.waiting.set(waiting);
    }

    /// A response body frame went to the client.
    pub(super) fn frame_sent(&self) {
        self.frames.set(self.frames.get().wrapping_add(1));
    }

    /// Whether the write timer cut the stream.
    pub(super) fn is_cut(&self) -> bool {
        self.cut.get()
    }
}

tokio::task_local! {
    /// The watch of the HTTP/2 stream whose task is running.
    static STREAM: Rc<StreamWatch>;
}

/// The watch of the HTTP/2 stream being served, when called from one (an
/// HTTP/1.1 exchange runs in its connection's task and has none).
pub fn current_stream() -> Option<Rc<StreamWatch>> {
    STREAM.try_with(Rc::clone).ok()
}

/// Spawns the task of one of `conn`'s HTTP/2 streams, watched by its write
/// timer until it ends. Costs per stream: one small allocation, a push and a
/// swap-remove in the registry, and a task-local set around each poll.
pub fn spawn_stream<F>(conn: &Rc<ConnContext>, task: F)
where
    F: Future + 'static,
{
    let watch = Rc::new(StreamWatch::default());
    let registered = {
        let mut streams = conn.progress.streams.borrow_mut();
        watch.index.set(streams.len());
        streams.push(watch.clone());
        Registered {
            conn: conn.clone(),
            watch: watch.clone(),
        }
    };
    let handle = tokio::task::spawn_local(STREAM.scope(watch.clone(), async move {
        let _registered = registered;
        task.await;
    }));
    let _ = watch.abort.set(handle.abort_handle());
}

/// A stream in its connection's registry until its task ends (or is aborted).
struct Registered {
    conn: Rc<ConnContext>,
    watch: Rc<StreamWatch>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut streams = self.conn.progress.streams.borrow_mut();
        let index = self.watch.index.get();
        if streams
            .get(index)
            .is_some_and(|w| Rc::ptr_eq(w, &self.watch))
        {
            streams.swap_remove(index);
            if let Some(moved) = streams.get(index) {
                moved.index.set(index);
            }
        }
    }
}

/// One exchange, from its request head until its response is handed over
/// (a local reply) or its upstream body ends.
#[derive(Debug)]
pub struct OpenExchange(Rc<ConnContext>);

/// Counts a request head that arrived, open until the guard drops.
pub fn exchange_started(conn: &Rc<ConnContext>) -> OpenExchange {
    let progress = &conn.progress;
    progress
        .requests
        .set(progress.requests.get().wrapping_add(1));
    progress.open.set(progress.open.get() + 1);
    OpenExchange(conn.clone())
}

impl Drop for OpenExchange {
    fn drop(&mut self) {
        let open = &self.0.progress.open;
        open.set(open.get().saturating_sub(1));
    }
}

/// One exchange's place in its connection's share of a cluster; given back
/// when dropped (with the upstream response body, or earlier on failure).
#[derive(Debug)]
pub struct HeldShare {
    conn: Rc<ConnContext>,
    cluster: usize,
}

/// Takes one of the connection's places on `cluster`, or `None` when the
/// connection already holds its share of it (`share` of the cluster, see
/// [`Cluster::downstream_share`]).
pub fn hold(conn: &Rc<ConnContext>, cluster: &Arc<Cluster>, share: f64) -> Option<HeldShare> {
    let key = Arc::as_ptr(cluster) as usize;
    let mut held = conn.progress.held.borrow_mut();
    let index = match held.iter().position(|(k, _)| *k == key) {
        Some(index) => index,
        None => {
            held.push((key, 0));
            held.len() - 1
        }
    };
    if held[index].1 >= cluster.downstream_share(share) {
        return None;
    }
    held[index].1 += 1;
    Some(HeldShare {
        conn: conn.clone(),
        cluster: key,
    })
}

impl Drop for HeldShare {
    fn drop(&mut self) {
        let mut held = self.conn.progress.held.borrow_mut();
        if let Some(index) = held.iter().position(|(k, _)| *k == self.cluster) {
            held[index].1 -= 1;
            if held[index].1 == 0 {
                held.swap_remove(index);
            }
        }
    }
}
