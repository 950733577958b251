//! header-echo: copies one request header into a response header.
//!
//! Built with the official `proxy-wasm` crate, unmodified, so it runs the same
//! in Lacewing and in Envoy. The plugin configuration is an optional JSON-free
//! `request-header=response-header` pair; the default copies `x-request-id`
//! into `x-echo-request-id`. Every response also gets `x-lacewing-filter: header-echo`.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> {
        Box::new(EchoRoot { names: Names::default() })
    });
}}

#[derive(Clone)]
struct Names {
    request: String,
    response: String,
}

impl Default for Names {
    fn default() -> Self {
        Self {
            request: "x-request-id".into(),
            response: "x-echo-request-id".into(),
        }
    }
}

struct EchoRoot {
    names: Names,
}

impl Context for EchoRoot {}

impl RootContext for EchoRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        let Some(config) = self.get_plugin_configuration() else {
            return true;
        };
        let Ok(text) = std::str::from_utf8(&config) else {
            log::error!("header-echo: configuration is not UTF-8");
            return false;
        };
        match text.trim().split_once('=') {
            Some((req, resp)) if !req.is_empty() && !resp.is_empty() => {
                self.names = Names {
                    request: req.trim().to_ascii_lowercase(),
                    response: resp.trim().to_ascii_lowercase(),
                };
                true
            }
            _ if text.trim().is_empty() => true,
            _ => {
                log::error!("header-echo: configuration must be `request-header=response-header`");
                false
            }
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Echo {
            names: self.names.clone(),
            value: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Echo {
    names: Names,
    value: Option<String>,
}

impl Context for Echo {}

impl HttpContext for Echo {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.value = self.get_http_request_header(&self.names.request);
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        if let Some(value) = self.value.take() {
            self.add_http_response_header(&self.names.response, &value);
        }
        self.add_http_response_header("x-lacewing-filter", "header-echo");
        Action::Continue
    }
}
