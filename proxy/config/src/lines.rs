//! Where each field of a YAML document is written: a field path → line/column index.
//!
//! Validation runs on the typed model, which has forgotten positions; this index
//! lets its errors name the line. It is a small structural scanner (not a YAML
//! parser): it follows block mappings and sequences by indentation, flow
//! collections by brackets, and skips scalar contents, comments, anchors and tags.
//! It only ever reads documents the YAML parser already accepted, and never fails:
//! a construct it does not follow simply leaves its fields out of the index, and
//! [`LineIndex::locate`] then answers with the closest enclosing field.

use std::collections::HashMap;

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
        let mut scanner = Scanner {
            chars: text.chars().collect(),
            at: 0,
            line: 1,
            column: 1,
            depth: 0,
            positions: HashMap::new(),
        };
        scanner.skip_blank();
        let column = scanner.column;
        scanner.block_node("", column);
        Self {
            positions: scanner.positions,
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

fn child_index(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

/// Deeper nesting than this is left unindexed (the YAML parser's own limit is lower).
const MAX_DEPTH: usize = 256;

struct Scanner {
    chars: Vec<char>,
    at: usize,
    line: usize,
    column: usize,
    depth: usize,
    positions: HashMap<String, Position>,
}

impl Scanner {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.at).copied()
    }

    fn peek_at(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.at + ahead).copied()
    }

    fn position(&self) -> Position {
        Position {
            line: self.line,
            column: self.column,
        }
    }

    fn bump(&mut self) {
        if let Some(c) = self.peek() {
            self.at += 1;
            if c == '\n' {
                self.line += 1;
                self.column = 1;
            } else {
                self.column += 1;
            }
        }
    }

    fn record(&mut self, path: String, position: Position) {
        self.positions.entry(path).or_insert(position);
    }

    fn is_space(c: Option<char>) -> bool {
        matches!(c, Some(' ' | '\t'))
    }

    /// True for whitespace, line ends and the end of input.
    fn is_break_or_space(c: Option<char>) -> bool {
        matches!(c, None | Some(' ' | '\t' | '\n' | '\r'))
    }

    fn skip_inline_space(&mut self) {
        while Self::is_space(self.peek()) {
            self.bump();
        }
    }

    fn skip_to_line_end(&mut self) {
        while !matches!(self.peek(), None | Some('\n')) {
            self.bump();
        }
    }

    /// After inline spaces: nothing more on this line but perhaps a comment.
    fn at_line_end(&mut self) -> bool {
        self.skip_inline_space();
        matches!(self.peek(), None | Some('\n' | '\r' | '#'))
    }

    /// Skips whitespace, line ends, comments, document markers and directives.
    fn skip_blank(&mut self) {
        loop {
            match self.peek() {
                Some(' ' | '\t' | '\n' | '\r') => self.bump(),
                Some('#') => self.skip_to_line_end(),
                Some('%') if self.column == 1 => self.skip_to_line_end(),
                Some('-' | '.')
                    if self.column == 1
                        && self.peek_at(1) == self.peek()
                        && self.peek_at(2) == self.peek()
                        && Self::is_break_or_space(self.peek_at(3)) =>
                {
                    for _ in 0..3 {
                        self.bump();
                    }
                }
                _ => return,
            }
        }
    }

    /// Skips whitespace, line ends and comments inside a flow collection.
    fn skip_flow_blank(&mut self) {
        loop {
            match self.peek() {
                Some(' ' | '\t' | '\n' | '\r') => self.bump(),
                Some('#') => self.skip_to_line_end(),
                _ => return,
            }
        }
    }

    fn at_sequence_dash(&self) -> bool {
        self.peek() == Some('-') && Self::is_break_or_space(self.peek_at(1))
    }

    /// Skips `&anchor` and `!tag` properties before a node.
    fn skip_properties(&mut self) {
        while matches!(self.peek(), Some('&' | '!')) {
            while !Self::is_break_or_space(self.peek()) {
                self.bump();
            }
            self.skip_inline_space();
        }
    }

    /// The indentation of the next non-blank line after the current one, if any.
    fn next_content_column(&self) -> Option<usize> {
        let mut at = self.at;
        while at < self.chars.len() && self.chars[at] != '\n' {
            at += 1;
        }
        loop {
            at += 1;
            let start = at;
            while at < self.chars.len() && matches!(self.chars[at], ' ' | '\t') {
                at += 1;
            }
            match self.chars.get(at) {
                None => return None,
                Some('\n' | '\r') => {}
                Some('#') => {
                    while at < self.chars.len() && self.chars[at] != '\n' {
                        at += 1;
                    }
                }
                Some(_) => return Some(at - start + 1),
            }
            while at < self.chars.len() && self.chars[at] != '\n' {
                at += 1;
            }
        }
    }

    /// Skips the rest of this line and every following line indented at least
    /// `min_column` (continuations of a multi-line scalar, block scalar bodies).
    fn skip_indented_lines(&mut self, min_column: usize) {
        self.skip_to_line_end();
        while self.next_content_column().is_some_and(|c| c >= min_column) {
            self.bump();
            self.skip_to_line_end();
        }
    }

    /// Whether a block mapping key (`key:` followed by a space or the line end) starts here.
    fn at_mapping_key(&self) -> bool {
        let mut at = self.at;
        let char_at = |i: usize| self.chars.get(i).copied();
        match char_at(at) {
            Some(quote @ ('"' | '\'')) => {
                at += 1;
                loop {
                    match char_at(at) {
                        None | Some('\n') => return false,
                        Some('\\') if quote == '"' => at += 2,
                        Some(c) if c == quote => {
                            if quote == '\'' && char_at(at + 1) == Some('\'') {
                                at += 2;
                            } else {
                                at += 1;
                                break;
                            }
                        }
                        Some(_) => at += 1,
                    }
                }
                while Self::is_space(char_at(at)) {
                    at += 1;
                }
                char_at(at) == Some(':') && Self::is_break_or_space(char_at(at + 1))
            }
            None | Some('[' | '{' | '|' | '>' | '*' | '?' | '#' | '\n' | '\r') => false,
            Some('-') if Self::is_break_or_space(char_at(at + 1)) => false,
            Some(_) => loop {
                match char_at(at) {
                    None | Some('\n') => return false,
                    Some(':') if Self::is_break_or_space(char_at(at + 1)) => return true,
                    Some('#') if at > 0 && Self::is_space(char_at(at - 1)) => return false,
                    Some(_) => at += 1,
                }
            },
        }
    }

    /// Reads a quoted scalar starting at its quote; returns its (roughly unescaped) text.
    fn quoted(&mut self) -> String {
        let Some(quote) = self.peek() else {
            return String::new();
        };
        self.bump();
        let mut text = String::new();
        while let Some(c) = self.peek() {
            self.bump();
            if quote == '"' && c == '\\' {
                if let Some(escaped) = self.peek() {
                    text.push(escaped);
                    self.bump();
                }
            } else if c == quote {
                if quote == '\'' && self.peek() == Some('\'') {
                    text.push('\'');
                    self.bump();
                } else {
                    break;
                }
            } else {
                text.push(c);
            }
        }
        text
    }

    /// Reads a block mapping key (the caller checked [`Self::at_mapping_key`]) and its `:`.
    fn block_key(&mut self) -> String {
        let key = if matches!(self.peek(), Some('"' | '\'')) {
            let key = self.quoted();
            self.skip_inline_space();
            key
        } else {
            let mut key = String::new();
            while let Some(c) = self.peek() {
                if c == '\n' || (c == ':' && Self::is_break_or_space(self.peek_at(1))) {
                    break;
                }
                key.push(c);
                self.bump();
            }
            key.trim_end().to_string()
        };
        if self.peek() == Some(':') {
            self.bump();
        }
        key
    }

    /// A node starting at the current character; a block collection found here
    /// is indented at the current column. Scalars and their continuation lines
    /// (indented at least `min_column`) are skipped.
    fn block_node(&mut self, path: &str, min_column: usize) {
        if self.depth >= MAX_DEPTH {
            return;
        }
        self.depth += 1;
        self.skip_properties();
        if self.at_line_end() {
            // Properties alone on their line: the node follows on the next ones.
            self.skip_blank();
            if self.peek().is_some() && self.column >= min_column {
                self.block_node_content(path, min_column);
            }
        } else {
            self.block_node_content(path, min_column);
        }
        self.depth -= 1;
    }

    fn block_node_content(&mut self, path: &str, min_column: usize) {
        match self.peek() {
            None => {}
            Some('-') if self.at_sequence_dash() => {
                let column = self.column;
                self.block_sequence(path, column);
            }
            Some('[' | '{') => {
                self.flow_node(path);
                self.skip_indented_lines(min_column);
            }
            Some('|' | '>') => self.skip_indented_lines(min_column),
            Some(_) if self.at_mapping_key() => {
                let column = self.column;
                self.block_mapping(path, column);
            }
            Some('"' | '\'') => {
                self.quoted();
                self.skip_indented_lines(min_column);
            }
            Some(_) => self.skip_indented_lines(min_column),
        }
    }

    fn block_mapping(&mut self, path: &str, indent: usize) {
        loop {
            let key_position = self.position();
            let key = self.block_key();
            let child = child_key(path, &key);
            self.record(child.clone(), key_position);
            if self.at_line_end() {
                self.skip_blank();
                if self.peek().is_some() {
                    if self.column > indent {
                        self.block_node(&child, indent + 1);
                    } else if self.column == indent && self.at_sequence_dash() {
                        self.block_sequence(&child, indent);
                    }
                }
            } else {
                self.block_node(&child, indent + 1);
            }
            self.skip_blank();
            if self.peek().is_none() || self.column != indent || !self.at_mapping_key() {
                return;
            }
        }
    }

    fn block_sequence(&mut self, path: &str, indent: usize) {
        let mut index = 0;
        loop {
            let item = child_index(path, index);
            self.record(item.clone(), self.position());
            self.bump(); // the `-`
            if self.at_line_end() {
                self.skip_blank();
                if self.peek().is_some() && self.column > indent {
                    self.block_node(&item, indent + 1);
                }
            } else {
                self.block_node(&item, indent + 1);
            }
            index += 1;
            self.skip_blank();
            if self.peek().is_none() || self.column != indent || !self.at_sequence_dash() {
                return;
            }
        }
    }

    /// A `[...]` or `{...}` collection starting at its bracket.
    fn flow_node(&mut self, path: &str) {
        if self.depth >= MAX_DEPTH {
            return;
        }
        self.depth += 1;
        match self.peek() {
            Some('{') => self.flow_mapping(path),
            Some('[') => self.flow_sequence(path),
            _ => {}
        }
        self.depth -= 1;
    }

    fn flow_mapping(&mut self, path: &str) {
        self.bump(); // `{`
        loop {
            self.skip_flow_blank();
            match self.peek() {
                None => return,
                Some('}') => {
                    self.bump();
                    return;
                }
                _ => {}
            }
            let key_position = self.position();
            self.skip_properties();
            let key = if matches!(self.peek(), Some('"' | '\'')) {
                self.quoted()
            } else {
                let mut key = String::new();
                while let Some(c) = self.peek() {
                    let ends_key = c == ':'
                        && matches!(
                            self.peek_at(1),
                            None | Some(' ' | '\t' | '\n' | '\r' | ',' | '}' | ']')
                        );
                    if ends_key || matches!(c, ',' | '}' | '\n' | '\r') {
                        break;
                    }
                    key.push(c);
                    self.bump();
                }
                key.trim_end().to_string()
            };
            let child = child_key(path, &key);
            self.record(child.clone(), key_position);
            self.skip_flow_blank();
            if self.peek() == Some(':') {
                self.bump();
                self.skip_flow_blank();
                if !matches!(self.peek(), Some(',' | '}')) {
                    self.flow_value(&child);
                }
                self.skip_flow_blank();
            }
            match self.peek() {
                Some(',') => self.bump(),
                Some('}') => {
                    self.bump();
                    return;
                }
                _ => return,
            }
        }
    }

    fn flow_sequence(&mut self, path: &str) {
        self.bump(); // `[`
        let mut index = 0;
        loop {
            self.skip_flow_blank();
            match self.peek() {
                None => return,
                Some(']') => {
                    self.bump();
                    return;
                }
                _ => {}
            }
            let item = child_index(path, index);
            self.record(item.clone(), self.position());
            self.flow_value(&item);
            self.skip_flow_blank();
            if self.peek() == Some(':') {
                // A single-pair mapping inside a sequence (`[a: 1]`): skip its value.
                self.bump();
                self.skip_flow_blank();
                if !matches!(self.peek(), Some(',' | ']')) {
                    self.flow_value(&item);
                }
                self.skip_flow_blank();
            }
            index += 1;
            match self.peek() {
                Some(',') => self.bump(),
                Some(']') => {
                    self.bump();
                    return;
                }
                _ => return,
            }
        }
    }

    fn flow_value(&mut self, path: &str) {
        self.skip_properties();
        match self.peek() {
            Some('[' | '{') => self.flow_node(path),
            Some('"' | '\'') => {
                self.quoted();
            }
            _ => {
                while let Some(c) = self.peek() {
                    let ends_value = matches!(c, ',' | ']' | '}')
                        || (c == ':' && Self::is_break_or_space(self.peek_at(1)))
                        || (c == '#'
                            && self.at > 0
                            && Self::is_space(self.chars.get(self.at - 1).copied()));
                    if ends_value {
                        break;
                    }
                    self.bump();
                }
            }
        }
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
    fn locate_falls_back_to_the_enclosing_field() {
        let index = LineIndex::build("clusters:\n  - name: c\n    endpoints: [a:1]\n");
        let position = index.locate("clusters[0].connect_timeout").unwrap();
        assert_eq!((position.line, position.column), (2, 3));
        assert!(LineIndex::build("").locate("x").is_none());
    }
}
