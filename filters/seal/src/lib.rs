//! seal: encrypts ("seals") and decrypts ("opens") named headers and JSON
//! body fields with AES-256-GCM under keys from the configuration (key ids
//! and rotation: open with any listed key, seal with the active one), so
//! sensitive fields stay sealed past the mesh's edge. A request whose
//! protected field arrives in plaintext is refused where the configuration
//! says `require_sealed`. Schema and value format in README.md.

mod fields;
mod keyring;

use std::rc::Rc;

use lacewing_sdk::http::{Body, Headers, send_response};
use lacewing_sdk::{Action, Filter, Plugin};
use serde::Deserialize;

pub use fields::FieldError;
pub use keyring::{KeyConfig, Keyring, OpenError};

/// What to do with a direction's fields.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Encrypt with the active key.
    Seal,
    /// Decrypt with the key named in the value.
    Open,
}

/// The fields of one direction.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectionConfig {
    pub mode: Mode,
    /// Header names.
    #[serde(default)]
    pub headers: Vec<String>,
    /// Dotted paths into a JSON body object.
    #[serde(default)]
    pub json_fields: Vec<String>,
    /// With `open`: refuse (400) a request whose listed field is present in plaintext.
    #[serde(default)]
    pub require_sealed: bool,
}

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub keys: Vec<KeyConfig>,
    pub active_key: String,
    #[serde(default)]
    pub request: Option<DirectionConfig>,
    #[serde(default)]
    pub response: Option<DirectionConfig>,
}

/// The plugin: keys and what to do in each direction.
#[derive(Debug)]
pub struct Seal {
    keys: Keyring,
    request: Option<DirectionConfig>,
    response: Option<DirectionConfig>,
}

fn check_direction(at: &str, d: &mut DirectionConfig) -> Result<(), String> {
    if d.require_sealed && d.mode != Mode::Open {
        return Err(format!("{at}.require_sealed: only with mode `open`"));
    }
    if d.headers.is_empty() && d.json_fields.is_empty() {
        return Err(format!("{at}: names no headers and no json_fields"));
    }
    for h in &mut d.headers {
        if h.is_empty() || h.starts_with(':') {
            return Err(format!("{at}.headers: `{h}` is not a header name"));
        }
        *h = h.to_ascii_lowercase();
    }
    if let Some(p) = d
        .json_fields
        .iter()
        .find(|p| p.split('.').any(str::is_empty))
    {
        return Err(format!("{at}.json_fields: `{p}` is not a dotted path"));
    }
    Ok(())
}

impl Plugin for Seal {
    type Config = Config;
    type Filter = SealFilter;

    fn configure(mut c: Config) -> Result<Self, String> {
        let keys = Keyring::new(&c.keys, &c.active_key)?;
        if let Some(d) = &mut c.request {
            check_direction("request", d)?;
        }
        if let Some(d) = &mut c.response {
            check_direction("response", d)?;
        }
        Ok(Seal {
            keys,
            request: c.request,
            response: c.response,
        })
    }

    fn new_filter(self: &Rc<Self>) -> SealFilter {
        SealFilter(self.clone())
    }
}

/// One stream.
pub struct SealFilter(Rc<Seal>);

/// Refuses the request (400) or fails the response (502) with the reason.
fn refuse(status: u16, reason: &str) -> Action {
    let body = format!("{status} {reason}\n");
    if let Err(e) = send_response(
        status,
        &[
            ("content-type", "text/plain"),
            ("x-lacewing-seal", "refused"),
        ],
        body.as_bytes(),
        "seal_refused",
    ) {
        lacewing_sdk::error!("seal: cannot send the refusal: {e}");
    }
    Action::Pause
}

impl SealFilter {
    fn headers(&self, d: &DirectionConfig, headers: &Headers) -> Result<(), String> {
        let keys = &self.0.keys;
        for name in &d.headers {
            let Some(value) = headers.get(name).map_err(|e| e.to_string())? else {
                continue;
            };
            let next = match d.mode {
                Mode::Seal if Keyring::is_sealed(&value) => continue,
                Mode::Seal => keys.seal(name, value.as_bytes())?,
                Mode::Open if Keyring::is_sealed(&value) => {
                    let plain = keys
                        .open(name, &value)
                        .map_err(|e| format!("header `{name}`: {e}"))?;
                    String::from_utf8(plain)
                        .map_err(|_| format!("header `{name}`: opened value is not text"))?
                }
                Mode::Open if d.require_sealed => {
                    return Err(format!("header `{name}` must arrive sealed"));
                }
                Mode::Open => continue,
            };
            headers.set(name, &next).map_err(|e| e.to_string())?;
        }
        if !d.json_fields.is_empty() {
            // The body will change length.
            headers
                .remove("content-length")
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn body(
        &self,
        d: &DirectionConfig,
        body: &Body,
        end_of_stream: bool,
    ) -> Result<Action, String> {
        if d.json_fields.is_empty() {
            return Ok(Action::Continue);
        }
        if !end_of_stream {
            return Ok(Action::Pause); // buffer the whole body
        }
        let bytes = body.read().map_err(|e| e.to_string())?;
        if bytes.is_empty() {
            return Ok(Action::Continue);
        }
        let mut doc: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| format!("body is not JSON: {e}"))?;
        match d.mode {
            Mode::Seal => fields::seal(&self.0.keys, &mut doc, &d.json_fields),
            Mode::Open => fields::open(&self.0.keys, &mut doc, &d.json_fields, d.require_sealed),
        }
        .map_err(|e| e.to_string())?;
        body.replace(doc.to_string().as_bytes())
            .map_err(|e| e.to_string())?;
        Ok(Action::Continue)
    }
}

impl Filter for SealFilter {
    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        let Some(d) = &self.0.request else {
            return Action::Continue;
        };
        match self.headers(d, headers) {
            Ok(()) => Action::Continue,
            Err(reason) => refuse(400, &format!("Bad Request: {reason}")),
        }
    }

    fn on_request_body(&mut self, body: &Body, end_of_stream: bool) -> Action {
        let Some(d) = &self.0.request else {
            return Action::Continue;
        };
        self.body(d, body, end_of_stream)
            .unwrap_or_else(|reason| refuse(400, &format!("Bad Request: {reason}")))
    }

    fn on_response_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        let Some(d) = &self.0.response else {
            return Action::Continue;
        };
        match self.headers(d, headers) {
            Ok(()) => Action::Continue,
            Err(reason) => refuse(502, &format!("Bad Gateway: {reason}")),
        }
    }

    fn on_response_body(&mut self, body: &Body, end_of_stream: bool) -> Action {
        let Some(d) = &self.0.response else {
            return Action::Continue;
        };
        self.body(d, body, end_of_stream)
            .unwrap_or_else(|reason| refuse(502, &format!("Bad Gateway: {reason}")))
    }
}

lacewing_sdk::register!(Seal);
