//! Pausing behaviours, chosen by the plugin configuration word `pause=<mode>`
//! (instead of the `x-test` cases of [`crate::http`], so one plugin of a chain
//! can pause while another only records the chain).
//!
//! | mode | what the plugin does | what a client sees |
//! |---|---|---|
//! | `body-buffer` | pauses (buffering) every request body chunk until the end | the whole body upstream; `x-pause-body-len` |
//! | `body-callout` / `body-tick` / `body-queue` | buffers the request body to its end, then waits for an HTTP callout reply / the next tick / its own queue item; that callback prefixes the held body with `<source>:` and resumes | upstream body `<source>:<body>`; `x-pause-resumed-by` |
//! | `headers-callout` | pauses the request headers on a callout; the reply adds request header `x-pause-added` and resumes; a body callback then tries to add a request header | upstream `x-pause-added: callout`; `x-pause-body-header-status` |
//! | `trailers-callout` | pauses the request trailers on a callout; the reply adds trailer `x-pause-trailer` and resumes | upstream trailer `x-pause-trailer: callout` |
//! | `local-reply` | answers 403 in the request headers phase, and adds `x-pause-replier: ran` in its own response headers phase | status 403 |
//! | `trap` | traps in the request headers phase | the host's fail policy (503) |
//! | `forever` | pauses the request headers and never resumes them | the host's pause limit |
//! | `tcp-connect-callout` | (network) pauses the new connection on a callout, holding data until the reply resumes it | bytes echoed once resumed |
//! | `tcp-close-callout` | (network) pauses the new connection on a callout whose reply closes the connection | the connection closes |
//!
//! Callouts go to cluster `callout`.

use std::cell::RefCell;
use std::collections::HashMap;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, StreamContext};
use proxy_wasm::types::{Action, BufferType, Status};

use crate::raw;

#[link(wasm_import_module = "env")]
unsafe extern "C" {
    fn proxy_add_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
}

/// Adds a request header, returning the host's status (the SDK's wrapper
/// aborts the module on a status other than Ok).
fn add_request_header(name: &str, value: &str) -> u32 {
    // SAFETY: both slices are valid for their lengths for the whole call; the
    // host only reads them.
    unsafe { proxy_add_header_map_value(0, name.as_ptr(), name.len(), value.as_ptr(), value.len()) }
}

/// Prefix of the queue items that resume a paused request.
const QUEUE_PREFIX: &str = "pause-resume:";
const CALLOUT_TIMEOUT: Duration = Duration::from_secs(5);

thread_local! {
    /// Paused requests waiting for a tick or a queue item: context id → held body length.
    static WAITING: RefCell<HashMap<u32, usize>> = RefCell::new(HashMap::new());
}

/// The `pause=` mode of a plugin configuration, if any.
pub fn mode(configuration: &str) -> Option<String> {
    configuration
        .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
        .find_map(|word| word.strip_prefix("pause="))
        .map(str::to_string)
}

/// Whether a mode runs on TCP connections.
pub fn is_network(mode: &str) -> bool {
    mode.starts_with("tcp-")
}

/// Resumes every request waiting for a tick (from the root context's `on_tick`).
pub fn on_tick() {
    let waiting: Vec<(u32, usize)> = WAITING.with(|w| w.borrow_mut().drain().collect());
    for (context_id, len) in waiting {
        resume_request(context_id, len, "tick");
    }
}

/// Resumes the request a queue item names; false when the item is not one of ours.
pub fn on_queue_item(item: &[u8]) -> bool {
    let Some(id) = std::str::from_utf8(item)
        .ok()
        .and_then(|text| text.strip_prefix(QUEUE_PREFIX))
        .and_then(|id| id.parse::<u32>().ok())
    else {
        return false;
    };
    if let Some(len) = WAITING.with(|w| w.borrow_mut().remove(&id)) {
        resume_request(id, len, "queue");
    }
    true
}

/// From any callback: prefixes the held request body of `context_id` with
/// `<source>:` and resumes the request.
fn resume_request(context_id: u32, len: usize, source: &str) {
    if hostcalls::set_effective_context(context_id).is_err() {
        return;
    }
    let body = hostcalls::get_buffer(BufferType::HttpRequestBody, 0, len)
        .ok()
        .flatten()
        .unwrap_or_default();
    let mut rewritten = format!("{source}:").into_bytes();
    rewritten.extend_from_slice(&body);
    let _ = hostcalls::set_buffer(BufferType::HttpRequestBody, 0, len, &rewritten);
    let _ = hostcalls::resume_http_request();
}

/// An HTTP stream under a `pause=` mode.
pub struct PauseHttp {
    context_id: u32,
    mode: String,
    queue_id: u32,
    /// Response headers to add.
    report: Vec<(String, String)>,
    /// Length of the body held while a callout is out.
    held: Option<usize>,
}

impl PauseHttp {
    pub fn new(context_id: u32, mode: String, queue_id: u32) -> Self {
        Self {
            context_id,
            mode,
            queue_id,
            report: Vec::new(),
            held: None,
        }
    }

