//! The two traits a filter implements: [`Plugin`] (one per plugin
//! configuration: parses and validates it, makes filters, runs ticks) and
//! [`Filter`] (one per HTTP stream: a method per phase, each with a default).
//!
//! ```text
//! request headers ─▶ body* ─▶ trailers ─▶ (upstream) ─▶ response headers ─▶ body* ─▶ trailers ─▶ log
//! ```

use std::rc::Rc;

use serde::de::DeserializeOwned;

use crate::Action;
use crate::dispatch::{Unused, unused};
use crate::http::{Body, Headers};

/// The configuration of a plugin that takes none.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
pub struct NoConfig;

/// The plugin: built from its configuration, shared by its filters.
pub trait Plugin: Sized + 'static {
    /// The configuration, parsed from the plugin's JSON configuration with
    /// serde. An absent or empty configuration is read as `{}`. Use
    /// [`NoConfig`] for a plugin without configuration: it then accepts only
    /// an absent or blank one, and its module carries no JSON parser.
    type Config: DeserializeOwned + 'static;
    /// The per-stream filter.
    type Filter: Filter;

    /// Validates the parsed configuration. `Err(reason)` rejects the plugin;
    /// the reason is logged at error level. Parse errors reject it the same
    /// way, with serde's message.
    fn configure(config: Self::Config) -> Result<Self, String>;

    /// The filter for a new stream.
    fn new_filter(self: &Rc<Self>) -> Self::Filter;

    /// How often [`Plugin::on_tick`] runs, in milliseconds; 0 (the default) never.
    fn tick_period_ms(&self) -> u32 {
        0
    }

    /// Runs every [`Plugin::tick_period_ms`].
    fn on_tick(&self) {}
}

/// A filter on one HTTP stream. Every method has a default that lets the
/// stream go on; on Lacewing, a callback left to its default is not called
/// again for the plugin's later streams (the default tells the host once).
/// Returning [`Action::Pause`] from a header or trailer callback stops the
/// stream until a callout continuation returns `Continue`; from a body
/// callback it buffers the body (see [`Body`]).
pub trait Filter: 'static {
    /// The request headers arrived.
    fn on_request_headers(&mut self, _headers: &Headers, _end_of_stream: bool) -> Action {
        unused(Unused::RequestHeaders);
        Action::Continue
    }
    /// A request body chunk arrived (or the buffered body grew).
    fn on_request_body(&mut self, _body: &Body, _end_of_stream: bool) -> Action {
        unused(Unused::RequestBody);
        Action::Continue
    }
    /// The request trailers arrived.
    fn on_request_trailers(&mut self, _trailers: &Headers) -> Action {
        unused(Unused::RequestTrailers);
        Action::Continue
    }
    /// The response headers arrived.
    fn on_response_headers(&mut self, _headers: &Headers, _end_of_stream: bool) -> Action {
        unused(Unused::ResponseHeaders);
        Action::Continue
    }
    /// A response body chunk arrived (or the buffered body grew).
    fn on_response_body(&mut self, _body: &Body, _end_of_stream: bool) -> Action {
        unused(Unused::ResponseBody);
        Action::Continue
    }
    /// The response trailers arrived.
    fn on_response_trailers(&mut self, _trailers: &Headers) -> Action {
        unused(Unused::ResponseTrailers);
        Action::Continue
    }
    /// The stream is done; properties such as `response.code` are final.
    fn on_log(&mut self) {
        unused(Unused::Log);
    }
}
