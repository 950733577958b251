//! experimental-sdk-filter: a proxy-wasm filter for ABI 0.1.0 written with
//! `proxy-wasm-experimental`, an SDK maintained apart from the official
//! `proxy-wasm` crate (its own dispatcher, allocator and hostcall wrappers).
//!
//! The e2e tests run it unmodified in Envoy and in Lacewing and compare what
//! the client sees. The request header `x-case` picks what it does:
//!
//! - `headers`: adds `x-sdk-request: seen <x-in>` to the request, removes
//!   `x-drop`; every response gets `x-sdk-response: yes`.
//! - `local-reply-empty-length`: answers 403 with a body and a module-supplied
//!   `content-length: 0`.
//! - `callout-host`: calls cluster `echo` with `host` but no `:authority`,
//!   then answers with the callout's response body.
//! - `callout-timeout`: calls with a timeout of `u32::MAX` ms (-1 as a signed
//!   number) and reports the result in the request header `x-callout-result`.
//! - `duration`: reports whether `request.duration` is found, in the request
//!   and the response phase (`x-duration-request`, `x-duration-response`).
//! - `ticks`: reports in `x-ticks` how often the root context's 50 ms tick
//!   ran (counted in shared data under `experimental-sdk-ticks`).

use std::time::Duration;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::Action;
use proxy_wasm_experimental as proxy_wasm;

const TICKS_KEY: &str = "experimental-sdk-ticks";

/// The module's entry point: both hosts call `_start` once when the VM starts.
// The ABI names the export, so its symbol must not be mangled; no other
// symbol of the module is called `_start`.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub fn _start() {
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(TickingRoot) });
    proxy_wasm::set_http_context(|_, _| -> Box<dyn HttpContext> {
        Box::new(CaseFilter::default())
    });
}

/// Arms a 50 ms tick at VM start and counts ticks in shared data.
struct TickingRoot;

impl Context for TickingRoot {}

impl RootContext for TickingRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        self.set_tick_period(Duration::from_millis(50));
        true
    }

    fn on_tick(&mut self) {
        let (value, cas) = self.get_shared_data(TICKS_KEY);
        let count = value
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        // A lost compare-and-swap race only loses one count.
        let _ = self.set_shared_data(TICKS_KEY, Some((count + 1).to_string().as_bytes()), cas);
    }
}

/// What the stream's `x-case` asked for, and what was noted for the response.
#[derive(Default)]
struct CaseFilter {
    case: String,
    notes: Vec<(&'static str, String)>,
}

fn found(value: Option<Vec<u8>>) -> String {
    match value {
        Some(_) => "found".to_owned(),
        None => "not found".to_owned(),
    }
}

impl CaseFilter {
    fn call_echo(&self, authority: (&str, &str), timeout: Duration) -> Result<u32, String> {
        self.dispatch_http_call(
            "echo",
            vec![(":method", "GET"), (":path", "/from-sdk"), authority],
            None,
            vec![],
            timeout,
        )
        .map_err(|status| format!("{status:?}"))
    }
}

impl Context for CaseFilter {
    fn on_http_call_response(&mut self, _token: u32, _headers: usize, body_size: usize, _: usize) {
        match self.case.as_str() {
            "callout-host" => {
                let body = self
                    .get_http_call_response_body(0, body_size)
                    .unwrap_or_default();
                self.send_http_response(200, vec![], Some(&body));
            }
            _ => {
                self.add_http_request_header("x-callout-result", "Ok");
                self.resume_http_request();
            }
        }
    }
}

impl HttpContext for CaseFilter {
    fn on_http_request_headers(&mut self, _headers: usize) -> Action {
        self.case = self.get_http_request_header("x-case").unwrap_or_default();
        match self.case.as_str() {
            "headers" => {
                let seen = self.get_http_request_header("x-in").unwrap_or_default();
                self.add_http_request_header("x-sdk-request", &format!("seen {seen}"));
                self.set_http_request_header("x-drop", None);
                Action::Continue
            }
            "local-reply-empty-length" => {
                self.send_http_response(
                    403,
                    vec![("content-length", "0"), ("x-local", "experimental")],
                    Some(b"denied by the experimental SDK filter"),
                );
                Action::Pause
            }
            "callout-host" => {
                match self.call_echo(("host", "callout.sdk.test"), Duration::from_secs(5)) {
                    Ok(_) => Action::Pause,
                    Err(status) => {
                        self.add_http_request_header("x-callout-result", &status);
                        Action::Continue
                    }
                }
            }
            "callout-timeout" => {
                let huge = Duration::from_millis(u64::from(u32::MAX));
                match self.call_echo((":authority", "callout.sdk.test"), huge) {
                    Ok(_) => Action::Pause,
                    Err(status) => {
                        self.add_http_request_header("x-callout-result", &status);
                        Action::Continue
                    }
                }
            }
            "duration" => {
                let at_request = found(self.get_property(vec!["request", "duration"]));
                self.notes.push(("x-duration-request", at_request));
                Action::Continue
            }
            _ => Action::Continue,
        }
    }

    fn on_http_response_headers(&mut self, _headers: usize) -> Action {
        self.add_http_response_header("x-sdk-response", "yes");
        if self.case == "duration" {
            let at_response = found(self.get_property(vec!["request", "duration"]));
            self.notes.push(("x-duration-response", at_response));
        }
        if self.case == "ticks" {
            let (value, _) = self.get_shared_data(TICKS_KEY);
            let ticks = value
                .and_then(|v| String::from_utf8(v).ok())
                .unwrap_or_default();
            self.notes.push(("x-ticks", ticks));
        }
        for (name, value) in std::mem::take(&mut self.notes) {
            self.add_http_response_header(name, &value);
        }
        Action::Continue
    }
}
