//! Mesh documents: what operators write for the whole mesh.
//!
//! Kubernetes-style YAML documents (`apiVersion`, `kind`, `metadata`, `spec`),
//! several per file. [`kinds`] holds each kind's `spec`, [`document`] the
//! envelope and its JSON form (how documents travel and are stored), [`parse`]
//! reads files and names file, document, line and field in every error, and
//! [`rules`] checks each document and the references between them.

pub mod document;
pub mod error;
pub mod kinds;
pub mod parse;
pub mod rules;

pub use document::{Document, Kind, Metadata, Spec};
pub use error::{MeshError, MeshIssue};
pub use parse::{ParsedDocument, parse_file, parse_str};
pub use rules::{Catalog, check_references};

#[cfg(test)]
mod schema_tests {
    /// The editor schema in docs/ names every kind with its apiVersion.
    #[test]
    fn schema_lists_every_kind() {
        let schema: serde_json::Value =
            serde_json::from_str(include_str!("../../../docs/mesh.schema.json")).unwrap();
        let kinds = schema["properties"]["kind"]["enum"].as_array().unwrap();
        assert_eq!(kinds.len(), crate::Kind::ALL.len());
        for kind in crate::Kind::ALL {
            assert!(kinds.iter().any(|k| k == kind.as_str()), "{kind}");
            let rule = schema["allOf"]
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["if"]["properties"]["kind"]["const"] == kind.as_str())
                .unwrap_or_else(|| panic!("no rule for {kind}"));
            assert_eq!(
                rule["then"]["properties"]["apiVersion"]["const"],
                kind.api_version()
            );
        }
    }
}
