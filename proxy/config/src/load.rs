//! Reading a configuration: YAML text → [`ProxyConfig`], then [`validate`].
//!
//! Parse errors come from the YAML parser with their position; the field path
//! is tracked alongside. Validation errors are positioned afterwards with a
//! [`LineIndex`] of the document.

use std::path::Path;

pub use crate::error::{ConfigError, ConfigIssue};
use crate::lines::LineIndex;
use crate::model::ProxyConfig;
use crate::rules;

/// Parses and validates a YAML configuration; `origin` (usually the file name) prefixes every error.
pub fn from_yaml_str(text: &str, origin: &str) -> Result<ProxyConfig, ConfigError> {
    let config = parse(text, origin)?;
    let mut issues = rules::issues(&config);
    if issues.is_empty() {
        return Ok(config);
    }
    let index = LineIndex::build(text);
    for issue in &mut issues {
        issue.origin = origin.to_string();
        if let Some(position) = index.locate(&issue.field) {
            issue.line = Some(position.line);
            issue.column = Some(position.column);
        }
    }
    issues.sort_by_key(|issue| (issue.line, issue.column));
    Err(ConfigError::Invalid { issues })
}

/// Reads, parses and validates a YAML configuration file; errors name the path as given.
pub fn from_file(path: &Path) -> Result<ProxyConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    from_yaml_str(&text, &path.display().to_string())
}

/// Checks the semantic rules (names, references, values) of a configuration
/// built in code; errors name the field path but no file position.
pub fn validate(config: &ProxyConfig) -> Result<(), ConfigError> {
    let issues = rules::issues(config);
    if issues.is_empty() {
        Ok(())
    } else {
        Err(ConfigError::Invalid { issues })
    }
}

fn parse(text: &str, origin: &str) -> Result<ProxyConfig, ConfigError> {
    let deserializer = serde_norway::Deserializer::from_str(text);
    serde_path_to_error::deserialize(deserializer).map_err(|error| {
        let field = field_path(error.path());
        let inner = error.inner();
        let location = inner.location();
        let reason = parse_reason(&inner.to_string(), &field);
        ConfigError::Invalid {
            issues: vec![ConfigIssue {
                origin: origin.to_string(),
                line: location.as_ref().map(|l| l.line()),
                column: location.as_ref().map(|l| l.column()),
                ..ConfigIssue::new(field, reason)
            }],
        }
    })
}

/// The tracked path as written in issues: `listeners[0].name`, empty for the
/// document itself, without the `?` that stands for a key that could not be read.
fn field_path(path: &serde_path_to_error::Path) -> String {
    let mut field = String::new();
    for segment in path.iter() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => field.push_str(&format!("[{index}]")),
            serde_path_to_error::Segment::Map { key } => {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(key);
            }
            serde_path_to_error::Segment::Enum { variant } => {
                if !field.is_empty() {
                    field.push('.');
                }
                field.push_str(variant);
            }
            serde_path_to_error::Segment::Unknown => break,
        }
    }
    field
}

/// The YAML parser's message without the parts the issue shows on its own:
/// the trailing ` at line L column C` and the leading `<path>: ` (its path is
/// an ancestor of, or equal to, the tracked `field`).
fn parse_reason(message: &str, field: &str) -> String {
    let mut reason = message;
    if let Some(at) = reason.rfind(" at line ") {
        let tail = &reason[at + " at line ".len()..];
        let is_position = tail.split_once(" column ").is_some_and(|(line, column)| {
            line.bytes().all(|b| b.is_ascii_digit()) && column.bytes().all(|b| b.is_ascii_digit())
        });
        if is_position {
            reason = &reason[..at];
        }
    }
    if let Some((prefix, rest)) = reason.split_once(": ")
        && !prefix.is_empty()
        && field
            .strip_prefix(prefix)
            .is_some_and(|below| below.is_empty() || below.starts_with(['.', '[']))
    {
        reason = rest;
    }
    reason.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_reason_strips_position_and_path() {
        assert_eq!(
            parse_reason(
                "listeners[0]: unknown field `bogus`, expected `name` at line 4 column 5",
                "listeners[0].bogus"
            ),
            "unknown field `bogus`, expected `name`"
        );
        assert_eq!(
            parse_reason("invalid type: string \"x\"", "workers"),
            "invalid type: string \"x\""
        );
    }
}
