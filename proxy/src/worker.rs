//! Worker threads: each runs a current-thread tokio runtime with its own
//! listening sockets, connections, upstream pools and wasm VMs. A worker
//! changes only through its command channel: publishing a generation starts
//! the plugins' VMs on it, then adds and removes its listeners.

use std::cell::Cell;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use lacewing_core::drain::DrainWatch;
use lacewing_wasm::{WasmHost, WasmPlugin};
use tokio::net::TcpListener;
use tokio::sync::{Notify, mpsc, oneshot};

use crate::snapshot::{HttpSlot, ListenerRef, ListenerState};

/// How often a worker drops the VMs of plugins whose last user went away.
const RETIRE_EVERY: Duration = Duration::from_secs(1);

/// One listener socket owned by one worker.
#[derive(Debug)]
pub struct WorkerListener {
    pub socket: std::net::TcpListener,
    pub local: SocketAddr,
    pub listener: ListenerRef,
}

/// A plugin whose VM did not start on a worker.
#[derive(Debug, Clone)]
pub struct PluginStartFailure {
    pub worker: usize,
    pub plugin: String,
    pub reason: String,
}

/// What a worker is asked to do.
pub enum Command {
    /// Start (or keep) each plugin's VM on this worker, then answer with the
    /// first failure, if any.
    StartPlugins {
        plugins: Vec<Arc<WasmPlugin>>,
        done: std::sync::mpsc::Sender<Result<(), PluginStartFailure>>,
    },
    /// Stop accepting on the `close` listeners (their connections finish),
    /// accept on the `listen` ones, then answer.
    Listeners {
        close: Vec<String>,
        listen: Vec<(String, WorkerListener)>,
        drain_timeout: Duration,
        done: std::sync::mpsc::Sender<()>,
    },
    /// Drop the VMs of plugins no longer in use now rather than at the next periodic look.
    RetirePlugins,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::StartPlugins { plugins, .. } => f
                .debug_struct("StartPlugins")
                .field("plugins", &plugins.len())
                .finish(),
            Command::Listeners { close, listen, .. } => f
                .debug_struct("Listeners")
                .field("close", close)
                .field("listen", &listen.iter().map(|(n, _)| n).collect::<Vec<_>>())
                .finish(),
            Command::RetirePlugins => f.write_str("RetirePlugins"),
        }
    }
}

/// The sending end of a worker's command channel.
pub type CommandSender = mpsc::UnboundedSender<Command>;
/// The receiving end, owned by the worker.
pub type CommandReceiver = mpsc::UnboundedReceiver<Command>;

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

/// What a worker keeps between commands.
struct Worker {
    index: usize,
    tracker: Rc<Tracker>,
    drain: DrainWatch,
    ids: Arc<AtomicU64>,
    wasm: Arc<WasmHost>,
    /// Dropping a listener's sender stops its accept loop.
    accepting: HashMap<String, oneshot::Sender<()>>,
    drain_timeout: Duration,
}

impl Worker {
    fn handle(&mut self, command: Command) {
        match command {
            Command::StartPlugins { plugins, done } => {
                let result = plugins.iter().try_for_each(|p| {
                    p.start_on_worker().map_err(|e| PluginStartFailure {
                        worker: self.index,
                        plugin: p.name().to_string(),
                        reason: e.to_string(),
                    })
                });
                let _ = done.send(result);
            }
            Command::Listeners {
                close,
                listen,
                drain_timeout,
                done,
            } => {
                self.drain_timeout = drain_timeout;
                for name in close {
                    self.accepting.remove(&name);
                }
                for (name, listener) in listen {
                    self.listen(name, listener);
                }
                let _ = done.send(());
            }
            Command::RetirePlugins => self.wasm.retire_dropped_plugins(),
        }
    }

    fn listen(&mut self, name: String, l: WorkerListener) {
        let socket = match TcpListener::from_std(l.socket) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(worker = self.index, listener = %name, error = %e, "cannot register listener");
                return;
            }
        };
        let (stop_tx, stop) = oneshot::channel();
        tokio::task::spawn_local(accept_loop(
            socket,
            l.local,
            l.listener,
            stop,
            self.drain.clone(),
            self.tracker.clone(),
            self.ids.clone(),
        ));
        self.accepting.insert(name, stop_tx);
    }
}

/// Runs a worker until drained and its connections finished (or the drain
/// timeout passed). It starts with no listener; commands add them.
pub fn run(
    index: usize,
    mut commands: CommandReceiver,
    drain: DrainWatch,
    connection_ids: Arc<AtomicU64>,
    wasm: Arc<WasmHost>,
) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let mut worker = Worker {
            index,
            tracker: Rc::new(Tracker::default()),
            drain: drain.clone(),
            ids: connection_ids,
            wasm,
            accepting: HashMap::new(),
            drain_timeout: Duration::ZERO,
        };
        let mut drain = drain;
        let mut retire = tokio::time::interval(RETIRE_EVERY);
        retire.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                command = commands.recv() => match command {
                    Some(command) => worker.handle(command),
                    None => break,
                },
                _ = retire.tick() => worker.wasm.retire_dropped_plugins(),
                _ = drain.signaled() => break,
            }
        }
        // A publish waiting on this worker learns that it stopped.
        drop(commands);
        let tracker = worker.tracker.clone();
        if tracker.open.get() > 0 {
            let waited = tokio::time::timeout(worker.drain_timeout, async {
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
    live: ListenerRef,
    mut stop: oneshot::Receiver<()>,
    mut drain: DrainWatch,
    tracker: Rc<Tracker>,
    ids: Arc<AtomicU64>,
) {
    // The publisher stores the generation before it asks for the listener.
    let Some(first) = live.load() else {
        return;
    };
    let mut backoff = first.accept_backoff();
    drop(first);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = drain.signaled() => break,
            _ = &mut stop => break,
        };
        let (stream, remote) = match accepted {
            Ok(a) => {
                backoff.succeeded();
                a
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                let wait = backoff.failed(&e);
                tokio::select! {
                    () = tokio::time::sleep(wait) => continue,
                    _ = drain.signaled() => break,
                    _ = &mut stop => break,
                }
            }
        };
        // The live generation's state of this listener, read once per connection.
        let Some(state) = live.load() else {
            // A generation without this listener is live and the command to
            // stop accepting is on its way: stop now.
            break;
        };
        let max_connections = state.max_connections();
        if tracker.open.get() >= max_connections {
            tracing::warn!(%remote, max_connections, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        }
        let id = ids.fetch_add(1, Ordering::Relaxed);
        let guard = Tracked::new(&tracker);
        let drain = drain.clone();
        match state {
            ListenerState::Http(state) => {
                let tls = state.tls.clone();
                let slot = HttpSlot::new(&live, state);
                tokio::task::spawn_local(async move {
                    match tls {
                        Some(tls) => {
                            crate::http::tls::serve_tcp(
                                stream, tls, remote, local, id, slot, drain,
                            )
                            .await;
                        }
                        None => {
                            crate::http::server::serve(stream, remote, local, id, slot, drain)
                                .await;
                        }
                    }
                    drop(guard);
                });
            }
            ListenerState::Tcp(state) => {
                let listener = live.clone();
                tokio::task::spawn_local(async move {
                    crate::tcp::serve(stream, remote, local, id, state, listener, drain).await;
                    drop(guard);
                });
            }
        }
    }
    // Dropping the socket refuses new connections from here on.
    drop(listener);
}
