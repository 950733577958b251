//! Per-worker-thread connection pools.
//!
//! Each worker thread keeps, per cluster and endpoint (by endpoint id, so an
//! endpoint keeps its connections when the cluster's endpoint set changes), a LIFO stack of idle
//! HTTP/1 connections and one shared HTTP/2 connection. Nothing here is shared
//! between threads, so checking a connection out or in takes no lock. Pools are
//! found by cluster id; a thread drops the pools of clusters that no longer
//! exist whenever it creates a pool for a new one (a configuration reload).
//!
//! Connection drivers are plain `tokio::spawn` tasks (the runtime may be
//! current-thread). An HTTP/1 connection goes back on the stack as soon as its
//! response head arrives and is taken again once hyper reports it ready (its
//! response body done); its idle time starts at the first sweep that finds it
//! ready, and its driver closes it once it has sat idle for the idle timeout
//! (so up to one sweep period, at most 10 s, after the idle timeout).
//! A sweeper task per thread and cluster drops expired entries: an HTTP/2 connection unused for the idle timeout
//! leaves the pool and closes once its last stream ends; the pools of a
//! removed cluster go at the next sweep.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hyper::client::conn::{http1, http2};
use lacewing_core::body::BoxBody;
use lacewing_core::stream::UpstreamConnection;
use lacewing_core::timer::ArmedSleep;
use rustc_hash::FxHashMap;
use tokio::sync::Notify;

use crate::breaker::ConnectionSlot;
use crate::clock::{LazyNow, millis, now_ms};
use crate::endpoint::Endpoint;

pub(crate) type H1Sender = http1::SendRequest<BoxBody>;
pub(crate) type H2Sender = http2::SendRequest<BoxBody>;

/// What plugins may read about a pooled connection, shared by its requests.
pub(crate) type ConnInfo = Arc<UpstreamConnection>;

/// When a pooled HTTP/1 connection went idle (clock ms), or [`BUSY`].
pub(crate) type IdleSince = Arc<AtomicU64>;

/// The [`IdleSince`] value of a connection carrying a request.
pub(crate) const BUSY: u64 = 0;

/// The [`IdleSince`] value of a connection whose driver found bytes beyond
/// the framing of its last response (it is closed, never pooled again).
const OVERRAN: u64 = u64::MAX;

/// One HTTP/1 upstream connection as the exchange it served sees it: whether
/// the upstream sent bytes beyond its response's framing. Shares the
/// connection's [`IdleSince`], so handing it out costs a reference count.
#[derive(Debug, Clone)]
pub struct H1Connection(IdleSince);

impl H1Connection {
    pub(crate) fn new(idle_since: &IdleSince) -> Self {
        Self(Arc::clone(idle_since))
    }

    /// Whether the connection received bytes beyond the end of a response
    /// while no request was waiting for one. Bytes read with the last bytes
    /// of a body are seen before that body's end reaches the exchange (the
    /// connection's driver runs on the exchange's thread and checks its read
    /// buffer in the same turn that hands over the body's end); bytes that
    /// come later are only seen later.
    pub fn overran(&self) -> bool {
        self.0.load(Ordering::Relaxed) == OVERRAN
    }
}

/// Whether `error`, ending an HTTP/1 connection, is hyper's verdict on bytes
/// that came while no response was due ("unexpected message"): hyper gives
/// that kind no predicate of its own, and it is the one kind that none of
/// the others cover and that has no cause (an I/O error has its `io::Error`).
fn is_unexpected_message(error: &hyper::Error) -> bool {
    use std::error::Error as _;
    !(error.is_parse()
        || error.is_user()
        || error.is_canceled()
        || error.is_closed()
        || error.is_incomplete_message()
        || error.is_body_write_aborted()
        || error.is_shutdown()
        || error.is_timeout())
        && error.source().is_none()
}

struct IdleH1 {
    sender: H1Sender,
    idle_since: IdleSince,
    info: ConnInfo,
}

