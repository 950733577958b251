//! The document envelope (`apiVersion`, `kind`, `metadata`, `spec`), the
//! kinds Lacewing knows, and the JSON form documents travel and are stored in.

use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::kinds::*;

/// The `apiVersion` of Lacewing's own kinds.
pub const LACEWING_API: &str = "lacewing.dev/v1alpha1";

/// The kinds of mesh documents.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    Service,
    WasmPlugin,
    MeshTls,
    TrafficSplit,
    TrafficTarget,
    HttpRouteGroup,
    MeshConfig,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Service,
        Kind::WasmPlugin,
        Kind::MeshTls,
        Kind::TrafficSplit,
        Kind::TrafficTarget,
        Kind::HttpRouteGroup,
        Kind::MeshConfig,
    ];

    /// The name written in `kind:`.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Service => "Service",
            Kind::WasmPlugin => "WasmPlugin",
            Kind::MeshTls => "MeshTLS",
            Kind::TrafficSplit => "TrafficSplit",
            Kind::TrafficTarget => "TrafficTarget",
            Kind::HttpRouteGroup => "HTTPRouteGroup",
            Kind::MeshConfig => "MeshConfig",
        }
    }

    /// The one `apiVersion` this kind is accepted with.
    pub fn api_version(self) -> &'static str {
        match self {
            Kind::Service | Kind::WasmPlugin | Kind::MeshTls | Kind::MeshConfig => LACEWING_API,
            Kind::TrafficSplit => "split.smi-spec.io/v1alpha4",
            Kind::TrafficTarget => "access.smi-spec.io/v1alpha3",
            Kind::HttpRouteGroup => "specs.smi-spec.io/v1alpha4",
        }
    }

    /// The kind named `name` (as written in `kind:`; case-insensitive, so
    /// `lacewing get service` works too).
    pub fn parse(name: &str) -> Option<Kind> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str().eq_ignore_ascii_case(name))
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `metadata`: name and namespace (`default` when absent); other Kubernetes
/// metadata (labels, annotations) is accepted and kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Metadata {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub labels: serde_json::Map<String, serde_json::Value>,
    #[serde(default, skip_serializing_if = "serde_json::Map::is_empty")]
    pub annotations: serde_json::Map<String, serde_json::Value>,
}

pub fn default_namespace() -> String {
    "default".into()
}

/// A kind's `spec`.
#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Service(ServiceSpec),
    WasmPlugin(WasmPluginSpec),
    MeshTls(MeshTlsSpec),
    TrafficSplit(TrafficSplitSpec),
    TrafficTarget(TrafficTargetSpec),
    HttpRouteGroup(HttpRouteGroupSpec),
    MeshConfig(MeshConfigSpec),
}

/// One mesh document.
#[derive(Debug, Clone, PartialEq)]
pub struct Document {
    pub metadata: Metadata,
    pub spec: Spec,
}

/// The document as written: envelope and a typed spec.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct Envelope<S> {
    pub api_version: String,
    pub kind: String,
    pub metadata: Metadata,
    pub spec: S,
}

/// Only what says which kind a document is.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Head {
    #[serde(default)]
    pub api_version: Option<String>,
    #[serde(default)]
    pub kind: Option<String>,
}

impl Document {
    pub fn kind(&self) -> Kind {
        match &self.spec {
            Spec::Service(_) => Kind::Service,
            Spec::WasmPlugin(_) => Kind::WasmPlugin,
            Spec::MeshTls(_) => Kind::MeshTls,
            Spec::TrafficSplit(_) => Kind::TrafficSplit,
            Spec::TrafficTarget(_) => Kind::TrafficTarget,
            Spec::HttpRouteGroup(_) => Kind::HttpRouteGroup,
            Spec::MeshConfig(_) => Kind::MeshConfig,
        }
    }

    pub fn name(&self) -> &str {
        &self.metadata.name
    }

    pub fn namespace(&self) -> &str {
        &self.metadata.namespace
    }

    /// `Kind/namespace/name`: the document's identity in the store.
    pub fn key(&self) -> String {
        key(self.kind(), self.namespace(), self.name())
    }

    /// The document as JSON, envelope included.
    pub fn to_json(&self) -> String {
        fn enc<S: Serialize>(doc: &Document, spec: &S) -> String {
            let kind = doc.kind();
            let envelope = Envelope {
                api_version: kind.api_version().to_string(),
                kind: kind.as_str().to_string(),
                metadata: doc.metadata.clone(),
                spec,
            };
            serde_json::to_string(&envelope).unwrap_or_default()
        }
        match &self.spec {
            Spec::Service(s) => enc(self, s),
            Spec::WasmPlugin(s) => enc(self, s),
            Spec::MeshTls(s) => enc(self, s),
            Spec::TrafficSplit(s) => enc(self, s),
            Spec::TrafficTarget(s) => enc(self, s),
            Spec::HttpRouteGroup(s) => enc(self, s),
            Spec::MeshConfig(s) => enc(self, s),
        }
    }

