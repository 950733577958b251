//! Reading mesh files: `---`-separated YAML documents → [`Document`]s, with
//! every problem located by file, document index, line and field.
//!
//! Each document is parsed on its own text, so a syntax error in one does not
//! hide the problems of the others; positions come from the YAML parser
//! (syntax) and from a field-path index of the document (everything else),
//! shifted by the line the document starts on.

use std::collections::HashMap;
use std::path::Path;

use lacewing_config::lines::LineIndex;

use crate::document::{self, Document, Head};
use crate::error::{MeshError, MeshIssue};
use crate::rules;

/// A document read from a file, with what is needed to locate its fields.
#[derive(Debug, Clone)]
pub struct ParsedDocument {
    pub document: Document,
    pub file: String,
    /// 1-based index among the file's non-empty documents.
    pub index: usize,
    /// 1-based line the document's text starts on.
    pub start_line: usize,
    lines: LineIndex,
}

impl ParsedDocument {
    /// An issue about `field` of this document, positioned in its file.
    pub fn issue(&self, field: &str, reason: &str) -> MeshIssue {
        locate(
            MeshIssue {
                file: self.file.clone(),
                document: self.index,
                ..MeshIssue::new(self.document.key(), field, reason)
            },
            &self.lines,
            self.start_line,
        )
    }
}

fn locate(mut issue: MeshIssue, lines: &LineIndex, start_line: usize) -> MeshIssue {
    if let Some(p) = lines.locate(&issue.field) {
        issue.line = Some(p.line + start_line - 1);
        issue.column = Some(p.column);
    } else if issue.line.is_none() {
        issue.line = Some(start_line);
    }
    issue
}

/// Reads and checks a mesh file: every document on its own, then that no two share a key.
pub fn parse_file(path: &Path) -> Result<Vec<ParsedDocument>, MeshError> {
    let text = std::fs::read_to_string(path).map_err(|source| MeshError::Read {
        path: path.display().to_string(),
        source,
    })?;
    parse_str(&text, &path.display().to_string())
}

/// [`parse_file`] on text; `file` names it in errors.
pub fn parse_str(text: &str, file: &str) -> Result<Vec<ParsedDocument>, MeshError> {
    let mut parsed = Vec::new();
    let mut issues = Vec::new();
    for (index, (start_line, chunk)) in split_documents(text).into_iter().enumerate() {
        match parse_one(chunk, file, index + 1, start_line) {
            Ok(doc) => {
                for (field, reason) in rules::check_document(&doc.document) {
                    issues.push(doc.issue(&field, &reason));
                }
                parsed.push(doc);
            }
            Err(issue) => issues.push(*issue),
        }
    }
    let mut seen: HashMap<String, usize> = HashMap::new();
    for doc in &parsed {
        if let Some(first) = seen.insert(doc.document.key(), doc.index) {
            issues.push(doc.issue(
                "metadata.name",
                &format!("document {first} has the same kind, namespace and name"),
            ));
        }
    }
    if parsed.is_empty() && issues.is_empty() {
        issues.push(MeshIssue {
            file: file.to_string(),
            ..MeshIssue::new("", "", "no documents")
        });
    }
    if issues.is_empty() {
        Ok(parsed)
    } else {
        issues.sort_by_key(|i| (i.document, i.line, i.column));
        Err(MeshError::Invalid(issues))
    }
}

fn parse_one(
    text: &str,
    file: &str,
    index: usize,
    start_line: usize,
) -> Result<ParsedDocument, Box<MeshIssue>> {
    let lines = LineIndex::build(text);
    let at = |field: &str, reason: String, line: Option<usize>, column: Option<usize>| {
        Box::new(locate(
            MeshIssue {
                file: file.to_string(),
                document: index,
                line: line.map(|l| l + start_line - 1),
                column,
                ..MeshIssue::new("", field, reason)
            },
            &lines,
            start_line,
        ))
    };
    let head: Head = serde_norway::from_str(text).map_err(|e| {
        let location = e.location();
        at(
            "",
            strip_position(&e.to_string()),
            location.as_ref().map(|l| l.line()),
            location.as_ref().map(|l| l.column()),
        )
    })?;
    let kind =
        document::check_head(&head).map_err(|(field, reason)| at(&field, reason, None, None))?;
    let document = document::decode(kind, || serde_norway::Deserializer::from_str(text)).map_err(
        |(field, reason)| {
            at(
                &field,
                strip_path(&strip_position(&reason), &field),
                None,
                None,
            )
        },
    )?;
    Ok(ParsedDocument {
        document,
        file: file.to_string(),
        index,
        start_line,
        lines,
    })
}

