//! `MeshTLS` documents → what each sidecar does with TLS: the mode of its
//! inbound listener and, for every service it may call, whether it calls over
//! mTLS and which SPIFFE ID the server must prove.
//!
//! The mode of a call from `source` to `destination` is, first match wins: a
//! document for `destination` listing `source`; a document for `destination`
//! without sources; the mesh-wide default (`lacewing control --default-tls`,
//! PERMISSIVE unless set). A call is made over mTLS when its mode is STRICT,
//! or PERMISSIVE and every endpoint of the destination is a sidecar (a static
//! endpoint has no mesh identity). The inbound listener of `destination` is
//! STRICT when every mode that applies to it is STRICT, DISABLE when every one
//! is DISABLE, and PERMISSIVE otherwise (some callers may send plaintext).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use lacewing_control_api as api;
use lacewing_mesh::Spec;
use lacewing_mesh::kinds::TlsMode;
use lacewing_tls::SpiffeId;

use crate::state::MeshView;

/// The mesh's identity settings that are not documents.
#[derive(Debug, Clone)]
pub struct MeshTlsSettings {
    pub trust_domain: String,
    /// The mode of a destination no document names.
    pub default_mode: TlsMode,
}

impl Default for MeshTlsSettings {
    fn default() -> Self {
        Self {
            trust_domain: crate::ca::DEFAULT_TRUST_DOMAIN.to_string(),
            default_mode: TlsMode::Permissive,
        }
    }
}

#[derive(Debug, Default)]
struct Destination {
    /// From a document without sources.
    all: Option<TlsMode>,
    by_source: HashMap<String, TlsMode>,
}

/// The `MeshTLS` rules of one mesh version.
#[derive(Debug)]
pub struct TlsRules {
    settings: MeshTlsSettings,
    /// By (namespace, destination).
    destinations: HashMap<(String, String), Destination>,
    /// Services whose endpoints are all sidecars, by (namespace, name).
    sidecar_only: BTreeSet<(String, String)>,
    /// The trust bundle (PEM, the signing root first) and the signing root's sha256.
    trust_bundle_pem: String,
    signing_root_sha256: String,
}

impl TlsRules {
    pub fn build(
        view: &MeshView,
        sidecar_endpoints: &BTreeMap<(String, String), Vec<String>>,
        settings: &MeshTlsSettings,
        trust_bundle_pem: &str,
    ) -> Self {
        let mut destinations: HashMap<(String, String), Destination> = HashMap::new();
        let mut sidecar_only = BTreeSet::new();
        for doc in view.documents() {
            let ns = doc.namespace().to_string();
            match &doc.spec {
                Spec::MeshTls(t) => {
                    let d = destinations.entry((ns, t.destination.clone())).or_default();
                    if t.sources.is_empty() {
                        d.all = Some(t.mode);
                    }
                    for s in &t.sources {
                        d.by_source.insert(s.clone(), t.mode);
                    }
                }
                Spec::Service(s) if s.endpoints.is_empty() => {
                    let key = (ns, doc.name().to_string());
                    if sidecar_endpoints.contains_key(&key) {
                        sidecar_only.insert(key);
                    }
                }
                _ => {}
            }
        }
        Self {
            settings: settings.clone(),
            destinations,
            sidecar_only,
            trust_bundle_pem: trust_bundle_pem.to_string(),
            signing_root_sha256: crate::roots::first_root_sha256(trust_bundle_pem),
        }
    }

    /// The mode of calls from `source` to `destination` in `namespace`.
    pub fn mode(&self, namespace: &str, source: &str, destination: &str) -> TlsMode {
        let Some(d) = self
            .destinations
            .get(&(namespace.to_string(), destination.to_string()))
        else {
            return self.settings.default_mode;
        };
        d.by_source
            .get(source)
            .copied()
            .or(d.all)
            .unwrap_or(self.settings.default_mode)
    }

    /// The mode of the inbound listener of `service`.
    pub fn inbound(&self, namespace: &str, service: &str) -> TlsMode {
        let Some(d) = self
            .destinations
            .get(&(namespace.to_string(), service.to_string()))
        else {
            return self.settings.default_mode;
        };
        let mut modes: Vec<TlsMode> = d.by_source.values().copied().collect();
        modes.push(d.all.unwrap_or(self.settings.default_mode));
        if modes.iter().all(|m| *m == TlsMode::Strict) {
            TlsMode::Strict
        } else if modes.iter().all(|m| *m == TlsMode::Disable) {
            TlsMode::Disable
        } else {
            TlsMode::Permissive
        }
    }

