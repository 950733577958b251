//! Lacewing's own filters in the mesh. The modules the `lacewing` binary
//! ships are put into the module store at start, so sidecars download,
//! sandbox and hot-reload them exactly as uploaded ones; a `WasmPlugin` names
//! one as `builtin:<name>`. From the mesh documents the control plane also
//! adds plugins of its own to every snapshot:
//!
//! - `lacewing-authz` (the `authz` filter) on the inbound listener of every
//!   service a `TrafficTarget` names as destination: one rule per target, its
//!   sources as mesh identities, its routes from the `HTTPRouteGroup` matches
//!   the target's rules select. Anything else is denied (403).
//! - `lacewing-telemetry-inbound` and `lacewing-telemetry-outbound` (the
//!   `telemetry` filter) on every sidecar, unless the namespace's `MeshConfig`
//!   turns telemetry off.

use std::collections::BTreeMap;

use lacewing_control_api as api;
use lacewing_mesh::Spec;
use lacewing_mesh::kinds::{self, Direction, Phase, TelemetrySettings};
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::operator::hex;
use crate::state::MeshView;
use crate::store::{Store, StoreError};

/// Name of the plugin the control plane derives from TrafficTargets.
pub const AUTHZ_PLUGIN: &str = "lacewing-authz";
/// Names of the telemetry plugins on the inbound and outbound listeners.
pub const TELEMETRY_INBOUND: &str = "lacewing-telemetry-inbound";
pub const TELEMETRY_OUTBOUND: &str = "lacewing-telemetry-outbound";

/// One plugin the index places: (phase, priority, namespace, selected
/// service or all of the namespace, plugin).
pub type Placed = (Phase, i32, String, Option<String>, api::Plugin);

/// The first-party filters this control plane ships, by name, with the
/// sha256 they are stored under.
#[derive(Debug, Clone, Default)]
pub struct FirstParty {
    modules: BTreeMap<&'static str, String>,
    names: Vec<&'static str>,
    trust_domain: String,
}

impl FirstParty {
    /// Stores every first-party module this binary embeds (a module already
    /// stored is kept) and remembers their digests.
    pub fn install(store: &dyn Store, trust_domain: &str) -> Result<Self, StoreError> {
        let mut modules = BTreeMap::new();
        for name in lacewing_filters::names() {
            let Some(bytes) = lacewing_filters::builtin(name) else {
                tracing::warn!(
                    filter = name,
                    "first-party filter not built into this binary; `builtin:{name}` is refused"
                );
                continue;
            };
            let sha = hex(&Sha256::digest(bytes));
            store.put_module(&sha, bytes)?;
            modules.insert(name, sha);
        }
        Ok(Self::from_modules(modules, trust_domain))
    }

    /// First-party filters with the given digests (for tests).
    pub fn from_modules(modules: BTreeMap<&'static str, String>, trust_domain: &str) -> Self {
        let names = modules.keys().copied().collect();
        Self {
            modules,
            names,
            trust_domain: trust_domain.to_string(),
        }
    }

    /// The filters `builtin:<name>` may name.
    pub fn names(&self) -> &[&'static str] {
        &self.names
    }

    /// The stored digest of filter `name`.
    pub fn sha256(&self, name: &str) -> Option<&str> {
        self.modules.get(name).map(String::as_str)
    }

    /// The digest a plugin's `module` resolves to: `sha256:<hex>` as is,
    /// `builtin:<name>` to the shipped filter's.
    pub fn resolve<'a>(&'a self, module: &'a str) -> Option<&'a str> {
        match module.strip_prefix("builtin:") {
            Some(name) => self.sha256(name),
            None => module.strip_prefix("sha256:"),
        }
    }

