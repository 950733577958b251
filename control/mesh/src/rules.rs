//! Validation: each document on its own ([`check_document`]), then the
//! references between documents ([`check_references`]): a split's services,
//! a plugin's selector and module, a target's identities and route groups.

use std::collections::BTreeSet;

use crate::document::{Document, Kind, Spec, key};
use crate::error::MeshIssue;

/// Problems of one document on its own, as (field path, reason).
pub fn check_document(doc: &Document) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut bad = |field: &str, reason: String| out.push((field.to_string(), reason));
    if let Err(reason) = check_name(&doc.metadata.name) {
        bad("metadata.name", reason);
    }
    if let Err(reason) = check_name(&doc.metadata.namespace) {
        bad("metadata.namespace", reason);
    }
    match &doc.spec {
        Spec::Service(s) => {
            if !(1..=65535).contains(&s.port) {
                bad("spec.port", "must be 1..65535".into());
            }
            for (i, e) in s.endpoints.iter().enumerate() {
                if let Err(reason) = check_endpoint(e) {
                    bad(&format!("spec.endpoints[{i}]"), reason);
                }
            }
            if s.timeouts.request.0.is_zero() {
                bad("spec.timeouts.request", "must be more than 0".into());
            }
            if s.timeouts.connect.0.is_zero() {
                bad("spec.timeouts.connect", "must be more than 0".into());
            }
            if s.retries.attempts > 10 {
                bad("spec.retries.attempts", "at most 10".into());
            }
            for (i, status) in s.retries.on_status.iter().enumerate() {
                if !(100..=599).contains(status) {
                    bad(
                        &format!("spec.retries.onStatus[{i}]"),
                        "must be an HTTP status 100..599".into(),
                    );
                }
            }
            if s.outlier.max_ejection_percent > 100 {
                bad("spec.outlier.maxEjectionPercent", "at most 100".into());
            }
        }
        Spec::WasmPlugin(p) => {
            if p.module.trim().is_empty() {
                bad(
                    "spec.module",
                    "must name a file, `sha256:<hex>` or `builtin:<name>`".into(),
                );
            } else if p.module.strip_prefix("builtin:").is_some_and(str::is_empty) {
                bad(
                    "spec.module",
                    "`builtin:` must be followed by a filter name".into(),
                );
            } else if let Some(hex) = p.module.strip_prefix("sha256:")
                && !is_sha256(hex)
            {
                bad(
                    "spec.module",
                    "`sha256:` must be followed by 64 lowercase hex digits".into(),
                );
            }
            if let Some(pin) = &p.sha256 {
                if !is_sha256(pin) {
                    bad("spec.sha256", "must be 64 lowercase hex digits".into());
                } else if let Some(hex) = p.module.strip_prefix("sha256:")
                    && hex != pin
                {
                    bad(
                        "spec.sha256",
                        format!("differs from the module's `sha256:{hex}`"),
                    );
                }
            }
            if let Some(sel) = &p.selector
                && let Err(reason) = check_name(&sel.service)
            {
                bad("spec.selector.service", reason);
            }
            if p.limits.memory.0 < 64 * 1024 {
                bad(
                    "spec.limits.memory",
                    "at least 64KiB (one wasm page)".into(),
                );
            }
            if p.limits.callback_timeout.0.is_zero() {
                bad("spec.limits.callbackTimeout", "must be more than 0".into());
            }
        }
        Spec::MeshTls(t) => {
            if let Err(reason) = check_name(&t.destination) {
                bad("spec.destination", reason);
            }
            for (i, s) in t.sources.iter().enumerate() {
                if let Err(reason) = check_name(s) {
                    bad(&format!("spec.sources[{i}]"), reason);
                }
            }
        }
        Spec::TrafficSplit(s) => {
            if s.backends.is_empty() {
                bad("spec.backends", "needs at least one backend".into());
            } else if s.backends.iter().all(|b| b.weight == 0) {
                bad("spec.backends", "weights must not all be 0".into());
            }
            let mut seen = BTreeSet::new();
            for (i, b) in s.backends.iter().enumerate() {
                if !seen.insert(&b.service) {
                    bad(
                        &format!("spec.backends[{i}].service"),
                        "listed twice".into(),
                    );
                }
            }
            for (i, m) in s.matches.iter().enumerate() {
                if m.kind != "HTTPRouteGroup" {
                    bad(
                        &format!("spec.matches[{i}].kind"),
                        "must be HTTPRouteGroup".into(),
                    );
                }
            }
        }
        Spec::TrafficTarget(t) => {
            for (field, subject) in
                std::iter::once(("spec.destination".to_string(), &t.destination)).chain(
                    t.sources
                        .iter()
                        .enumerate()
                        .map(|(i, s)| (format!("spec.sources[{i}]"), s)),
                )
            {
                if subject.kind != "ServiceAccount" {
                    bad(&format!("{field}.kind"), "must be ServiceAccount".into());
                }
            }
            if let Some(dest_ns) = &t.destination.namespace
                && *dest_ns != doc.metadata.namespace
            {
                bad(
                    "spec.destination.namespace",
                    format!(
                        "must be the TrafficTarget's own namespace `{}`",
                        doc.metadata.namespace
                    ),
                );
            }
            for (i, r) in t.rules.iter().enumerate() {
                if r.kind != "HTTPRouteGroup" {
                    bad(
                        &format!("spec.rules[{i}].kind"),
                        "must be HTTPRouteGroup".into(),
                    );
                }
            }
        }
        Spec::HttpRouteGroup(g) => {
            let mut seen = BTreeSet::new();
            for (i, m) in g.matches.iter().enumerate() {
                if !seen.insert(&m.name) {
                    bad(&format!("spec.matches[{i}].name"), "listed twice".into());
                }
                if let Some(re) = &m.path_regex
                    && let Err(e) = check_regex(re)
                {
                    bad(&format!("spec.matches[{i}].pathRegex"), e);
                }
                for (name, re) in &m.headers {
                    if http::HeaderName::from_bytes(name.as_bytes()).is_err() {
                        bad(
                            &format!("spec.matches[{i}].headers"),
                            format!("`{name}` is not a header name"),
                        );
                    }
                    if let Err(e) = check_regex(re) {
                        bad(&format!("spec.matches[{i}].headers.{name}"), e);
                    }
                }
            }
        }
        Spec::MeshConfig(_) => {}
    }
    out
}

