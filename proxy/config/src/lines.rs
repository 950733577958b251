//! Where each field of a YAML document is written: a field path → line/column index.
//!
//! Validation runs on the typed model, which has forgotten positions; this index
//! lets its errors name the line. It walks the event stream of a YAML 1.2
//! parser (`saphyr-parser`), which reports where every node starts, and never
//! fails: on a document the parser cannot read, the fields seen so far stay
//! indexed, and [`LineIndex::locate`] answers with the closest enclosing field.

use std::collections::HashMap;

use saphyr_parser::{Event, Parser, Span};

/// A 1-based line and column (in characters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Field paths (`listeners[0].routes[1].cluster`) of one YAML document and where each is written.
#[derive(Debug, Clone, Default)]
pub struct LineIndex {
    positions: HashMap<String, Position>,
}

impl LineIndex {
    /// Indexes `text`, a single YAML document.
    pub fn build(text: &str) -> Self {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let chars: Vec<char> = text.chars().collect();
        let mut walk = Walk {
            chars: &chars,
            stack: Vec::new(),
            positions: HashMap::new(),
        };
        for event in Parser::new_from_str(text) {
            let Ok((event, span)) = event else {
                break;
            };
            if !walk.event(&event, span) {
                break;
            }
        }
        Self {
            positions: walk.positions,
        }
    }

    /// Where `path` is written: the key of a mapping entry, the `-` (or first
    /// character) of a sequence item. `None` when the path is not in the document.
    pub fn get(&self, path: &str) -> Option<Position> {
        self.positions.get(path).copied()
    }

    /// Where `path` is written, or else its closest enclosing field that is
    /// (a defaulted field is reported at the mapping that lacks it).
    pub fn locate(&self, path: &str) -> Option<Position> {
        let mut path = path;
        loop {
            if let Some(position) = self.get(path) {
                return Some(position);
            }
            path = parent_path(path)?;
        }
    }
}

/// `a.b[2]` → `a.b` → `a` → `` → none.
fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

fn child_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// An open collection; `path` is `None` inside a part of the document that
/// has no field path (a mapping used as a key).
enum Frame {
    Mapping {
        path: Option<String>,
        /// The path of the value to come, once its key has been read.
        value: Option<Option<String>>,
    },
    Sequence {
        path: Option<String>,
        next: usize,
    },
}

struct Walk<'a> {
    chars: &'a [char],
    stack: Vec<Frame>,
    positions: HashMap<String, Position>,
}

impl Walk<'_> {
    /// Follows one event; false once the document is over.
    fn event(&mut self, event: &Event<'_>, span: Span) -> bool {
        match event {
            Event::StreamStart | Event::DocumentStart(_) | Event::Nothing => {}
            Event::StreamEnd | Event::DocumentEnd => return false,
            Event::Scalar(value, ..) => {
                if let Some(Frame::Mapping { path, value: next }) = self.stack.last_mut()
                    && next.is_none()
                {
                    // A key: its entry is written where the key is.
                    let child = path.as_deref().map(|p| child_key(p, value));
                    if let Some(child) = &child {
                        let position = position(self.chars, span, false);
                        self.positions.entry(child.clone()).or_insert(position);
                    }
                    *next = Some(child);
                } else {
                    self.node(span);
                }
            }
            Event::Alias(_) => {
                self.node(span);
            }
            Event::SequenceStart(..) => {
                let path = self.node(span);
                self.stack.push(Frame::Sequence { path, next: 0 });
            }
            Event::MappingStart(..) => {
                let path = self.node(span);
                self.stack.push(Frame::Mapping { path, value: None });
            }
            Event::SequenceEnd | Event::MappingEnd => {
                self.stack.pop();
            }
        }
        true
    }

    /// A node (not a mapping key) starts at `span`: records it if it is a
    /// sequence item and returns its path.
    fn node(&mut self, span: Span) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Mapping { value, .. }) => match value.take() {
                Some(child) => child,
                // A collection used as a key: nothing under it has a field path,
                // nor has the value that follows it.
                None => {
                    *value = Some(None);
                    None
                }
            },
            Some(Frame::Sequence { path, next }) => {
                let item = path.as_deref().map(|p| format!("{p}[{next}]"));
                *next += 1;
                if let Some(item) = &item {
                    let position = position(self.chars, span, true);
                    self.positions.entry(item.clone()).or_insert(position);
                }
                item
            }
        }
    }
}