/// The non-empty documents of a YAML stream with the 1-based line each starts on.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut docs = Vec::new();
    let mut start = 0;
    let mut start_line = 1;
    let mut offset = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        let separator = bare == "---" || bare.starts_with("--- ") || bare == "...";
        if separator {
            docs.push((start_line, &text[start..offset]));
            start = offset + line.len();
            start_line = n + 2;
        }
        offset += line.len();
    }
    docs.push((start_line, &text[start..]));
    docs.retain(|(_, chunk)| {
        chunk
            .lines()
            .map(str::trim)
            .any(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('%'))
    });
    docs
}

/// The YAML parser's message without its trailing ` at line L column C`.
fn strip_position(message: &str) -> String {
    if let Some(at) = message.rfind(" at line ") {
        let tail = &message[at + " at line ".len()..];
        let is_position = tail.split_once(" column ").is_some_and(|(l, c)| {
            l.bytes().all(|b| b.is_ascii_digit()) && c.bytes().all(|b| b.is_ascii_digit())
        });
        if is_position {
            return message[..at].to_string();
        }
    }
    message.to_string()
}

/// The message without a leading `<path>: ` that repeats (an ancestor of) `field`.
fn strip_path(message: &str, field: &str) -> String {
    if let Some((prefix, rest)) = message.split_once(": ")
        && !prefix.is_empty()
        && field
            .strip_prefix(prefix)
            .is_some_and(|below| below.is_empty() || below.starts_with(['.', '[']))
    {
        return rest.to_string();
    }
    message.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
# the shop
apiVersion: lacewing.dev/v1alpha1
kind: Service
metadata:
  name: orders
spec:
  port: 8080
---
apiVersion: split.smi-spec.io/v1alpha4
kind: TrafficSplit
metadata: {name: orders-split}
spec:
  service: orders
  backends:
  - service: orders
    weight: 100
";

    #[test]
    fn reads_every_document_with_its_start_line() {
        let docs = parse_str(GOOD, "mesh.yaml").unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].document.key(), "Service/default/orders");
        assert_eq!(docs[1].document.key(), "TrafficSplit/default/orders-split");
        assert_eq!(docs[1].start_line, 9);
        assert_eq!(docs[1].index, 2);
    }

    fn one_issue(text: &str) -> MeshIssue {
        let err = parse_str(text, "mesh.yaml").unwrap_err();
        assert_eq!(err.issues().len(), 1, "{err}");
        err.issues()[0].clone()
    }

    #[test]
    fn unknown_field_names_document_line_and_field() {
        let text = GOOD.replace("    weight: 100", "    weight: 100\n    wieght: 3");
        let issue = one_issue(&text);
        assert_eq!(issue.document, 2);
        assert_eq!(issue.field, "spec.backends[0].wieght");
        assert_eq!(issue.line, Some(17));
        assert!(issue.reason.contains("unknown field `wieght`"), "{issue}");
    }

    #[test]
    fn invalid_yaml_is_located() {
        let text = GOOD.replace("  port: 8080", "  port: [8080");
        let issue = one_issue(&text);
        assert_eq!(issue.document, 1);
        assert!(issue.line.is_some_and(|l| (7..=9).contains(&l)), "{issue}");
    }

    #[test]
    fn unknown_kind_is_refused() {
        let text = GOOD.replace("kind: TrafficSplit", "kind: TrafficSplitter");
        let issue = one_issue(&text);
        assert_eq!(
            (issue.document, issue.field.as_str(), issue.line),
            (2, "kind", Some(10))
        );
        assert!(
            issue.reason.contains("unknown kind `TrafficSplitter`"),
            "{issue}"
        );
    }

    #[test]
    fn wrong_api_version_is_refused() {
        let text = GOOD.replace("split.smi-spec.io/v1alpha4", "split.smi-spec.io/v1alpha1");
        let issue = one_issue(&text);
        assert_eq!((issue.field.as_str(), issue.line), ("apiVersion", Some(9)));
    }

    #[test]
    fn rule_violations_are_located() {
        let text = GOOD.replace("port: 8080", "port: 70000");
        let issue = one_issue(&text);
        assert_eq!(
            (issue.document, issue.field.as_str(), issue.line),
            (1, "spec.port", Some(7))
        );
        assert_eq!(
            issue.to_string(),
            "mesh.yaml:7:3: document 1 (Service/default/orders): spec.port: must be 1..65535"
        );
    }

    #[test]
    fn duplicate_documents_are_refused() {
        let text = format!("{GOOD}---\n{}", GOOD.split("---").next().unwrap());
        let issue = one_issue(&text);
        assert_eq!(issue.document, 3);
        assert!(issue.reason.contains("document 1"), "{issue}");
    }

    #[test]
    fn empty_file_is_refused() {
        assert!(parse_str("# nothing\n---\n", "m.yaml").is_err());
    }
}
