//! hello-sdk: adds `x-hello: hello, <caller>` to every response, where the
//! caller is the peer's principal (`source.principal`) or `anonymous`.
//! The same filter as `examples/hello-proxy-wasm`, written with lacewing-sdk.
//! It takes no configuration ([`NoConfig`]): a configuration is refused.

use std::rc::Rc;

use lacewing_sdk::http::Headers;
use lacewing_sdk::{Action, Filter, NoConfig, Plugin};

/// The plugin: nothing to configure.
pub struct Hello;

/// The per-stream filter.
pub struct HelloFilter;

impl Plugin for Hello {
    type Config = NoConfig;
    type Filter = HelloFilter;

    fn configure(_: NoConfig) -> Result<Self, String> {
        Ok(Hello)
    }

    fn new_filter(self: &Rc<Self>) -> HelloFilter {
        HelloFilter
    }
}

impl Filter for HelloFilter {
    fn on_response_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        let caller = lacewing_sdk::property("source.principal")
            .ok()
            .flatten()
            .unwrap_or_else(|| "anonymous".into());
        if let Err(e) = headers.set("x-hello", &format!("hello, {caller}")) {
            lacewing_sdk::warn!("hello: cannot set x-hello: {e}");
        }
        Action::Continue
    }
}

lacewing_sdk::register!(Hello);