    /// The plugins the control plane adds for `view`: `authz` per
    /// TrafficTarget destination, `telemetry` per namespace and service.
    /// A filter not built into this binary is left out (and logged at start).
    pub fn plugins(&self, view: &MeshView) -> Vec<Placed> {
        let mut out = Vec::new();
        if let Some(sha) = self.sha256("authz") {
            for ((ns, destination), config) in authz_configs(view, &self.trust_domain) {
                out.push((
                    Phase::Authz,
                    0,
                    ns.clone(),
                    Some(destination),
                    plugin(AUTHZ_PLUGIN, &ns, sha, Direction::Inbound, "authz", config),
                ));
            }
        }
        if let Some(sha) = self.sha256("telemetry") {
            for (ns, services, settings) in telemetry_scopes(view) {
                if !settings.enabled {
                    continue;
                }
                let base = json!({"access_log": settings.access_log, "trace": settings.trace});
                // Inbound, the destination is the sidecar's own service (the
                // cluster there is the local app); outbound, the cluster named.
                for service in services {
                    let mut config = base.clone();
                    config["destination"] = json!(service);
                    out.push((
                        Phase::Stats,
                        0,
                        ns.clone(),
                        Some(service),
                        plugin(
                            TELEMETRY_INBOUND,
                            &ns,
                            sha,
                            Direction::Inbound,
                            "stats",
                            config,
                        ),
                    ));
                }
                out.push((
                    Phase::Stats,
                    0,
                    ns.clone(),
                    None,
                    plugin(
                        TELEMETRY_OUTBOUND,
                        &ns,
                        sha,
                        Direction::Outbound,
                        "stats",
                        base,
                    ),
                ));
            }
        }
        out
    }
}

fn plugin(
    name: &str,
    ns: &str,
    sha256: &str,
    direction: Direction,
    phase: &str,
    configuration: serde_json::Value,
) -> api::Plugin {
    let limits = kinds::PluginLimits::default();
    api::Plugin {
        name: name.to_string(),
        namespace: ns.to_string(),
        sha256: sha256.to_string(),
        direction: match direction {
            Direction::Inbound => api::Direction::Inbound,
            Direction::Outbound => api::Direction::Outbound,
            Direction::Both => api::Direction::Both,
        } as i32,
        phase: phase.to_string(),
        priority: 0,
        fail_open: false,
        configuration: configuration.to_string().into_bytes(),
        root_id: String::new(),
        vm_id: String::new(),
        memory_limit_bytes: limits.memory.0,
        callback_timeout_ms: limits.callback_timeout.0.as_millis() as u64,
    }
}

/// The `authz` configuration of every (namespace, destination) that some
/// TrafficTarget names, in the filter's schema (see `filters/authz`).
pub fn authz_configs(
    view: &MeshView,
    trust_domain: &str,
) -> BTreeMap<(String, String), serde_json::Value> {
    let mut groups = BTreeMap::new();
    for doc in view.documents() {
        if let Spec::HttpRouteGroup(g) = &doc.spec {
            groups.insert((doc.namespace(), doc.name()), g);
        }
    }
    let mut rules: BTreeMap<(String, String), Vec<serde_json::Value>> = BTreeMap::new();
    for doc in view.documents() {
        let Spec::TrafficTarget(t) = &doc.spec else {
            continue;
        };
        let ns = doc.namespace();
        let sources: Vec<String> = t
            .sources
            .iter()
            .map(|s| format!("{}/{}", s.namespace.as_deref().unwrap_or(ns), s.name))
            .collect();
        let mut routes = Vec::new();
        for rule in &t.rules {
            let Some(group) = groups.get(&(ns, rule.name.as_str())) else {
                continue;
            };
            for m in &group.matches {
                if !rule.matches.is_empty() && !rule.matches.contains(&m.name) {
                    continue;
                }
                let mut route = serde_json::Map::new();
                if let Some(path) = &m.path_regex {
                    route.insert("path".into(), json!(path));
                }
                if !m.methods.is_empty() {
                    route.insert("methods".into(), json!(m.methods));
                }
                if !m.headers.is_empty() {
                    route.insert("headers".into(), json!(m.headers));
                }
                routes.push(serde_json::Value::Object(route));
            }
        }
        let entry = rules
            .entry((ns.to_string(), t.destination.name.clone()))
            .or_default();
        // A target whose rules select no route allows nothing (the filter
        // reads a rule without routes as "any request"), and one with no
        // source names no caller.
        if sources.is_empty() || (routes.is_empty() && !t.rules.is_empty()) {
            continue;
        }
        let mut rule = serde_json::Map::new();
        rule.insert("name".into(), json!(doc.name()));
        rule.insert("sources".into(), json!(sources));
        if !routes.is_empty() {
            rule.insert("routes".into(), serde_json::Value::Array(routes));
        }
        entry.push(serde_json::Value::Object(rule));
    }
    rules
        .into_iter()
        .map(|(key, rules)| (key, json!({"trust_domain": trust_domain, "rules": rules})))
        .collect()
}

