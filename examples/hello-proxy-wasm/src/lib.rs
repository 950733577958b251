//! hello-proxy-wasm: adds `x-hello: hello, <caller>` to every response,
//! written with the official `proxy-wasm` crate (compare `examples/hello-sdk`).
//! It takes no configuration: a configuration is refused.

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(HelloRoot) });
}}

struct HelloRoot;

impl Context for HelloRoot {}

impl RootContext for HelloRoot {
    fn on_configure(&mut self, _size: usize) -> bool {
        match self.get_plugin_configuration() {
            Some(bytes) if !bytes.iter().all(u8::is_ascii_whitespace) => {
                log::error!("configuration rejected: this plugin takes no configuration");
                false
            }
            _ => true,
        }
    }

    fn create_http_context(&self, _context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Hello))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Hello;

impl Context for Hello {}

impl HttpContext for Hello {
    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        let caller = self
            .get_property(vec!["source", "principal"])
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_else(|| "anonymous".into());
        self.set_http_response_header("x-hello", Some(&format!("hello, {caller}")));
        Action::Continue
    }
}