/// A DNS-1123 label: what Kubernetes accepts as a name.
fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "`{name}` is not a name: 1-63 lowercase letters, digits and `-`, starting and ending with a letter or digit"
        ))
    }
}

fn check_endpoint(endpoint: &str) -> Result<(), String> {
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return Err(format!("`{endpoint}` is not host:port"));
    };
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(format!("`{endpoint}` is not host:port"));
    }
    Ok(())
}

/// 64 lowercase hex digits.
pub fn is_sha256(hex: &str) -> bool {
    hex.len() == 64
        && hex
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A regex as the `authz` filter compiles it: anchored to the whole value,
/// the `regex` crate's syntax without Unicode classes.
pub fn check_regex(re: &str) -> Result<(), String> {
    regex::Regex::new(&format!("^(?:{re})$"))
        .map(drop)
        .map_err(|e| format!("invalid regex `{re}`: {e}"))
}

/// What references may point at: the documents that would be stored, the
/// modules held and the first-party filters shipped.
pub struct Catalog<'a> {
    keys: BTreeSet<String>,
    has_module: &'a dyn Fn(&str) -> bool,
    builtins: &'a [&'a str],
}

impl<'a> Catalog<'a> {
    pub fn new<'d>(
        docs: impl IntoIterator<Item = &'d Document>,
        has_module: &'a dyn Fn(&str) -> bool,
    ) -> Self {
        Self {
            keys: docs.into_iter().map(Document::key).collect(),
            has_module,
            builtins: &[],
        }
    }

    /// The first-party filters `builtin:<name>` may name.
    pub fn with_builtins(mut self, builtins: &'a [&'a str]) -> Self {
        self.builtins = builtins;
        self
    }

    fn has(&self, kind: Kind, namespace: &str, name: &str) -> bool {
        self.keys.contains(&key(kind, namespace, name))
    }
}