/// Per namespace that has services: its services and telemetry settings.
fn telemetry_scopes(view: &MeshView) -> Vec<(String, Vec<String>, TelemetrySettings)> {
    let mut scopes: BTreeMap<String, (Vec<String>, TelemetrySettings)> = BTreeMap::new();
    for doc in view.documents() {
        if let Spec::Service(s) = &doc.spec
            && s.protocol != kinds::Protocol::Tcp
        {
            scopes
                .entry(doc.namespace().to_string())
                .or_default()
                .0
                .push(doc.name().to_string());
        }
    }
    for doc in view.documents() {
        if let Spec::MeshConfig(c) = &doc.spec
            && let Some(scope) = scopes.get_mut(doc.namespace())
        {
            scope.1 = c.telemetry.clone();
        }
    }
    scopes
        .into_iter()
        .map(|(ns, (services, settings))| (ns, services, settings))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(text: &str) -> MeshView {
        MeshView::parse(text, 1)
    }

    const SMI: &str = "\
apiVersion: lacewing.dev/v1alpha1
kind: Service
metadata: {name: orders}
spec: {port: 80}
---
apiVersion: lacewing.dev/v1alpha1
kind: Service
metadata: {name: frontend}
spec: {port: 80}
---
apiVersion: specs.smi-spec.io/v1alpha4
kind: HTTPRouteGroup
metadata: {name: orders-api}
spec:
  matches:
  - name: read
    pathRegex: /api/.*
    methods: [GET]
  - name: write
    pathRegex: /api/orders
    methods: [POST]
    headers:
    - content-type: application/json
---
kind: TrafficTarget
apiVersion: access.smi-spec.io/v1alpha3
metadata: {name: frontend-reads-orders}
spec:
  destination: {kind: ServiceAccount, name: orders, namespace: default}
  rules:
  - kind: HTTPRouteGroup
    name: orders-api
    matches: [read]
  sources:
  - {kind: ServiceAccount, name: frontend, namespace: default}
";

    #[test]
    fn a_traffic_target_becomes_an_authz_rule_on_its_destination() {
        let configs = authz_configs(&view(SMI), "mesh.local");
        assert_eq!(configs.len(), 1);
        let config = &configs[&("default".to_string(), "orders".to_string())];
        assert_eq!(
            config,
            &json!({
                "trust_domain": "mesh.local",
                "rules": [{
                    "name": "frontend-reads-orders",
                    "sources": ["default/frontend"],
                    "routes": [{"path": "/api/.*", "methods": ["GET"]}],
                }],
            })
        );
    }

    #[test]
    fn a_target_selecting_no_route_allows_nothing() {
        let text = SMI.replace("matches: [read]", "matches: []")
            + "---\napiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: empty}\nspec: {matches: []}\n"
            + "---\nkind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha3\nmetadata: {name: nothing}\n\
               spec:\n  destination: {kind: ServiceAccount, name: frontend}\n  rules: [{kind: HTTPRouteGroup, name: empty}]\n  \
               sources: [{kind: ServiceAccount, name: orders}]\n";
        let configs = authz_configs(&view(&text), "mesh.local");
        // frontend is now a destination with default deny and no rule.
        assert_eq!(
            configs[&("default".to_string(), "frontend".to_string())]["rules"],
            json!([])
        );
        // An empty `matches` selects every match of the group.
        let orders = &configs[&("default".to_string(), "orders".to_string())];
        assert_eq!(orders["rules"][0]["routes"].as_array().unwrap().len(), 2);
        assert_eq!(
            orders["rules"][0]["routes"][1]["headers"],
            json!({"content-type": "application/json"})
        );
    }

    #[test]
    fn telemetry_runs_everywhere_unless_turned_off() {
        let sha = "ab".repeat(32);
        let first_party = FirstParty::from_modules(
            BTreeMap::from([("telemetry", sha.clone()), ("authz", "cd".repeat(32))]),
            "mesh.local",
        );
        let names = |text: &str| {
            first_party
                .plugins(&view(text))
                .into_iter()
                .map(|(_, _, ns, sel, p)| format!("{ns}/{}/{}", sel.unwrap_or_default(), p.name))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(SMI),
            vec![
                "default/orders/lacewing-authz",
                "default/frontend/lacewing-telemetry-inbound",
                "default/orders/lacewing-telemetry-inbound",
                "default//lacewing-telemetry-outbound",
            ]
        );
        let off = format!(
            "{SMI}---\napiVersion: lacewing.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{telemetry: {{enabled: false}}}}\n"
        );
        assert_eq!(names(&off), vec!["default/orders/lacewing-authz"]);
    }
}
