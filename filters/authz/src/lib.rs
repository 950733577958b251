//! authz: allows a request when the caller's identity (`source.principal`, a
//! SPIFFE id `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`) is
//! among a rule's sources and the request matches one of the rule's routes;
//! everything else gets 403 with the reason. SMI TrafficTarget (sources) and
//! HTTPRouteGroup (routes) semantics; the configuration schema is in README.md.

mod policy;

use std::rc::Rc;

use lacewing_sdk::http::{Headers, send_response};
use lacewing_sdk::metrics::{Counter, Family};
use lacewing_sdk::{Action, Filter, Plugin};

pub use policy::{Config, Decision, Policy, RequestView};

/// The plugin: the compiled policy and its counters.
pub struct Authz {
    policy: Policy,
    counters: Family<Counter>,
}

impl Authz {
    /// Adds one to the counter `name`, defining it on first use.
    fn count(&self, name: String) {
        self.counters.with(&name, |c| c.inc());
    }
}

impl Plugin for Authz {
    type Config = Config;
    type Filter = AuthzFilter;

    fn configure(config: Config) -> Result<Self, String> {
        Ok(Authz {
            policy: Policy::compile(config)?,
            counters: Family::default(),
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
        let all = headers.all().unwrap_or_default();
        let view = RequestView {
            principal: principal.as_deref(),
            headers: &all,
        };
        let source = principal.as_deref().unwrap_or("unauthenticated");
        match self.plugin.policy.decide(&view) {
            Decision::Allow { rule } => {
                self.plugin
                    .count(format!("authz_allowed.source.{source}.rule.{rule}"));
                Action::Continue
            }
            Decision::Deny { reason } => {
                self.plugin.count(format!("authz_denied.source.{source}"));
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
