//! Worker threads: each runs a current-thread tokio runtime with its own
//! listening sockets, connections, upstream pools and wasm VMs.

use std::cell::Cell;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lacewing_core::drain::DrainWatch;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::snapshot::ListenerSlot;

/// One listener socket owned by one worker.
#[derive(Debug)]
pub struct WorkerListener {
    pub socket: std::net::TcpListener,
    pub local: SocketAddr,
    pub slot: ListenerSlot,
    pub max_connections: usize,
}

/// Counts a worker's open connections so drain can wait for them.
#[derive(Debug, Default)]
struct Tracker {
    open: Cell<usize>,
    idle: Notify,
}

struct Tracked(Rc<Tracker>);

impl Tracked {
    fn new(t: &Rc<Tracker>) -> Self {
        t.open.set(t.open.get() + 1);
        Self(t.clone())
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let open = self.0.open.get() - 1;
        self.0.open.set(open);
        if open == 0 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Runs a worker until drained and its connections finished (or `drain_timeout` passed).
pub fn run(
    index: usize,
    listeners: Vec<WorkerListener>,
    drain: DrainWatch,
    drain_timeout: Duration,
    connection_ids: Arc<AtomicU64>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let tracker = Rc::new(Tracker::default());
        for l in listeners {
            let socket = match TcpListener::from_std(l.socket) {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(worker = index, error = %e, "cannot register listener");
                    continue;
                }
            };
            tokio::task::spawn_local(accept_loop(
                socket,
                l.local,
                l.slot,
                l.max_connections,
                drain.clone(),
                tracker.clone(),
                connection_ids.clone(),
            ));
        }
        let mut drain = drain;
        drain.signaled().await;
        if tracker.open.get() > 0 {
            let waited = tokio::time::timeout(drain_timeout, async {
                while tracker.open.get() > 0 {
                    tracker.idle.notified().await;
                }
            })
            .await;
            if waited.is_err() {
                tracing::warn!(
                    worker = index,
                    open = tracker.open.get(),
                    "drain timeout: closing remaining connections"
                );
            }
        }
    });
    Ok(())
}

async fn accept_loop(
    listener: TcpListener,
    local: SocketAddr,
    slot: ListenerSlot,
    max_connections: usize,
    mut drain: DrainWatch,
    tracker: Rc<Tracker>,
    ids: Arc<AtomicU64>,
) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.signaled() => break,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if tracker.open.get() >= max_connections {
            tracing::warn!(%remote, max_connections, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        }
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let guard = Tracked::new(&tracker);
        let drain = drain.clone();
        match &slot {
            ListenerSlot::Http(state) => {
                let state = state.clone();
                tokio::task::spawn_local(async move {
                    crate::http::server::serve(stream, remote, local, id, state, drain).await;
                    drop(guard);
                });
            }
            ListenerSlot::Tcp(state) => {
                let state = state.clone();
                tokio::task::spawn_local(async move {
                    crate::tcp::serve(stream, remote, local, id, state, drain).await;
                    drop(guard);
                });
            }
        }
    }
    // Dropping the socket refuses new connections from here on.
    drop(listener);
}
