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
