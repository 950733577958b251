//! Header value templates: literal text with `%{property.path}` placeholders
//! (`%%` is a literal `%`), parsed once at configuration time.

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Property(String),
}

/// A parsed template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template(Vec<Part>);

impl Template {
    /// Parses `text`; the error says what is wrong.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut rest = text;
        while let Some(i) = rest.find('%') {
            literal.push_str(&rest[..i]);
            let after = &rest[i + 1..];
            if let Some(tail) = after.strip_prefix('%') {
                literal.push('%');
                rest = tail;
            } else if let Some(tail) = after.strip_prefix('{') {
                let end = tail
                    .find('}')
                    .ok_or_else(|| format!("`{text}`: unclosed `%{{`"))?;
                let path = &tail[..end];
                if path.is_empty() || path.split('.').any(str::is_empty) {
                    return Err(format!("`{text}`: `%{{{path}}}` is not a property path"));
                }
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                parts.push(Part::Property(path.to_string()));
                rest = &tail[end + 1..];
            } else {
                return Err(format!("`{text}`: `%` must start `%{{property}}` or `%%`"));
            }
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template(parts))
    }

    /// Renders with `lookup`; `None` when a property is absent (the header is then skipped).
    pub fn render(&self, lookup: impl Fn(&str) -> Option<String>) -> Option<String> {
        let mut out = String::new();
        for part in &self.0 {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Property(p) => out.push_str(&lookup(p)?),
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_and_escapes() {
        let t = Template::parse("id=%{source.principal}; 100%%").unwrap();
        let v = t.render(|p| (p == "source.principal").then(|| "spiffe://a".to_string()));
        assert_eq!(v.as_deref(), Some("id=spiffe://a; 100%"));
        assert_eq!(t.render(|_| None), None);
    }

    #[test]
    fn malformed_templates_are_errors() {
        assert!(
            Template::parse("%{source")
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(Template::parse("%{}").is_err());
        assert!(Template::parse("%{a..b}").is_err());
        assert!(Template::parse("50%").is_err());
    }
}
