//! Configuration errors: each problem names the file, line, column and field it is about.

use std::fmt;
use std::path::PathBuf;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A file (the config itself, or one it refers to such as `--wasm-config @FILE`) could not be read.
    #[error("{}: cannot read: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The configuration is malformed or inconsistent; one issue per problem, in document order.
    #[error("{}", IssueLines(issues))]
    Invalid { issues: Vec<ConfigIssue> },
}

impl ConfigError {
    /// The individual problems (empty for [`ConfigError::Read`]).
    pub fn issues(&self) -> &[ConfigIssue] {
        match self {
            ConfigError::Read { .. } => &[],
            ConfigError::Invalid { issues } => issues,
        }
    }

    /// A single problem not tied to a file position (e.g. a command-line flag).
    pub(crate) fn one(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            issues: vec![ConfigIssue::new(field, reason)],
        }
    }
}

/// One problem in a configuration.
///
/// Displays as `<origin>:<line>:<column>: <field>: <reason>`, leaving out the
/// parts that are unknown (e.g. `listeners[0].name: ...` for a config that was
/// not read from a file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigIssue {
    /// The file name (or other origin) given to the loader; empty when none.
    pub origin: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    /// 1-based column, when known.
    pub column: Option<usize>,
    /// The field path, e.g. `listeners[0].routes[1].cluster`; empty for the whole document.
    pub field: String,
    /// What is wrong, in one line.
    pub reason: String,
}

impl ConfigIssue {
    /// An issue without origin or position.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            origin: String::new(),
            line: None,
            column: None,
            field: field.into(),
            reason: one_line(&reason.into()),
        }
    }
}

/// Folds a multi-line message onto one line so that every issue stays one line.
fn one_line(text: &str) -> String {
    if !text.contains('\n') {
        return text.to_string();
    }
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

impl fmt::Display for ConfigIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut located = false;
        if !self.origin.is_empty() {
            f.write_str(&self.origin)?;
            located = true;
        }
        if let Some(line) = self.line {
            if located {
                f.write_str(":")?;
            }
            write!(f, "{line}")?;
            if let Some(column) = self.column {
                write!(f, ":{column}")?;
            }
            located = true;
        }
        if located {
            f.write_str(": ")?;
        }
        if !self.field.is_empty() {
            write!(f, "{}: ", self.field)?;
        }
        f.write_str(&self.reason)
    }
}

struct IssueLines<'a>(&'a [ConfigIssue]);

impl fmt::Display for IssueLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, issue) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{issue}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issue_display_leaves_out_unknown_parts() {
        let mut issue = ConfigIssue::new("listeners[0].name", "empty");
        assert_eq!(issue.to_string(), "listeners[0].name: empty");
        issue.origin = "mesh.yaml".into();
        assert_eq!(issue.to_string(), "mesh.yaml: listeners[0].name: empty");
        issue.line = Some(12);
        assert_eq!(issue.to_string(), "mesh.yaml:12: listeners[0].name: empty");
        issue.column = Some(7);
        assert_eq!(
            issue.to_string(),
            "mesh.yaml:12:7: listeners[0].name: empty"
        );
        issue.field.clear();
        assert_eq!(issue.to_string(), "mesh.yaml:12:7: empty");
    }

    #[test]
    fn many_issues_display_one_per_line() {
        let error = ConfigError::Invalid {
            issues: vec![
                ConfigIssue::new("a", "first\n  second"),
                ConfigIssue::new("b", "third"),
            ],
        };
        assert_eq!(error.to_string(), "a: first second\nb: third");
    }
}