#[derive(Default)]
enum H2Slot {
    #[default]
    Empty,
    /// A request is opening the connection; others wait for it.
    Connecting(Arc<Notify>),
    Ready {
        sender: H2Sender,
        last_used: u64,
        info: ConnInfo,
    },
}

struct EndpointConns {
    /// Gone once the endpoint left the cluster and its last request ended.
    alive: Weak<Endpoint>,
    idle: VecDeque<IdleH1>,
    h2: H2Slot,
}

struct ClusterConns {
    alive: Weak<()>,
    /// By endpoint id (FxHash: ids are ours, and each request looks up twice).
    endpoints: FxHashMap<u64, EndpointConns>,
}

thread_local! {
    static POOLS: RefCell<FxHashMap<u64, ClusterConns>> = RefCell::new(FxHashMap::default());
}

/// Names a cluster's pools on every thread.
#[derive(Debug, Clone)]
pub(crate) struct PoolKey {
    pub(crate) id: u64,
    /// Alive exactly as long as the cluster (nothing else holds it); lets
    /// threads drop the pools of removed clusters.
    pub(crate) alive: Weak<()>,
    pub(crate) idle_timeout: Duration,
}

/// Runs `f` on this thread's connections to one endpoint, creating the pool on
/// first use. `None` while the thread is being torn down.
fn with_endpoint<R>(
    key: &PoolKey,
    endpoint: &Arc<Endpoint>,
    create: bool,
    f: impl FnOnce(&mut EndpointConns) -> R,
) -> Option<R> {
    POOLS
        .try_with(|pools| {
            let mut pools = pools.try_borrow_mut().ok()?;
            if !pools.contains_key(&key.id) {
                if !create {
                    return None;
                }
                pools.retain(|_, conns| conns.alive.strong_count() > 0);
                pools.insert(
                    key.id,
                    ClusterConns {
                        alive: key.alive.clone(),
                        endpoints: FxHashMap::default(),
                    },
                );
                spawn_sweeper(key);
            }
            let endpoints = &mut pools.get_mut(&key.id)?.endpoints;
            let conns = if create {
                endpoints
                    .entry(endpoint.id)
                    .or_insert_with(|| EndpointConns {
                        alive: Arc::downgrade(endpoint),
                        idle: VecDeque::new(),
                        h2: H2Slot::Empty,
                    })
            } else {
                endpoints.get_mut(&endpoint.id)?
            };
            Some(f(conns))
        })
        .ok()
        .flatten()
}

/// Starts the task that keeps this thread's pool of a cluster tidy: it drops
/// closed or expired connections (an unused HTTP/2 connection closes once its
/// last stream ends) and removes the whole pool once the cluster is gone.
fn spawn_sweeper(key: &PoolKey) {
    if tokio::runtime::Handle::try_current().is_err() {
        return;
    }
    let (id, alive, idle_ms) = (key.id, key.alive.clone(), millis(key.idle_timeout));
    let period = (key.idle_timeout / 2).clamp(Duration::from_millis(50), Duration::from_secs(10));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(period).await;
            let cluster_gone = alive.strong_count() == 0;
            let keep_going = POOLS
                .try_with(|pools| {
                    let Ok(mut pools) = pools.try_borrow_mut() else {
                        return true;
                    };
                    if cluster_gone {
                        pools.remove(&id);
                        return false;
                    }
                    let Some(conns) = pools.get_mut(&id) else {
                        return false;
                    };
                    let now = now_ms();
                    // Connections to endpoints that left the cluster close here.
                    conns
                        .endpoints
                        .retain(|_, endpoint| endpoint.alive.strong_count() > 0);
                    for endpoint in conns.endpoints.values_mut() {
                        endpoint.sweep(now, idle_ms);
                    }
                    true
                })
                .unwrap_or(false);
            if !keep_going {
                return;
            }
        }
    });
}

