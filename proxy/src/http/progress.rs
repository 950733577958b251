//! What one downstream connection's timers and fair-share limit look at:
//! whether a request has come yet, whether response data is waiting for the
//! client and whether the client takes any, and how many exchanges the
//! connection holds on each cluster.
//!
//! Everything here lives on the worker thread that serves the connection, so
//! it is plain `Cell`s: an update is a load and a store, no atomic, no clock
//! read. The connection's loop in [`super::server`] reads it when one of its
//! timers fires.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;

use lacewing_core::ResponseFlag;
use lacewing_upstream::Cluster;

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
