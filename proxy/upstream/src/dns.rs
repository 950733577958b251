//! Host-name endpoints: resolved on a thread of their own (never on a worker,
//! never while a generation is built) and re-resolved periodically; the
//! endpoint sets of the watched clusters follow the answers.

use std::collections::HashMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::cluster::Cluster;

/// The answer for one `host:port`: its addresses, or why there are none.
pub(crate) type Answer = Result<Vec<SocketAddr>, String>;

type Cache = Arc<Mutex<HashMap<String, Answer>>>;

enum Message {
    /// Resolve these names now (those not known yet), then answer.
    Resolve {
        names: Vec<String>,
        done: mpsc::Sender<()>,
    },
    /// From now on, keep these clusters' endpoint sets in step with their names.
    Watch(Vec<Watched>),
}

/// A cluster with host-name endpoints: its endpoint specs in order.
pub(crate) struct Watched {
    pub(crate) cluster: Weak<Cluster>,
    pub(crate) specs: Vec<String>,
}

/// The resolver thread and what it learned. Dropping it stops the thread.
pub struct Resolver {
    tx: Mutex<mpsc::Sender<Message>>,
    cache: Cache,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver").finish_non_exhaustive()
    }
}

impl Resolver {
    /// Starts the resolver thread; watched names are resolved again every `refresh`.
    pub fn start(refresh: Duration) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel();
        let cache = Cache::default();
        let thread_cache = cache.clone();
        std::thread::Builder::new()
            .name("lacewing-dns".into())
            .spawn(move || run(&rx, &thread_cache, refresh))?;
        Ok(Self {
            tx: Mutex::new(tx),
            cache,
        })
    }

    /// Resolves the host names among `endpoints` that were never resolved,
    /// on the resolver thread, waiting at most `wait`. Names already known
    /// are answered from what the last resolution found.
    pub fn prepare<'a>(&self, endpoints: impl IntoIterator<Item = &'a str>, wait: Duration) {
        let names: Vec<String> = {
            let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            endpoints
                .into_iter()
                .filter(|e| is_host_name(e) && !cache.contains_key(*e))
                .map(str::to_string)
                .collect()
        };
        if names.is_empty() {
            return;
        }
        let (done, answered) = mpsc::channel();
        if self.send(Message::Resolve { names, done }) {
            let _ = answered.recv_timeout(wait);
        }
    }

    /// What the last resolution of `endpoint` (`host:port`) found; `None` when never resolved.
    pub(crate) fn lookup(&self, endpoint: &str) -> Option<Answer> {
        self.cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(endpoint)
            .cloned()
    }

    /// Keeps the endpoint sets of these clusters in step with their names.
    pub(crate) fn watch(&self, watched: Vec<Watched>) {
        self.send(Message::Watch(watched));
    }

    fn send(&self, message: Message) -> bool {
        self.tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(message)
            .is_ok()
    }
}

/// True for `host:port` where host is a name, not an address literal.
pub(crate) fn is_host_name(endpoint: &str) -> bool {
    endpoint.parse::<SocketAddr>().is_err()
}

/// A blocking lookup of `host:port`: every address, in the resolver's order.
pub(crate) fn resolve_now(endpoint: &str) -> Answer {
    let addrs: Vec<SocketAddr> = endpoint
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err("resolves to no address".into());
    }
    Ok(addrs)
}

/// The addresses of a cluster's endpoint specs: literals as they are, names
/// as last resolved (a name without an answer contributes nothing).
pub(crate) fn addresses(
    specs: &[String],
    answer: impl Fn(&str) -> Option<Answer>,
) -> Vec<SocketAddr> {
    let mut addrs = Vec::new();
    for spec in specs {
        let found = match spec.parse::<SocketAddr>() {
            Ok(addr) => vec![addr],
            Err(_) => answer(spec).and_then(Result::ok).unwrap_or_default(),
        };
        for addr in found {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
    }
    addrs
}

fn run(rx: &mpsc::Receiver<Message>, cache: &Cache, refresh: Duration) {
    let mut watched: Vec<Watched> = Vec::new();
    let mut next = Instant::now() + refresh;
    loop {
        let wait = next.saturating_duration_since(Instant::now());
        match rx.recv_timeout(wait) {
            Ok(Message::Resolve { names, done }) => {
                for name in names {
                    let answer = resolve_now(&name);
                    store(cache, name, answer);
                }
                let _ = done.send(());
            }
            Ok(Message::Watch(list)) => watched = list,
            Err(RecvTimeoutError::Timeout) => {
                watched.retain(|w| w.cluster.strong_count() > 0);
                refresh_watched(&watched, cache);
                next = Instant::now() + refresh;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn store(cache: &Cache, name: String, answer: Answer) {
    let mut cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    match (&answer, cache.get(&name)) {
        // A failed refresh keeps the last good answer.
        (Err(reason), Some(Ok(_))) => {
            tracing::warn!(endpoint = %name, %reason, "DNS refresh failed; keeping the last addresses");
        }
        _ => {
            cache.insert(name, answer);
        }
    }
}

/// Resolves every watched name again and moves each cluster to the answers.
fn refresh_watched(watched: &[Watched], cache: &Cache) {
    let mut names: Vec<&str> = watched
        .iter()
        .flat_map(|w| w.specs.iter().map(String::as_str))
        .filter(|s| is_host_name(s))
        .collect();
    names.sort_unstable();
    names.dedup();
    for name in names {
        store(cache, name.to_string(), resolve_now(name));
    }
    let cache = cache.lock().unwrap_or_else(PoisonError::into_inner);
    for w in watched {
        let Some(cluster) = w.cluster.upgrade() else {
            continue;
        };
        let addrs = addresses(&w.specs, |name| cache.get(name).cloned());
        if addrs != cluster.endpoints() {
            tracing::info!(cluster = %cluster.name(), endpoints = ?addrs, "DNS answer changed the endpoint set");
            cluster.set_endpoints(&addrs);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literals_pass_and_names_take_their_answers() {
        let specs = vec![
            "127.0.0.1:1".to_string(),
            "svc:2".to_string(),
            "gone:3".to_string(),
        ];
        let addrs = addresses(&specs, |name| match name {
            "svc:2" => Some(Ok(vec![
                "10.0.0.1:2".parse().unwrap(),
                "127.0.0.1:1".parse().unwrap(),
            ])),
            _ => None,
        });
        let expected: Vec<SocketAddr> = vec![
            "127.0.0.1:1".parse().unwrap(),
            "10.0.0.1:2".parse().unwrap(),
        ];
        assert_eq!(addrs, expected);
    }

    #[test]
    fn prepare_resolves_on_the_resolver_thread() {
        let resolver = Resolver::start(Duration::from_secs(3600)).unwrap();
        assert!(resolver.lookup("localhost:80").is_none());
        resolver.prepare(["localhost:80", "127.0.0.1:1"], Duration::from_secs(30));
        let answer = resolver
            .lookup("localhost:80")
            .expect("resolved")
            .expect("localhost resolves");
        assert!(
            answer
                .iter()
                .all(|a| a.port() == 80 && a.ip().is_loopback()),
            "{answer:?}"
        );
        assert!(
            resolver.lookup("127.0.0.1:1").is_none(),
            "literals need no resolution"
        );
    }
}
