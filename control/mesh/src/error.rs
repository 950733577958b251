//! Mesh errors: each problem names the file, the document (1-based), its
//! line and column, the field and the reason.

use std::fmt;

/// One problem with a mesh document.
///
/// Displays as `mesh.yaml:12:5: document 2 (Service default/orders): spec.port: must be 1..65535`,
/// leaving out the parts that are unknown.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeshIssue {
    /// The file name as given; empty when the document did not come from a file.
    pub file: String,
    /// 1-based index of the document in its file; 0 when unknown.
    pub document: usize,
    /// `Kind/namespace/name`, when the document got that far.
    pub key: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Field path inside the document, e.g. `spec.backends[1].service`.
    pub field: String,
    pub reason: String,
}

impl MeshIssue {
    /// An issue about `field` of the document `key`, without a position.
    pub fn new(
        key: impl Into<String>,
        field: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            file: String::new(),
            document: 0,
            key: key.into(),
            line: None,
            column: None,
            field: field.into(),
            reason: one_line(&reason.into()),
        }
    }
}

fn one_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Display for MeshIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut place = self.file.clone();
        if let Some(line) = self.line {
            if !place.is_empty() {
                place.push(':');
            }
            place.push_str(&line.to_string());
            if let Some(column) = self.column {
                place.push_str(&format!(":{column}"));
            }
        }
        if !place.is_empty() {
            write!(f, "{place}: ")?;
        }
        match (self.document, self.key.is_empty()) {
            (0, true) => {}
            (0, false) => write!(f, "{}: ", self.key)?,
            (n, true) => write!(f, "document {n}: ")?,
            (n, false) => write!(f, "document {n} ({}): ", self.key)?,
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.reason)
    }
}

/// Why mesh documents were refused.
#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// One line per problem, in file order.
    #[error("{}", lines(.0))]
    Invalid(Vec<MeshIssue>),
}

impl MeshError {
    /// The problems (empty for [`MeshError::Read`]).
    pub fn issues(&self) -> &[MeshIssue] {
        match self {
            MeshError::Read { .. } => &[],
            MeshError::Invalid(issues) => issues,
        }
    }
}

fn lines(issues: &[MeshIssue]) -> String {
    issues
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_file_line_document_field_reason() {
        let mut issue = MeshIssue::new("Service/default/orders", "spec.port", "must be 1..65535");
        assert_eq!(
            issue.to_string(),
            "Service/default/orders: spec.port: must be 1..65535"
        );
        issue.file = "mesh.yaml".into();
        issue.document = 2;
        issue.line = Some(12);
        issue.column = Some(9);
        assert_eq!(
            issue.to_string(),
            "mesh.yaml:12:9: document 2 (Service/default/orders): spec.port: must be 1..65535"
        );
    }
}