impl EndpointConns {
    /// Drops closed and expired connections.
    fn sweep(&mut self, now: u64, idle_ms: u64) {
        self.idle.retain(|conn| {
            if conn.sender.is_closed() {
                return false;
            }
            let since = conn.idle_since.load(Ordering::Relaxed);
            if since == BUSY {
                // Checked in with its response still in flight: its idle time
                // starts at the first sweep that finds it ready.
                if conn.sender.is_ready() {
                    conn.idle_since.store(now, Ordering::Relaxed);
                }
                return true;
            }
            now.saturating_sub(since) < idle_ms
        });
        if let H2Slot::Ready {
            sender, last_used, ..
        } = &self.h2
            && (sender.is_closed() || now.saturating_sub(*last_used) >= idle_ms)
        {
            self.h2 = H2Slot::Empty;
        }
    }
}

/// The most recently used HTTP/1 connection that is ready for a request,
/// marked busy. Closed and expired connections met on the way are dropped;
/// connections whose response is still in flight stay.
pub(crate) fn checkout_h1(
    key: &PoolKey,
    endpoint: &Arc<Endpoint>,
    idle_timeout: Duration,
) -> Option<(H1Sender, IdleSince, ConnInfo)> {
    let idle_ms = millis(idle_timeout);
    with_endpoint(key, endpoint, true, |conns| {
        // Under load the connection on top was checked in busy: no clock read.
        let now = LazyNow::default();
        let mut at = conns.idle.len();
        while at > 0 {
            at -= 1;
            let conn = &conns.idle[at];
            let since = conn.idle_since.load(Ordering::Relaxed);
            let expired = since != BUSY && now.get().saturating_sub(since) >= idle_ms;
            if expired || conn.sender.is_closed() {
                conns.idle.remove(at);
                continue;
            }
            if !conn.sender.is_ready() {
                continue;
            }
            let conn = conns.idle.remove(at)?;
            conn.idle_since.store(BUSY, Ordering::Relaxed);
            return Some((conn.sender, conn.idle_since, conn.info));
        }
        None
    })
    .flatten()
}

/// Puts an HTTP/1 connection back on top of the stack as soon as its response
/// head arrived: [`checkout_h1`] takes it once hyper reports it ready (its
/// response body done), and its idle time starts then (see `sweep`). Checking
/// in at once, instead of from a task awaiting readiness, saves a task spawn
/// and two wake-ups per request.
pub(crate) fn checkin_h1(
    key: &PoolKey,
    endpoint: &Arc<Endpoint>,
    sender: H1Sender,
    idle_since: IdleSince,
    info: ConnInfo,
) {
    if sender.is_closed() {
        return;
    }
    with_endpoint(key, endpoint, false, |conns| {
        while conns
            .idle
            .front()
            .is_some_and(|conn| conn.sender.is_closed())
        {
            conns.idle.pop_front();
        }
        let since = if sender.is_ready() { now_ms() } else { BUSY };
        idle_since.store(since, Ordering::Relaxed);
        conns.idle.push_back(IdleH1 {
            sender,
            idle_since,
            info,
        });
    });
}

/// Idle HTTP/1 connections of a cluster on this thread, ready for a request.
pub(crate) fn idle_h1_count(key: &PoolKey) -> usize {
    POOLS
        .try_with(|pools| {
            let pools = pools.try_borrow().ok()?;
            let conns = pools.get(&key.id)?;
            Some(
                conns
                    .endpoints
                    .values()
                    .flat_map(|e| &e.idle)
                    .filter(|conn| !conn.sender.is_closed() && conn.sender.is_ready())
                    .count(),
            )
        })
        .ok()
        .flatten()
        .unwrap_or(0)
}

/// What a request finds in an endpoint's HTTP/2 slot.
pub(crate) enum H2Lookup {
    /// A live connection to multiplex on.
    Ready(H2Sender, ConnInfo),
    /// Another request is connecting; wait for it, then look again.
    Wait(Arc<Notify>),
    /// Nobody is connecting: this request must, then [`h2_install`] or [`h2_abandon`].
    Connect(Arc<Notify>),
    /// No pool on this thread: connect without sharing.
    Unpooled,
}

