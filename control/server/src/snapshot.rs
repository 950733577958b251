//! From the committed mesh and the connected sidecars to what one sidecar
//! receives. An [`Index`] is built once per change and shared by every
//! stream; [`Index::snapshot_for`] then only filters it.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};

use lacewing_control_api as api;
use lacewing_mesh::Spec;
use lacewing_mesh::kinds::{self, Direction, Fail, Lb, Protocol};

use crate::first_party::FirstParty;
use crate::push::Built;
use crate::state::MeshView;

/// The mesh in the shape snapshots are made of.
#[derive(Debug, Default)]
pub struct Index {
    pub epoch: u64,
    pub version: u64,
    /// Every service, endpoints filled in.
    services: Vec<api::Service>,
    splits: Vec<api::Split>,
    /// (namespace, selected service or all, plugin), in chain order.
    plugins: Vec<(String, Option<String>, api::Plugin)>,
    /// Sidecars of one service get the same snapshot: built and encoded
    /// once per index.
    built: Mutex<HashMap<(String, String), Arc<Built>>>,
}

impl Index {
    /// An index no change matches (so the first stream builds a real one).
    pub fn unbuilt() -> Self {
        Index {
            epoch: u64::MAX,
            ..Index::default()
        }
    }

    pub fn build(
        epoch: u64,
        view: &MeshView,
        sidecar_endpoints: &BTreeMap<(String, String), Vec<String>>,
        first_party: &FirstParty,
    ) -> Self {
        let mut index = Index {
            epoch,
            version: view.version,
            ..Index::default()
        };
        let mut plugins = Vec::new();
        for doc in view.documents() {
            let ns = doc.namespace().to_string();
            match &doc.spec {
                Spec::Service(s) => {
                    let mut endpoints = sidecar_endpoints
                        .get(&(ns.clone(), doc.name().to_string()))
                        .cloned()
                        .unwrap_or_default();
                    endpoints.extend(s.endpoints.iter().cloned());
                    endpoints.sort();
                    endpoints.dedup();
                    index.services.push(service(doc.name(), &ns, s, endpoints));
                }
                Spec::TrafficSplit(s) => index.splits.push(api::Split {
                    service: s.service.clone(),
                    namespace: ns,
                    backends: s
                        .backends
                        .iter()
                        .map(|b| api::Backend {
                            service: b.service.clone(),
                            weight: b.weight,
                        })
                        .collect(),
                }),
                Spec::WasmPlugin(p) => {
                    let Some(sha256) = first_party.resolve(&p.module) else {
                        continue;
                    };
                    let plugin = api::Plugin {
                        name: doc.name().to_string(),
                        namespace: ns.clone(),
                        sha256: sha256.to_string(),
                        direction: match p.direction {
                            Direction::Inbound => api::Direction::Inbound,
                            Direction::Outbound => api::Direction::Outbound,
                            Direction::Both => api::Direction::Both,
                        } as i32,
                        phase: p.phase.as_str().to_string(),
                        priority: p.priority,
                        fail_open: p.fail == Fail::Open,
                        configuration: match &p.configuration {
                            None => Vec::new(),
                            Some(serde_json::Value::String(s)) => s.clone().into_bytes(),
                            Some(other) => other.to_string().into_bytes(),
                        },
                        root_id: p.root_id.clone(),
                        vm_id: p.vm_id.clone(),
                        memory_limit_bytes: p.limits.memory.0,
                        callback_timeout_ms: p.limits.callback_timeout.0.as_millis() as u64,
                    };
                    plugins.push((
                        p.phase,
                        p.priority,
                        ns,
                        p.selector.as_ref().map(|s| s.service.clone()),
                        plugin,
                    ));
                }
                Spec::MeshTls(_)
                | Spec::TrafficTarget(_)
                | Spec::HttpRouteGroup(_)
                | Spec::MeshConfig(_) => {}
            }
        }
        plugins.extend(first_party.plugins(view));
        plugins.sort_by(|a, b| {
            (a.0, std::cmp::Reverse(a.1), &a.4.name).cmp(&(b.0, std::cmp::Reverse(b.1), &b.4.name))
        });
        index.plugins = plugins
            .into_iter()
            .map(|(_, _, ns, selector, plugin)| (ns, selector, plugin))
            .collect();
        index
    }

    /// The snapshot for one sidecar (revision left 0; the stream numbers it),
    /// shared with the other sidecars of its service.
    pub fn snapshot_for(&self, hello: &api::Hello) -> Arc<Built> {
        self.snapshot_with(hello, |_| {})
    }

    /// [`Index::snapshot_for`], with `finish` applied once when the
    /// service's snapshot is built (it may depend only on the sidecar's
    /// namespace and service, as the result is shared).
    pub fn snapshot_with(
        &self,
        hello: &api::Hello,
        finish: impl FnOnce(&mut api::Snapshot),
    ) -> Arc<Built> {
        let key = (hello.namespace.clone(), hello.service.clone());
        let mut built = self.built.lock().unwrap_or_else(PoisonError::into_inner);
        built
            .entry(key)
            .or_insert_with(|| {
                let mut snapshot = self.build_for(hello);
                finish(&mut snapshot);
                Arc::new(Built::new(snapshot))
            })
            .clone()
    }