    fn report(&mut self, name: &str, value: impl Into<String>) {
        self.report.push((name.to_string(), value.into()));
    }

    fn callout(&self) -> Result<u32, Status> {
        let headers = vec![
            (":method", "GET"),
            (":path", "/pause-callout"),
            (":authority", "callout"),
        ];
        self.dispatch_http_call("callout", headers, None, vec![], CALLOUT_TIMEOUT)
    }
}

impl Context for PauseHttp {
    fn on_http_call_response(&mut self, _: u32, _: usize, _: usize, _: usize) {
        match self.mode.as_str() {
            "headers-callout" => {
                self.set_http_request_header("x-pause-added", Some("callout"));
                self.resume_http_request();
            }
            "trailers-callout" => {
                self.set_http_request_trailer("x-pause-trailer", Some("callout"));
                self.resume_http_request();
            }
            "body-callout" => {
                let len = self.held.take().unwrap_or_default();
                resume_request(self.context_id, len, "callout");
            }
            _ => {}
        }
        self.report("x-pause-resumed-by", "callout");
    }
}

impl HttpContext for PauseHttp {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        if self.mode.starts_with("body-") {
            // The body changes length.
            self.set_http_request_header("content-length", None);
        }
        match self.mode.as_str() {
            "local-reply" => {
                self.send_http_response(403, vec![("x-pause-local", "yes")], Some(b"denied"));
                Action::Pause
            }
            "trap" => core::arch::wasm32::unreachable(),
            "forever" => Action::Pause,
            "headers-callout" => match self.callout() {
                Ok(_) => Action::Pause,
                Err(status) => {
                    self.report("x-pause-callout-error", format!("{status:?}"));
                    Action::Continue
                }
            },
            _ => Action::Continue,
        }
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        match self.mode.as_str() {
            "headers-callout" => {
                // The headers went upstream when their phase continued.
                let status = add_request_header("x-pause-from-body", "1");
                self.report("x-pause-body-header-status", raw::status_name(status));
                Action::Continue
            }
            "body-buffer" if !end_of_stream => Action::Pause,
            "body-buffer" => {
                self.report("x-pause-body-len", body_size.to_string());
                Action::Continue
            }
            "body-callout" | "body-tick" | "body-queue" if !end_of_stream => Action::Pause,
            "body-callout" => match self.callout() {
                Ok(_) => {
                    self.held = Some(body_size);
                    Action::Pause
                }
                Err(status) => {
                    self.report("x-pause-callout-error", format!("{status:?}"));
                    Action::Continue
                }
            },
            "body-tick" => {
                WAITING.with(|w| w.borrow_mut().insert(self.context_id, body_size));
                self.report("x-pause-resumed-by", "tick");
                Action::Pause
            }
            "body-queue" => {
                WAITING.with(|w| w.borrow_mut().insert(self.context_id, body_size));
                let item = format!("{QUEUE_PREFIX}{}", self.context_id);
                let _ = hostcalls::enqueue_shared_queue(self.queue_id, Some(item.as_bytes()));
                self.report("x-pause-resumed-by", "queue");
                Action::Pause
            }
            _ => Action::Continue,
        }
    }

    fn on_http_request_trailers(&mut self, _: usize) -> Action {
        if self.mode != "trailers-callout" {
            return Action::Continue;
        }
        match self.callout() {
            Ok(_) => Action::Pause,
            Err(status) => {
                self.report("x-pause-callout-error", format!("{status:?}"));
                Action::Continue
            }
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        for (name, value) in std::mem::take(&mut self.report) {
            self.add_http_response_header(&name, &value);
        }
        if self.mode == "local-reply" {
            self.add_http_response_header("x-pause-replier", "ran");
        }
        Action::Continue
    }
}

/// A TCP connection under a `pause=tcp-*` mode.
pub struct PauseTcp {
    mode: String,
    /// A callout is out: downstream data is held.
    waiting: bool,
}

impl PauseTcp {
    pub fn new(mode: String) -> Self {
        Self {
            mode,
            waiting: false,
        }
    }
}

impl Context for PauseTcp {
    fn on_http_call_response(&mut self, _: u32, _: usize, _: usize, _: usize) {
        self.waiting = false;
        if self.mode == "tcp-close-callout" {
            self.close_downstream();
        } else {
            self.resume_downstream();
        }
    }
}

impl StreamContext for PauseTcp {
    fn on_new_connection(&mut self) -> Action {
        let headers = vec![
            (":method", "GET"),
            (":path", "/pause-callout"),
            (":authority", "callout"),
        ];
        match self.dispatch_http_call("callout", headers, None, vec![], CALLOUT_TIMEOUT) {
            Ok(_) => {
                self.waiting = true;
                Action::Pause
            }
            Err(_) => Action::Continue,
        }
    }

    fn on_downstream_data(&mut self, _: usize, _: bool) -> Action {
        if self.waiting {
            Action::Pause
        } else {
            Action::Continue
        }
    }
}