/// Looks up (and on a miss claims) the HTTP/2 connection to an endpoint.
pub(crate) fn h2_lookup(
    key: &PoolKey,
    endpoint: &Arc<Endpoint>,
    idle_timeout: Duration,
) -> H2Lookup {
    let idle_ms = millis(idle_timeout);
    with_endpoint(key, endpoint, true, |conns| {
        let now = now_ms();
        match &mut conns.h2 {
            H2Slot::Ready {
                sender,
                last_used,
                info,
            } if !sender.is_closed() && now.saturating_sub(*last_used) < idle_ms => {
                *last_used = now;
                return H2Lookup::Ready(sender.clone(), info.clone());
            }
            H2Slot::Connecting(notify) => return H2Lookup::Wait(Arc::clone(notify)),
            _ => {}
        }
        let notify = Arc::new(Notify::new());
        conns.h2 = H2Slot::Connecting(Arc::clone(&notify));
        H2Lookup::Connect(notify)
    })
    .unwrap_or(H2Lookup::Unpooled)
}

/// Publishes a new HTTP/2 connection and wakes the requests waiting for it.
pub(crate) fn h2_install(
    key: &PoolKey,
    endpoint: &Arc<Endpoint>,
    sender: H2Sender,
    info: ConnInfo,
) {
    with_endpoint(key, endpoint, true, |conns| {
        let previous = std::mem::replace(
            &mut conns.h2,
            H2Slot::Ready {
                sender,
                last_used: now_ms(),
                info,
            },
        );
        if let H2Slot::Connecting(notify) = previous {
            notify.notify_waiters();
        }
    });
}

/// Gives up a claim from [`h2_lookup`] (connect failed or was cancelled).
pub(crate) fn h2_abandon(key: &PoolKey, endpoint: &Arc<Endpoint>, claim: &Arc<Notify>) {
    with_endpoint(key, endpoint, false, |conns| {
        if matches!(&conns.h2, H2Slot::Connecting(n) if Arc::ptr_eq(n, claim)) {
            conns.h2 = H2Slot::Empty;
        }
    });
    claim.notify_waiters();
}

/// Forgets a pooled HTTP/2 connection that turned out to be closed.
pub(crate) fn h2_evict(key: &PoolKey, endpoint: &Arc<Endpoint>) {
    with_endpoint(key, endpoint, false, |conns| {
        if matches!(&conns.h2, H2Slot::Ready { .. }) {
            conns.h2 = H2Slot::Empty;
        }
    });
}

/// Drives an HTTP/1 connection until it closes, or until it has been idle in
/// the pool for `idle_timeout`. The slot is released when the task ends.
pub(crate) fn spawn_h1_driver<F>(
    conn: F,
    idle_since: IdleSince,
    idle_timeout: Duration,
    slot: ConnectionSlot,
) where
    F: Future<Output = hyper::Result<()>> + Send + 'static,
{
    let idle_ms = millis(idle_timeout).max(1);
    tokio::spawn(async move {
        let _slot = slot;
        tokio::pin!(conn);
        // Polled on every wake-up of this task (a few a request); armed,
        // it answers with one atomic load (about 0.2k instructions a
        // request less than polling a `Sleep`, callgrind).
        let mut check =
            ArmedSleep::until(tokio::time::Instant::now() + Duration::from_millis(idle_ms));
        loop {
            tokio::select! {
                result = &mut conn => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "upstream connection ended");
                        if is_unexpected_message(&error) {
                            idle_since.store(OVERRAN, Ordering::Relaxed);
                        }
                    }
                    return;
                }
                () = check.fired() => {
                    let since = idle_since.load(Ordering::Relaxed);
                    let idle_for = if since == BUSY { 0 } else { now_ms().saturating_sub(since) };
                    if idle_for >= idle_ms {
                        return;
                    }
                    check.reset(tokio::time::Instant::now() + Duration::from_millis(idle_ms - idle_for));
                }
            }
        }
    });
}

/// Drives an HTTP/2 connection until it closes; the slot is released after.
pub(crate) fn spawn_h2_driver<F>(conn: F, slot: ConnectionSlot)
where
    F: Future<Output = hyper::Result<()>> + Send + 'static,
{
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(error) = conn.await {
            tracing::debug!(%error, "upstream h2 connection ended");
        }
    });
}