    /// Reads a document from its JSON form (what [`Document::to_json`] writes).
    pub fn from_json(text: &str) -> Result<Document, String> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| e.to_string())?;
        let head = Head::deserialize(&value).map_err(|e| e.to_string())?;
        let kind = check_head(&head).map_err(|(field, reason)| format!("{field}: {reason}"))?;
        decode(kind, || value).map_err(|(field, reason)| format!("{field}: {reason}"))
    }
}

/// `Kind/namespace/name`.
pub fn key(kind: Kind, namespace: &str, name: &str) -> String {
    format!("{kind}/{namespace}/{name}")
}

/// The kind a head names, or (field, reason).
pub(crate) fn check_head(head: &Head) -> Result<Kind, (String, String)> {
    let Some(kind_name) = head.kind.as_deref() else {
        return Err(("kind".into(), "missing".into()));
    };
    let Some(kind) = Kind::parse(kind_name).filter(|k| k.as_str() == kind_name) else {
        let known: Vec<&str> = Kind::ALL.iter().map(|k| k.as_str()).collect();
        return Err((
            "kind".into(),
            format!("unknown kind `{kind_name}`; known: {}", known.join(", ")),
        ));
    };
    match head.api_version.as_deref() {
        None => Err(("apiVersion".into(), "missing".into())),
        Some(v) if v != kind.api_version() => Err((
            "apiVersion".into(),
            format!("{kind} is `{}`, not `{v}`", kind.api_version()),
        )),
        Some(_) => Ok(kind),
    }
}

/// Decodes a whole document of `kind` from a deserializer; errors are (field path, reason).
pub(crate) fn decode<'de, D, F>(kind: Kind, make: F) -> Result<Document, (String, String)>
where
    D: serde::Deserializer<'de>,
    D::Error: fmt::Display,
    F: FnOnce() -> D,
{
    fn typed<'de, S: DeserializeOwned, D>(d: D) -> Result<(Metadata, S), (String, String)>
    where
        D: serde::Deserializer<'de>,
        D::Error: fmt::Display,
    {
        serde_path_to_error::deserialize::<_, Envelope<S>>(d)
            .map(|e| (e.metadata, e.spec))
            .map_err(|e| (field_path(e.path()), e.inner().to_string()))
    }
    let d = make();
    let (metadata, spec) = match kind {
        Kind::Service => typed(d).map(|(m, s)| (m, Spec::Service(s))),
        Kind::WasmPlugin => typed(d).map(|(m, s)| (m, Spec::WasmPlugin(s))),
        Kind::MeshTls => typed(d).map(|(m, s)| (m, Spec::MeshTls(s))),
        Kind::TrafficSplit => typed(d).map(|(m, s)| (m, Spec::TrafficSplit(s))),
        Kind::TrafficTarget => typed(d).map(|(m, s)| (m, Spec::TrafficTarget(s))),
        Kind::HttpRouteGroup => typed(d).map(|(m, s)| (m, Spec::HttpRouteGroup(s))),
        Kind::MeshConfig => typed(d).map(|(m, s)| (m, Spec::MeshConfig(s))),
    }?;
    Ok(Document { metadata, spec })
}

/// The tracked path as written in issues: `spec.backends[0].weight`.
fn field_path(path: &serde_path_to_error::Path) -> String {
    let mut field = String::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key }
            | serde_path_to_error::Segment::Enum { variant: key } => {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(key);
            }
            serde_path_to_error::Segment::Unknown => break,
        }
    }
    field
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_round_trip_keeps_every_field() {
        let text = r#"{"apiVersion":"split.smi-spec.io/v1alpha4","kind":"TrafficSplit","metadata":{"name":"s","namespace":"shop"},"spec":{"service":"web","backends":[{"service":"web-v1","weight":90},{"service":"web-v2","weight":10}]}}"#;
        let doc = Document::from_json(text).unwrap();
        assert_eq!(doc.key(), "TrafficSplit/shop/s");
        assert_eq!(Document::from_json(&doc.to_json()).unwrap(), doc);
    }

    #[test]
    fn kind_and_api_version_are_checked() {
        let err = Document::from_json(
            r#"{"apiVersion":"v1","kind":"Pod","metadata":{"name":"p"},"spec":{}}"#,
        )
        .unwrap_err();
        assert!(err.contains("unknown kind `Pod`"), "{err}");
        let err = Document::from_json(
            r#"{"apiVersion":"v1","kind":"Service","metadata":{"name":"p"},"spec":{"port":1}}"#,
        )
        .unwrap_err();
        assert!(err.contains("lacewing.dev/v1alpha1"), "{err}");
    }
}