    fn build_for(&self, hello: &api::Hello) -> api::Snapshot {
        let own = self
            .services
            .iter()
            .find(|s| s.name == hello.service && s.namespace == hello.namespace)
            .cloned()
            .unwrap_or_else(|| api::Service {
                name: hello.service.clone(),
                namespace: hello.namespace.clone(),
                ..default_service()
            });
        api::Snapshot {
            version: self.version,
            revision: 0,
            own: Some(own),
            services: self.services.clone(),
            splits: self.splits.clone(),
            plugins: self
                .plugins
                .iter()
                .filter(|(ns, selector, _)| {
                    *ns == hello.namespace && selector.as_ref().is_none_or(|s| *s == hello.service)
                })
                .map(|(_, _, p)| p.clone())
                .collect(),
            ..Default::default()
        }
    }
}

fn default_service() -> api::Service {
    let spec: kinds::ServiceSpec = kinds::ServiceSpec {
        port: 0,
        protocol: Protocol::Http,
        endpoints: Vec::new(),
        timeouts: Default::default(),
        retries: Default::default(),
        lb: Lb::RoundRobin,
        outlier: Default::default(),
    };
    service("", "", &spec, Vec::new())
}

fn service(name: &str, ns: &str, s: &kinds::ServiceSpec, endpoints: Vec<String>) -> api::Service {
    api::Service {
        name: name.to_string(),
        namespace: ns.to_string(),
        port: s.port,
        protocol: match s.protocol {
            Protocol::Http => api::Protocol::Http,
            Protocol::H2 => api::Protocol::H2,
            Protocol::Grpc => api::Protocol::Grpc,
            Protocol::Tcp => api::Protocol::Tcp,
        } as i32,
        endpoints,
        request_timeout_ms: s.timeouts.request.0.as_millis() as u64,
        connect_timeout_ms: s.timeouts.connect.0.as_millis() as u64,
        idle_timeout_ms: s.timeouts.idle.0.as_millis() as u64,
        retry_attempts: s.retries.attempts,
        retry_on_status: s.retries.on_status.iter().map(|&s| u32::from(s)).collect(),
        lb: match s.lb {
            Lb::RoundRobin => api::Lb::RoundRobin,
            Lb::LeastRequest => api::Lb::LeastRequest,
        } as i32,
        outlier_consecutive_failures: s.outlier.consecutive_failures,
        outlier_base_ejection_ms: s.outlier.base_ejection_time.0.as_millis() as u64,
        outlier_max_ejection_percent: s.outlier.max_ejection_percent,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(text: &str) -> MeshView {
        MeshView::parse(text, 7)
    }

    fn hello(service: &str) -> api::Hello {
        api::Hello {
            node_id: format!("{service}-1"),
            service: service.into(),
            namespace: "default".into(),
            inbound: "127.0.0.1:1".into(),
            ..Default::default()
        }
    }

    const MESH: &str = "\
apiVersion: lacewing.dev/v1alpha1
kind: Service
metadata: {name: orders}
spec: {port: 80, endpoints: ['10.0.0.9:80']}
---
apiVersion: lacewing.dev/v1alpha1
kind: Service
metadata: {name: web}
spec: {port: 80, protocol: h2}
---
apiVersion: lacewing.dev/v1alpha1
kind: WasmPlugin
metadata: {name: b-stats}
spec: {module: 'sha256:1111111111111111111111111111111111111111111111111111111111111111', phase: stats}
---
apiVersion: lacewing.dev/v1alpha1
kind: WasmPlugin
metadata: {name: a-authz}
spec: {module: 'sha256:2222222222222222222222222222222222222222222222222222222222222222', phase: authz, selector: {service: orders}}
";

    #[test]
    fn endpoints_are_sidecars_plus_static_ones() {
        let mut eps = BTreeMap::new();
        eps.insert(
            ("default".to_string(), "orders".to_string()),
            vec!["127.0.0.1:5".to_string()],
        );
        let index = Index::build(1, &view(MESH), &eps, &FirstParty::default());
        let snap = &index.snapshot_for(&hello("web")).snapshot;
        assert_eq!(snap.version, 7);
        let orders = snap.services.iter().find(|s| s.name == "orders").unwrap();
        assert_eq!(orders.endpoints, vec!["10.0.0.9:80", "127.0.0.1:5"]);
        assert_eq!(
            snap.own.as_ref().unwrap().protocol,
            api::Protocol::H2 as i32
        );
    }

    #[test]
    fn plugins_follow_selector_and_phase_order() {
        let index = Index::build(1, &view(MESH), &BTreeMap::new(), &FirstParty::default());
        let names = |s: Arc<Built>| {
            s.snapshot
                .plugins
                .iter()
                .map(|p| p.name.clone())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(index.snapshot_for(&hello("orders"))),
            vec!["a-authz", "b-stats"]
        );
        assert_eq!(names(index.snapshot_for(&hello("web"))), vec!["b-stats"]);
    }
}