/// The position of a node starting at `span` in `chars`; for a block
/// sequence item, that of its `-` (which the parser does not report).
fn position(chars: &[char], span: Span, item: bool) -> Position {
    let start = span.start;
    let at_node = Position {
        line: start.line(),
        column: start.col() + 1,
    };
    if !item {
        return at_node;
    }
    let mut at = start.index().min(chars.len());
    let mut lines_up = 0;
    while at > 0 && matches!(chars[at - 1], ' ' | '\t' | '\r' | '\n') {
        if chars[at - 1] == '\n' {
            lines_up += 1;
        }
        at -= 1;
    }
    let dash = at
        .checked_sub(1)
        .filter(|&d| chars[d] == '-' && (d == 0 || matches!(chars[d - 1], ' ' | '\t' | '\n')));
    let Some(dash) = dash.filter(|&d| d + 1 < start.index()) else {
        return at_node;
    };
    let line_start = chars[..dash]
        .iter()
        .rposition(|&c| c == '\n')
        .map_or(0, |newline| newline + 1);
    Position {
        line: start.line() - lines_up,
        column: dash - line_start + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(index: &LineIndex, path: &str) -> (usize, usize) {
        let position = index
            .get(path)
            .unwrap_or_else(|| panic!("{path} not indexed in {:?}", index.positions));
        (position.line, position.column)
    }

    #[test]
    fn block_style() {
        let text = "\
# comment
admin:
  address: 127.0.0.1:0   # trailing comment
listeners:
  - name: main
    address: \"127.0.0.1:0\"
    routes:
    - name: api
      cluster: backend
    -   name: other
        weighted_clusters:
          - cluster: a
            weight: 1
  -
    name: raw
clusters:
- name: backend
  endpoints:
    - 127.0.0.1:1
    - \"127.0.0.1:2\"
";
        let index = LineIndex::build(text);
        assert_eq!(at(&index, "admin"), (2, 1));
        assert_eq!(at(&index, "admin.address"), (3, 3));
        assert_eq!(at(&index, "listeners"), (4, 1));
        assert_eq!(at(&index, "listeners[0]"), (5, 3));
        assert_eq!(at(&index, "listeners[0].name"), (5, 5));
        assert_eq!(at(&index, "listeners[0].address"), (6, 5));
        assert_eq!(at(&index, "listeners[0].routes[0]"), (8, 5));
        assert_eq!(at(&index, "listeners[0].routes[0].cluster"), (9, 7));
        assert_eq!(at(&index, "listeners[0].routes[1].name"), (10, 9));
        assert_eq!(
            at(&index, "listeners[0].routes[1].weighted_clusters[0].weight"),
            (13, 13)
        );
        assert_eq!(at(&index, "listeners[1]"), (14, 3));
        assert_eq!(at(&index, "listeners[1].name"), (15, 5));
        assert_eq!(at(&index, "clusters[0].name"), (17, 3));
        assert_eq!(at(&index, "clusters[0].endpoints[1]"), (20, 5));
    }

    #[test]
    fn flow_style() {
        let text = "\
listeners: [ {name: main, address: '127.0.0.1:0',
  routes: [{name: r, cluster: c, match: {path: {regex: \"^/a{1,2}\"}, headers: [{name: x, exact: 'it''s'}]}},
           {name: s, cluster: d}] } ]
clusters:
  - { name: c, endpoints: [\"127.0.0.1:1\", 127.0.0.1:2] }
";
        let index = LineIndex::build(text);
        assert_eq!(at(&index, "listeners[0]"), (1, 14));
        assert_eq!(at(&index, "listeners[0].address"), (1, 27));
        assert_eq!(at(&index, "listeners[0].routes"), (2, 3));
        assert_eq!(at(&index, "listeners[0].routes[0].cluster"), (2, 22));
        assert_eq!(
            at(&index, "listeners[0].routes[0].match.path.regex"),
            (2, 49)
        );
        assert_eq!(
            at(&index, "listeners[0].routes[0].match.headers[0].exact"),
            (2, 89)
        );
        assert_eq!(at(&index, "listeners[0].routes[1].cluster"), (3, 22));
        assert_eq!(at(&index, "clusters[0].endpoints[1]"), (5, 43));
    }

    #[test]
    fn block_scalars_anchors_and_documents_are_skipped() {
        let text = "\
---
plugins:
  - name: p
    configuration: |
      key: value
      - not a list
    vm_configuration: &cfg
      a: 1
    env: {A: \"1\"}
  - name: q
    configuration: >-
      folded
      text
";
        let index = LineIndex::build(text);
        assert_eq!(at(&index, "plugins[0].configuration"), (4, 5));
        assert!(index.get("plugins[0].configuration.key").is_none());
        assert_eq!(at(&index, "plugins[0].vm_configuration.a"), (8, 7));
        assert_eq!(at(&index, "plugins[0].env.A"), (9, 11));
        assert_eq!(at(&index, "plugins[1].name"), (10, 5));
        assert_eq!(at(&index, "plugins[1].configuration"), (11, 5));
    }

    #[test]
    fn crlf_line_ends_and_byte_order_mark() {
        let text =
            "\u{feff}listeners:\r\n  - name: a\r\n    routes: [{name: r,\r\n      cluster: c}]\r\n";
        let index = LineIndex::build(text);
        assert_eq!(at(&index, "listeners[0].name"), (2, 5));
        assert_eq!(at(&index, "listeners[0].routes[0].cluster"), (4, 7));
    }

    #[test]
    fn any_text_is_scanned_without_panicking() {
        let samples = [
            "a: [b, {c: d}, 'e''f', \"g\\\"h\"]\nb:\n  - - x\n    - y\n  - ? k\n    : v\n",
            "x: |\n  body\n y: >\n\tz\n- -\n: :\n{[}]\n'\n\"\n&a !t *b\n--- \n...\n%YAML 1.2\n",
            "k: v # c\n  # c\n\"q\": 1\n'r': 2\n[a]: 3\n{a: 1}: 2\n- a: b\n  c: d\n",
        ];
        for sample in samples {
            let chars: Vec<char> = sample.chars().collect();
            for end in 0..=chars.len() {
                for start in 0..end.min(8) {
                    let text: String = chars[start..end].iter().collect();
                    let index = LineIndex::build(&text);
                    let _ = index.locate("a[0].b");
                }
            }
        }
        let deep = "[".repeat(10_000);
        let _ = LineIndex::build(&deep);
        let deep_block: String = (0..2_000)
            .map(|i| format!("{}- a:\n", " ".repeat(i)))
            .collect();
        let _ = LineIndex::build(&deep_block);
    }

    #[test]
    fn keys_are_read_as_yaml_reads_them() {
        let text = "\
\"clus\\x74ers\":
  - ? name
    : c
    'end''points': [a:1]
  - {? name : d}
";
        let index = LineIndex::build(text);
        assert_eq!(at(&index, "clusters"), (1, 1));
        assert_eq!(at(&index, "clusters[0]"), (2, 3));
        assert_eq!(at(&index, "clusters[0].name"), (2, 7));
        assert_eq!(at(&index, "clusters[0].end'points[0]"), (4, 21));
        assert_eq!(at(&index, "clusters[1].name"), (5, 8));
    }

    #[test]
    fn locate_falls_back_to_the_enclosing_field() {
        let index = LineIndex::build("clusters:\n  - name: c\n    endpoints: [a:1]\n");
        let position = index.locate("clusters[0].connect_timeout").unwrap();
        assert_eq!((position.line, position.column), (2, 3));
        assert!(LineIndex::build("").locate("x").is_none());
    }
}