/// Problems with the references of `docs` against everything in `catalog`
/// (which should hold `docs` too), each naming the document key and field.
pub fn check_references<'d>(
    docs: impl IntoIterator<Item = &'d Document>,
    catalog: &Catalog<'_>,
) -> Vec<MeshIssue> {
    let mut out = Vec::new();
    for doc in docs {
        let ns = doc.namespace();
        if matches!(doc.spec, Spec::TrafficTarget(_)) && !catalog.builtins.contains(&"authz") {
            out.push(MeshIssue::new(
                doc.key(),
                "spec",
                "this control plane was built without the first-party `authz` filter that enforces TrafficTargets (`cargo xtask build-filters`, then build `lacewing` again)",
            ));
        }
        let mut bad =
            |field: String, reason: String| out.push(MeshIssue::new(doc.key(), field, reason));
        let mut service = |field: String, name: &str| {
            if !catalog.has(Kind::Service, ns, name) {
                bad(field, format!("no Service `{name}` in namespace `{ns}`"));
            }
        };
        match &doc.spec {
            Spec::TrafficSplit(s) => {
                service("spec.service".into(), &s.service);
                for (i, b) in s.backends.iter().enumerate() {
                    service(format!("spec.backends[{i}].service"), &b.service);
                }
            }
            Spec::WasmPlugin(p) => {
                if let Some(sel) = &p.selector {
                    service("spec.selector.service".into(), &sel.service);
                }
            }
            Spec::MeshTls(t) => {
                service("spec.destination".into(), &t.destination);
                for (i, s) in t.sources.iter().enumerate() {
                    service(format!("spec.sources[{i}]"), s);
                }
            }
            Spec::TrafficTarget(t) => {
                service("spec.destination.name".into(), &t.destination.name);
                for (i, s) in t.sources.iter().enumerate() {
                    let source_ns = s.namespace.as_deref().unwrap_or(ns);
                    if !catalog.has(Kind::Service, source_ns, &s.name) {
                        bad(
                            format!("spec.sources[{i}].name"),
                            format!("no Service `{}` in namespace `{source_ns}`", s.name),
                        );
                    }
                }
            }
            Spec::MeshConfig(_) => {
                let others = catalog
                    .keys
                    .iter()
                    .filter(|k| {
                        k.strip_prefix("MeshConfig/")
                            .and_then(|rest| rest.split_once('/'))
                            .is_some_and(|(kns, _)| kns == ns)
                    })
                    .count();
                if others > 1 {
                    bad(
                        "metadata.name".into(),
                        format!("namespace `{ns}` has more than one MeshConfig; keep one"),
                    );
                }
            }
            Spec::Service(_) | Spec::HttpRouteGroup(_) => {}
        }
        let mut groups = Vec::new();
        match &doc.spec {
            Spec::TrafficSplit(s) => groups.extend(
                s.matches
                    .iter()
                    .enumerate()
                    .map(|(i, m)| (format!("spec.matches[{i}].name"), &m.name)),
            ),
            Spec::TrafficTarget(t) => groups.extend(
                t.rules
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (format!("spec.rules[{i}].name"), &r.name)),
            ),
            _ => {}
        }
        for (field, name) in groups {
            if !catalog.has(Kind::HttpRouteGroup, ns, name) {
                out.push(MeshIssue::new(
                    doc.key(),
                    field,
                    format!("no HTTPRouteGroup `{name}` in namespace `{ns}`"),
                ));
            }
        }
        if let Spec::WasmPlugin(p) = &doc.spec {
            if let Some(name) = p.module.strip_prefix("builtin:") {
                if !catalog.builtins.contains(&name) {
                    out.push(MeshIssue::new(
                        doc.key(),
                        "spec.module",
                        if catalog.builtins.is_empty() {
                            format!("no first-party filter `{name}`: this control plane was built without them (`cargo xtask build-filters` before building it)")
                        } else {
                            format!(
                                "no first-party filter `{name}`; known: {}",
                                catalog.builtins.join(", ")
                            )
                        },
                    ));
                }
                continue;
            }
            match p.module.strip_prefix("sha256:") {
                Some(hex) if !(catalog.has_module)(hex) => out.push(MeshIssue::new(
                    doc.key(),
                    "spec.module",
                    format!("no module with sha256 {hex} was uploaded"),
                )),
                Some(_) => {}
                None => out.push(MeshIssue::new(
                    doc.key(),
                    "spec.module",
                    "must be `sha256:<hex>` or `builtin:<name>` here (apply uploads files and writes their sha256)",
                )),
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_str;

    fn docs(text: &str) -> Vec<Document> {
        parse_str(text, "t.yaml")
            .unwrap()
            .into_iter()
            .map(|d| d.document)
            .collect()
    }

    #[test]
    fn split_to_unknown_service_is_named() {
        let docs = docs(
            "apiVersion: lacewing.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {port: 80}\n---\n\
             apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: s}\n\
             spec: {service: web, backends: [{service: web, weight: 1}, {service: web-v2, weight: 1}]}\n",
        );
        let none = |_: &str| false;
        let catalog = Catalog::new(&docs, &none);
        let issues = check_references(&docs, &catalog);
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].key, "TrafficSplit/default/s");
        assert_eq!(issues[0].field, "spec.backends[1].service");
        assert!(issues[0].reason.contains("no Service `web-v2`"));
    }

    #[test]
    fn plugin_module_must_be_uploaded() {
        let hex = "ab".repeat(32);
        let docs = docs(&format!(
            "apiVersion: lacewing.dev/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: p}}\nspec: {{module: 'sha256:{hex}'}}\n"
        ));
        let none = |_: &str| false;
        let issues = check_references(&docs, &Catalog::new(&docs, &none));
        assert!(
            issues[0].reason.contains("no module with sha256"),
            "{:?}",
            issues
        );
        let all = |_: &str| true;
        assert!(check_references(&docs, &Catalog::new(&docs, &all)).is_empty());
    }

    #[test]
    fn first_party_filters_must_be_shipped() {
        let docs = docs(
            "apiVersion: lacewing.dev/v1alpha1\nkind: Service\nmetadata: {name: web}\nspec: {port: 80}\n---\n\
             apiVersion: lacewing.dev/v1alpha1\nkind: WasmPlugin\nmetadata: {name: h}\nspec: {module: 'builtin:headers'}\n---\n\
             kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha3\nmetadata: {name: t}\n\
             spec: {destination: {kind: ServiceAccount, name: web}, sources: [{kind: ServiceAccount, name: web}]}\n",
        );
        let none = |_: &str| false;
        let shipped = ["authz", "headers"];
        let with = Catalog::new(&docs, &none).with_builtins(&shipped);
        assert!(check_references(&docs, &with).is_empty());
        let without = Catalog::new(&docs, &none);
        let issues = check_references(&docs, &without);
        let fields: Vec<(&str, &str)> = issues
            .iter()
            .map(|i| (i.key.as_str(), i.field.as_str()))
            .collect();
        assert_eq!(
            fields,
            [
                ("WasmPlugin/default/h", "spec.module"),
                ("TrafficTarget/default/t", "spec")
            ],
            "{issues:?}"
        );
        assert!(
            issues[1]
                .reason
                .contains("without the first-party `authz` filter")
        );
    }

    #[test]
    fn route_group_regexes_compile_and_headers_take_both_forms() {
        let text = |headers: &str, path: &str| {
            format!(
                "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {{name: g}}\n\
                 spec:\n  matches:\n  - name: m\n    pathRegex: '{path}'\n    headers: {headers}\n"
            )
        };
        let listed = docs(&text("[{x-a: 'v.*'}, {x-b: b}]", "/api/.*")).remove(0);
        let Spec::HttpRouteGroup(g) = &listed.spec else {
            panic!()
        };
        assert_eq!(g.matches[0].headers.len(), 2);
        let bad = parse_str(&text("{x-a: '(v'}", "/api/(x"), "t.yaml")
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("spec.matches[0].pathRegex: invalid regex `/api/(x`")
                && bad.contains("spec.matches[0].headers.x-a: invalid regex `(v`"),
            "{bad}"
        );
    }

    #[test]
    fn names_are_dns_labels() {
        assert!(check_name("orders-v2").is_ok());
        assert!(check_name("Orders").is_err());
        assert!(check_name("-x").is_err());
        assert!(check_name("").is_err());
    }
}