    /// Fills in the TLS fields of `snapshot`, made for the sidecar `hello`.
    pub fn apply(&self, snapshot: &mut api::Snapshot, hello: &api::Hello) {
        snapshot.trust_domain = self.settings.trust_domain.clone();
        snapshot.trust_bundle_pem = self.trust_bundle_pem.clone();
        snapshot.signing_root_sha256 = self.signing_root_sha256.clone();
        snapshot.inbound_tls = wire(self.inbound(&hello.namespace, &hello.service)) as i32;
        for s in &mut snapshot.services {
            let mode = self.mode(&s.namespace, &hello.service, &s.name);
            let tls = match mode {
                TlsMode::Strict => true,
                TlsMode::Permissive => self
                    .sidecar_only
                    .contains(&(s.namespace.clone(), s.name.clone())),
                TlsMode::Disable => false,
            };
            s.client_tls = if tls {
                wire(mode)
            } else {
                api::MeshTlsMode::MeshTlsDisable
            } as i32;
            s.spiffe_id = SpiffeId::new(&self.settings.trust_domain, &s.namespace, &s.name)
                .map(|id| id.uri())
                .unwrap_or_default();
        }
    }
}

fn wire(mode: TlsMode) -> api::MeshTlsMode {
    match mode {
        TlsMode::Strict => api::MeshTlsMode::MeshTlsStrict,
        TlsMode::Permissive => api::MeshTlsMode::MeshTlsPermissive,
        TlsMode::Disable => api::MeshTlsMode::MeshTlsDisable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(text: &str) -> MeshView {
        MeshView::parse(text, 1)
    }

    const MESH: &str = "\
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
apiVersion: lacewing.dev/v1alpha1
kind: Service
metadata: {name: legacy}
spec: {port: 80, endpoints: ['10.0.0.9:80']}
---
apiVersion: lacewing.dev/v1alpha1
kind: Service
metadata: {name: audit}
spec: {port: 80}
---
apiVersion: lacewing.dev/v1alpha1
kind: MeshTLS
metadata: {name: orders-strict}
spec: {destination: orders, mode: STRICT}
---
apiVersion: lacewing.dev/v1alpha1
kind: MeshTLS
metadata: {name: audit-from-frontend}
spec: {destination: audit, sources: [frontend], mode: DISABLE}
";

    fn sidecars() -> BTreeMap<(String, String), Vec<String>> {
        ["orders", "frontend", "audit", "legacy"]
            .iter()
            .map(|s| {
                (
                    ("default".to_string(), s.to_string()),
                    vec!["127.0.0.1:1".to_string()],
                )
            })
            .collect()
    }

    #[test]
    fn documents_then_the_default_decide_each_pair() {
        let rules = TlsRules::build(&view(MESH), &sidecars(), &MeshTlsSettings::default(), "");
        assert_eq!(rules.mode("default", "frontend", "orders"), TlsMode::Strict);
        assert_eq!(rules.mode("default", "frontend", "audit"), TlsMode::Disable);
        assert_eq!(
            rules.mode("default", "orders", "audit"),
            TlsMode::Permissive
        );
        assert_eq!(rules.inbound("default", "orders"), TlsMode::Strict);
        // Frontend may call in plaintext, others with TLS.
        assert_eq!(rules.inbound("default", "audit"), TlsMode::Permissive);
        assert_eq!(rules.inbound("default", "frontend"), TlsMode::Permissive);

        let strict_default = MeshTlsSettings {
            default_mode: TlsMode::Strict,
            ..MeshTlsSettings::default()
        };
        let rules = TlsRules::build(&view(MESH), &sidecars(), &strict_default, "");
        assert_eq!(rules.inbound("default", "frontend"), TlsMode::Strict);
    }

    #[test]
    fn a_sidecar_calls_over_mtls_only_where_the_peer_can_answer() {
        let rules = TlsRules::build(&view(MESH), &sidecars(), &MeshTlsSettings::default(), "");
        let service = |name: &str| api::Service {
            name: name.into(),
            namespace: "default".into(),
            ..Default::default()
        };
        let mut snapshot = api::Snapshot {
            services: ["orders", "audit", "legacy", "frontend"]
                .iter()
                .map(|s| service(s))
                .collect(),
            ..Default::default()
        };
        let hello = api::Hello {
            service: "frontend".into(),
            namespace: "default".into(),
            ..Default::default()
        };
        rules.apply(&mut snapshot, &hello);
        let modes: Vec<_> = snapshot
            .services
            .iter()
            .map(|s| {
                (
                    s.name.as_str(),
                    api::MeshTlsMode::try_from(s.client_tls).unwrap(),
                )
            })
            .collect();
        assert_eq!(
            modes,
            [
                ("orders", api::MeshTlsMode::MeshTlsStrict),
                ("audit", api::MeshTlsMode::MeshTlsDisable),
                // A static endpoint has no identity: plaintext under PERMISSIVE.
                ("legacy", api::MeshTlsMode::MeshTlsDisable),
                ("frontend", api::MeshTlsMode::MeshTlsPermissive),
            ]
        );
        assert_eq!(
            snapshot.services[0].spiffe_id,
            "spiffe://lacewing.local/ns/default/sa/orders"
        );
        assert_eq!(
            snapshot.inbound_tls,
            api::MeshTlsMode::MeshTlsPermissive as i32
        );
    }
}
