//! authz: allows a request when the caller's identity (`source.principal`, a
//! SPIFFE id `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`) is
//! among a rule's sources and the request matches one of the rule's routes;
//! everything else gets 403 with the reason. SMI TrafficTarget (sources) and
//! HTTPRouteGroup (routes) semantics; the configuration schema is in README.md.

mod policy;

use std::cell::RefCell;
use std::rc::Rc;

use lacewing_sdk::http::{Headers, send_response};
use lacewing_sdk::keys::{Key, KeyMap};
use lacewing_sdk::metrics::Counter;
use lacewing_sdk::{Action, Filter, Plugin};

pub use policy::{Config, Decision, Policy, RequestView};

/// The plugin: the compiled policy and its counters.
pub struct Authz {
    policy: Policy,
    /// Per source: the `authz_allowed` counter of each rule (by index) and
    /// the `authz_denied` counter, each defined on first use. Found by the
    /// source alone, so a request builds no metric name and allocates nothing.
    /// Keyed by a [`Key`] refilled per request: SipHash and `memcmp` on the
    /// SPIFFE id cost about 1.4k instructions a request.
    counters: RefCell<(Key, KeyMap<SourceCounters>)>,
}

/// One source's counters; `None` inside: not defined yet, or refused by the host.
#[derive(Default)]
struct SourceCounters {
    allowed: Vec<Option<Option<Counter>>>,
    denied: Option<Option<Counter>>,
}

impl Authz {
    /// Adds one to the allow counter of `source` and rule `rule`, or to the
    /// deny counter of `source` when `rule` is `None`.
    fn count(&self, source: &str, rule: Option<usize>) {
        let mut counters = self.counters.borrow_mut();
        let (probe, counters) = &mut *counters;
        probe.text_mut().clear();
        probe.text_mut().push_str(source);
        let entry = match counters.get_mut(probe) {
            Some(entry) => entry,
            None => counters.entry(probe.clone()).or_default(),
        };
        let counter = match rule {
            Some(index) => {
                if entry.allowed.len() <= index {
                    entry.allowed.resize(index + 1, None);
                }
                entry.allowed[index].get_or_insert_with(|| {
                    let rule = self.policy.rule_name(index);
                    Counter::define(&format!("authz_allowed.source.{source}.rule.{rule}")).ok()
                })
            }
            None => entry.denied.get_or_insert_with(|| {
                Counter::define(&format!("authz_denied.source.{source}")).ok()
            }),
        };
        // Metrics must not fail requests: a host error is dropped.
        if let Some(counter) = counter {
            let _ = counter.inc();
        }
    }
}

impl Plugin for Authz {
    type Config = Config;
    type Filter = AuthzFilter;

    fn configure(config: Config) -> Result<Self, String> {
        Ok(Authz {
            policy: Policy::compile(config)?,
            counters: RefCell::new((Key::default(), KeyMap::default())),
        })
    }

    fn new_filter(self: &Rc<Self>) -> AuthzFilter {
        AuthzFilter {
            plugin: self.clone(),
        }
    }
}

/// The per-request check.
pub struct AuthzFilter {
    plugin: Rc<Authz>,
}

impl Filter for AuthzFilter {
    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        let principal = lacewing_sdk::property("source.principal").ok().flatten();
        let decide = |pairs: &[(&str, &str)]| {
            self.plugin.policy.decide(&RequestView {
                principal: principal.as_deref(),
                headers: pairs,
            })
        };
        let decision = if self.plugin.policy.reads_headers() {
            // Headers borrowed from the host's one buffer: no copy per header.
            headers.with_all(decide).unwrap_or_else(|_| decide(&[]))
        } else {
            // The method and the path only: copying and decoding the whole
            // map cost about 4k instructions a request.
            let method = headers.with_value(":method", str::to_owned).ok().flatten();
            let method = method.as_deref().unwrap_or("");
            headers
                .with_value(":path", |path| {
                    decide(&[(":method", method), (":path", path)])
                })
                .ok()
                .flatten()
                .unwrap_or_else(|| decide(&[(":method", method)]))
        };
        let source = principal.as_deref().unwrap_or("unauthenticated");
        match decision {
            Decision::Allow { rule } => {
                self.plugin.count(source, Some(rule));
                Action::Continue
            }
            Decision::Deny { reason } => {
                self.plugin.count(source, None);
                let body = format!("403 Forbidden: {reason}\n");
                if let Err(e) = send_response(
                    403,
                    &[
                        ("content-type", "text/plain"),
                        ("x-lacewing-authz", "denied"),
                    ],
                    body.as_bytes(),
                    "authz_denied",
                ) {
                    lacewing_sdk::error!("authz: cannot send the 403: {e}");
                }
                Action::Pause
            }
        }
    }
}

lacewing_sdk::register!(Authz);
