//! headers: adds, sets and removes request and response headers; values are
//! templates over properties (`%{source.principal}`). Schema in README.md.

mod template;

use std::collections::BTreeMap;
use std::rc::Rc;

use lacewing_sdk::http::Headers;
use lacewing_sdk::{Action, Filter, Plugin};
use serde::Deserialize;

pub use template::Template;

/// The plugin configuration.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Edits of the request headers (before the upstream).
    #[serde(default)]
    pub request: EditsConfig,
    /// Edits of the response headers (before the client).
    #[serde(default)]
    pub response: EditsConfig,
}

/// Edits of one header map, applied in the order remove, set, add.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditsConfig {
    /// Headers removed.
    #[serde(default)]
    pub remove: Vec<String>,
    /// Headers set to one value (replacing any).
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Values appended (existing values kept).
    #[serde(default)]
    pub add: BTreeMap<String, String>,
}

/// Compiled edits of one map.
#[derive(Debug, Default)]
pub struct Edits {
    remove: Vec<String>,
    set: Vec<(String, Template)>,
    add: Vec<(String, Template)>,
}

fn header_name(at: &str, name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
    if !valid {
        return Err(format!("{at}: `{name}` is not a valid header name"));
    }
    Ok(name.to_ascii_lowercase())
}

impl Edits {
    fn compile(at: &str, c: EditsConfig) -> Result<Self, String> {
        let templates = |kind: &str, map: BTreeMap<String, String>| {
            map.into_iter()
                .map(|(name, value)| {
                    let field = format!("{at}.{kind}.{name}");
                    Ok((
                        header_name(&field, &name)?,
                        Template::parse(&value).map_err(|e| format!("{field}: {e}"))?,
                    ))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Edits {
            remove: c
                .remove
                .iter()
                .map(|n| header_name(&format!("{at}.remove"), n))
                .collect::<Result<_, _>>()?,
            set: templates("set", c.set)?,
            add: templates("add", c.add)?,
        })
    }

    fn apply(&self, headers: &Headers) {
        let lookup = |path: &str| lacewing_sdk::property(path).ok().flatten();
        for name in &self.remove {
            if let Err(e) = headers.remove(name) {
                lacewing_sdk::warn!("headers: cannot remove {name}: {e}");
            }
        }
        for (name, template) in &self.set {
            if let Some(value) = template.render(lookup)
                && let Err(e) = headers.set(name, &value)
            {
                lacewing_sdk::warn!("headers: cannot set {name}: {e}");
            }
        }
        for (name, template) in &self.add {
            if let Some(value) = template.render(lookup)
                && let Err(e) = headers.add(name, &value)
            {
                lacewing_sdk::warn!("headers: cannot add {name}: {e}");
            }
        }
    }
}

/// The plugin: compiled edits.
#[derive(Debug)]
pub struct HeaderEdits {
    request: Edits,
    response: Edits,
}

impl Plugin for HeaderEdits {
    type Config = Config;
    type Filter = HeadersFilter;

    fn configure(config: Config) -> Result<Self, String> {
        Ok(HeaderEdits {
            request: Edits::compile("request", config.request)?,
            response: Edits::compile("response", config.response)?,
        })
    }

    fn new_filter(self: &Rc<Self>) -> HeadersFilter {
        HeadersFilter(self.clone())
    }
}

/// Applies the edits to one stream.
pub struct HeadersFilter(Rc<HeaderEdits>);

impl Filter for HeadersFilter {
    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        self.0.request.apply(headers);
        Action::Continue
    }

    fn on_response_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        self.0.response.apply(headers);
        Action::Continue
    }
}

lacewing_sdk::register!(HeaderEdits);
