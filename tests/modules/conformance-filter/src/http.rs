//! The HTTP context: one request, whose `x-test` header names the cases to run.
//!
//! | case | what it does | reported as |
//! |---|---|---|
//! | `log` | logs at every level, reads the host log level | `x-log-status`, `x-log-level` |
//! | `log-controls` | logs a line with a terminal escape, a line break and invalid UTF-8 at info | `x-log-status` |
//! | `time` | reads the host clock | `x-current-time-ns` |
//! | `config` | echoes VM and plugin configuration | `x-vm-config`, `x-plugin-config` |
//! | `headers` | get/set/add/replace/remove request headers | `x-got-in`, `x-check-*`, `x-status-missing-header`, `x-request-pseudo` |
//! | `request-map` | reads and replaces the whole request header map | `x-map-dropped` |
//! | `response-headers` | the same on response headers | `x-resp-*` |
//! | `response-map` | replaces the whole response header map | `x-resp-map-set` |
//! | `request-trailers` | reads and rewrites request trailers | `x-request-trailer`, `x-request-trailer-count` |
//! | `response-trailers` | reads response trailers, adds one | trailer `x-resp-trailer-added` |
//! | `request-body` | buffers the request body to the end, rewrites it | upstream sees `<BODY>-REWRITTEN`; `x-request-body-len` |
//! | `response-body` | buffers the response body to the end, replaces it | body `response-rewritten:<len>` |
//! | `properties` | reads well-known properties | `x-prop-*`, `x-status-unknown-property` |
//! | `identity` | reads the mesh identity properties (`source.principal`, `connection.mtls`, ...) | `x-id-<path with - for .>` (`status:NotFound` when absent) |
//! | `upstream` | reads the `upstream.*` properties ([`UPSTREAM_PATHS`]) in the request phase and in `on_http_response_headers` | `x-up-request-address` (request phase), `x-up-<field with - for _>` (`status:NotFound` when absent) |
//! | `set-property` | sets then reads a property | `x-status-set-property`, `x-prop-roundtrip` |
//! | `local-reply` | answers 418 itself | status 418, `x-local: yes`, body `short-circuit` |
//! | `callout` / `callout-local` | HTTP call to `x-callout-cluster` (default `callout`), resumes / answers with it | `x-callout-*` |
//! | `callout-unknown` | HTTP call to a cluster that does not exist | `x-callout-error` |
//! | `grpc` | unary gRPC call (`x-grpc-cluster`, `x-grpc-service`, `x-grpc-method`, `x-grpc-message` hex) | `x-grpc-status`, `x-grpc-response` (hex) |
//! | `grpc-stream` | gRPC stream (same headers): one message with end of stream, replies collected | `x-grpc-stream-*` |
//! | `grpc-cancel` | starts a unary gRPC call and cancels it; cancels / closes unknown ids | `x-grpc-cancel*`, `x-grpc-close-unknown` |
//! | `wasi` | reads an environment variable, the clock and the arguments through WASI, prints to stdout | `x-wasi-*` |
//! | `sizes` | header map size vs serialized pairs; body buffer status (with `request-body`) | `x-map-size-matches`, `x-request-body-status-size` |
//! | `deferred-done` | `on_done` returns false; the root context finishes the stream with `proxy_done` | shared key `conformance-deferred-done-T` (`x-log-tag: T`) |
//! | `metrics` | increments, records and reads plugin metrics | `x-metric-*` |
//! | `shared` | shared data set/get with CAS on `x-shared-key` | `x-shared-*` |
//! | `shared-get` / `shared-set` | reads / writes `x-shared-key` (`x-shared-value`) | `x-shared-value` or `x-shared-status` |
//! | `counter` | increments shared counter `x-shared-key` | `x-counter` |
//! | `global` | increments a counter in the module's own memory | `x-global-counter` |
//! | `queue` | enqueues `x-queue-value` on the queue of VM `x-queue-vm-id` | `x-queue-*` |
//! | `queue-empty` | dequeues an empty queue, resolves and writes unknown queues | `x-queue-*` |
//! | `foreign` | calls the host's `sha256` foreign function and an unknown one | `x-foreign-*` |
//! | `oob` | passes pointers outside linear memory to hostcalls | `x-status-oob-*` |
//! | `bad-map` | names a map and a buffer type the ABI lacks | `x-status-bad-*` |
//! | `trap` | traps | (the host's fail policy) |
//! | `trap-once` | traps unless shared key `x-shared-key` is set, then sets it | `x-trap-once: recovered` |
//! | `reset` | resets the stream | (connection reset) |
//!
//! With an `x-log-tag: T` request header, `on_log` stores the `response.code`
//! property in shared key `conformance-log-T`, `response.flags` in
//! `conformance-log-flags-T` and `response.code_details` in
//! `conformance-log-details-T`, and `on_done` sets `conformance-done-T`.
//! With a `tag=` in the plugin configuration, every request gets the chain
//! order in `x-chain` (request) and `x-response-chain` (response).

use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, UNIX_EPOCH};

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext};
use proxy_wasm::types::{Action, LogLevel, Status};

use crate::raw;
use crate::root::{
    DeferredDone, IDLE_QUEUE_NAME, QUEUE_NAME, Settings, header_safe, increment_shared_counter,
};

thread_local! {
    /// A counter in the module's linear memory: shared by every plugin in the same VM.
    static GLOBAL_COUNTER: Cell<u64> = const { Cell::new(0) };
}

/// How long callouts may take before the host gives up.
const CALLOUT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a paused request is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waiting {
    Nothing,
    /// An HTTP callout; `true` when the reply is answered locally.
    HttpCall {
        answer_locally: bool,
    },
    GrpcCall,
    GrpcStream,
}

pub struct ConformanceHttp {
    context_id: u32,
    settings: Rc<Settings>,
    cases: Vec<String>,
    /// Response headers to add in `on_http_response_headers` (or to a local reply).
    report: Vec<(String, String)>,
    waiting: Waiting,
    log_tag: Option<String>,
    chain_seen: Option<String>,
    /// Hex of each message received on a gRPC stream.
    stream_messages: Vec<String>,
}

fn status_of(status: Status) -> String {
    raw::status_name(status as u32)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_hex(text: &str) -> Vec<u8> {
    text.as_bytes()
        .chunks(2)
        .filter_map(|pair| std::str::from_utf8(pair).ok())
        .filter_map(|pair| u8::from_str_radix(pair, 16).ok())
        .collect()
}

/// Property values: integers are 8 bytes little-endian, everything else is text.
/// The `upstream.*` properties the `upstream` case reads.
pub const UPSTREAM_PATHS: [&str; 12] = [
    "address",
    "port",
    "local_address",
    "tls_version",
    "subject_local_certificate",
    "subject_peer_certificate",
    "uri_san_local_certificate",
    "uri_san_peer_certificate",
    "dns_san_local_certificate",
    "dns_san_peer_certificate",
    "sha256_peer_certificate_digest",
    "transport_failure_reason",
];

fn property_text(path: &[&str], value: &[u8]) -> String {
    let integer = matches!(
        path,
        ["destination", "port"]
            | ["source", "port"]
            | ["upstream", "port"]
            | ["response", "code"]
            | ["response", "flags"]
    );
    match <[u8; 8]>::try_from(value) {
        Ok(bytes) if integer => u64::from_le_bytes(bytes).to_string(),
        _ => header_safe(value),
    }
}

impl ConformanceHttp {
    pub fn new(context_id: u32, settings: Rc<Settings>) -> Self {
        Self {
            context_id,
            settings,
            cases: Vec::new(),
            report: Vec::new(),
            waiting: Waiting::Nothing,
            log_tag: None,
            chain_seen: None,
            stream_messages: Vec::new(),
        }
    }

    fn has(&self, case: &str) -> bool {
        self.cases.iter().any(|c| c == case)
    }

    fn report(&mut self, name: &str, value: impl Into<String>) {
        self.report.push((name.to_string(), value.into()));
    }

    fn request_header_or(&self, name: &str, default: &str) -> String {
        self.get_http_request_header(name)
            .unwrap_or_else(|| default.to_string())
    }

    fn run_log(&mut self) {
        let mut worst = "Ok".to_string();
        for level in [
            LogLevel::Trace,
            LogLevel::Debug,
            LogLevel::Info,
            LogLevel::Warn,
            LogLevel::Error,
            LogLevel::Critical,
        ] {
            if let Err(status) = hostcalls::log(level, "conformance-filter: log case") {
                worst = status_of(status);
            }
        }
        self.report("x-log-status", worst);
        match hostcalls::get_log_level() {
            Ok(level) => self.report("x-log-level", format!("{level:?}")),
            Err(status) => self.report("x-log-level", status_of(status)),
        }
    }

    fn run_time(&mut self) {
        let nanos = self
            .get_current_time()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.report("x-current-time-ns", nanos.to_string());
    }

    fn run_config(&mut self) {
        let vm = self.settings.vm_configuration.clone();
        let plugin = self.settings.plugin_configuration.clone();
        self.report("x-vm-config", vm);
        self.report("x-plugin-config", plugin);
    }

    fn run_headers(&mut self) {
        let got = self.request_header_or("x-in", "<absent>");
        self.report("x-got-in", got);
        let missing = match self.get_http_request_header("x-absent") {
            None => "NotFound".to_string(),
            Some(value) => format!("Ok:{value}"),
        };
        self.report("x-status-missing-header", missing);
        self.set_http_request_header("x-replace", Some("replaced"));
        self.add_http_request_header("x-add", "added");
        self.add_http_request_header("x-multi", "two");
        self.remove_http_request_header("x-remove");
        let replaced = self.request_header_or("x-replace", "<absent>");
        self.report("x-check-replace", replaced);
        let removed = self.request_header_or("x-remove", "NotFound");
        self.report("x-check-remove", removed);
        let added = self.request_header_or("x-add", "<absent>");
        self.report("x-check-add", added);
        let headers = self.get_http_request_headers();
        let mut pseudo: Vec<String> = headers
            .iter()
            .map(|(name, _)| name.clone())
            .filter(|name| name.starts_with(':'))
            .collect();
        pseudo.sort();
        pseudo.dedup();
        self.report("x-request-pseudo", pseudo.join(","));
        let multi = headers.iter().filter(|(name, _)| name == "x-multi").count();
        self.report("x-check-multi-count", multi.to_string());
    }

    fn run_request_map(&mut self) {
        let headers = self.get_http_request_headers();
        let before = headers.len();
        let mut kept: Vec<(&str, &str)> = headers
            .iter()
            .filter(|(name, _)| !name.starts_with("x-drop-"))
            .map(|(name, value)| (name.as_str(), value.as_str()))
            .collect();
        kept.push(("x-map-set", "1"));
        let dropped = before + 1 - kept.len();
        self.set_http_request_headers(kept);
        self.report("x-map-dropped", dropped.to_string());
        let set = self.request_header_or("x-map-set", "<absent>");
        self.report("x-check-map-set", set);
    }

    fn run_identity(&mut self) {
        const PATHS: [&[&str]; 10] = [
            &["source", "principal"],
            &["source", "uri_san_peer_certificate"],
            &["destination", "principal"],
            &["connection", "mtls"],
            &["connection", "tls_version"],
            &["connection", "subject_peer_certificate"],
            &["connection", "uri_san_peer_certificate"],
            &["connection", "uri_san_local_certificate"],
            &["connection", "sha256_peer_certificate_digest"],
            &["connection", "requested_server_name"],
        ];
        for path in PATHS {
            let header = format!("x-id-{}", path.join("-").replace('_', "-"));
            let (status, value) = raw::get_property(path);
            let text = match (status, path) {
                (0, ["connection", "mtls"]) => (value.first() == Some(&1)).to_string(),
                (0, _) => header_safe(&value),
                _ => format!("status:{}", raw::status_name(status)),
            };
            self.report(&header, text);
        }
    }

    /// Reports every `upstream.*` property, as response headers.
    fn run_upstream(&mut self) {
        for field in UPSTREAM_PATHS {
            let path = ["upstream", field];
            let (status, value) = raw::get_property(&path);
            let text = if status == 0 {
                property_text(&path, &value)
            } else {
                format!("status:{}", raw::status_name(status))
            };
            self.add_http_response_header(&format!("x-up-{}", field.replace('_', "-")), &text);
        }
    }

    fn run_properties(&mut self) {
        let cases: [(&[&str], &str); 7] = [
            (&["request", "path"], "x-prop-path"),
            (&["request", "method"], "x-prop-method"),
            (&["request", "headers", "x-prop-probe"], "x-prop-header"),
            (&["source", "address"], "x-prop-source-address"),
            (&["destination", "port"], "x-prop-destination-port"),
            (&["plugin_name"], "x-prop-plugin-name"),
            (&["plugin_root_id"], "x-prop-plugin-root-id"),
        ];
        for (path, header) in cases {
            let (status, value) = raw::get_property(path);
            if status == 0 {
                self.report(header, property_text(path, &value));
            } else {
                self.report(header, format!("status:{}", raw::status_name(status)));
            }
        }
        let (status, _) = raw::get_property(&["no", "such", "property"]);
        self.report("x-status-unknown-property", raw::status_name(status));
    }

    fn run_set_property(&mut self) {
        let status = raw::set_property(&["conformance_marker"], b"marked");
        self.report("x-status-set-property", raw::status_name(status));
        let (status, value) = raw::get_property(&["conformance_marker"]);
        if status == 0 {
            self.report("x-prop-roundtrip", header_safe(&value));
        } else {
            self.report(
                "x-prop-roundtrip",
                format!("status:{}", raw::status_name(status)),
            );
        }
    }

    fn run_local_reply(&mut self) -> Action {
        let mut headers = std::mem::take(&mut self.report);
        headers.push(("x-local".into(), "yes".into()));
        let headers: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        self.send_http_response(418, headers, Some(b"short-circuit"));
        Action::Pause
    }

    fn start_callout(&mut self, cluster: &str, answer_locally: bool) -> Action {
        let path = self.request_header_or("x-callout-path", "/callout");
        let headers = vec![
            (":method", "GET"),
            (":path", path.as_str()),
            (":authority", "callout"),
            ("x-callout-from", "conformance-filter"),
        ];
        match self.dispatch_http_call(cluster, headers, None, vec![], CALLOUT_TIMEOUT) {
            Ok(_token) => {
                self.waiting = Waiting::HttpCall { answer_locally };
                Action::Pause
            }
            Err(status) => {
                self.report("x-callout-error", status_of(status));
                Action::Continue
            }
        }
    }

    fn start_grpc(&mut self) -> Action {
        let (cluster, service, method, message) = self.grpc_target();
        match self.dispatch_grpc_call(
            &cluster,
            &service,
            &method,
            vec![("x-grpc-from", b"conformance-filter")],
            Some(&message),
            CALLOUT_TIMEOUT,
        ) {
            Ok(_token) => {
                self.waiting = Waiting::GrpcCall;
                Action::Pause
            }
            Err(status) => {
                self.report("x-grpc-error", status_of(status));
                Action::Continue
            }
        }
    }

    fn grpc_target(&self) -> (String, String, String, Vec<u8>) {
        (
            self.request_header_or("x-grpc-cluster", "grpc"),
            self.request_header_or("x-grpc-service", ""),
            self.request_header_or("x-grpc-method", ""),
            from_hex(&self.request_header_or("x-grpc-message", "")),
        )
    }

    fn start_grpc_stream(&mut self) -> Action {
        let (cluster, service, method, message) = self.grpc_target();
        match self.open_grpc_stream(&cluster, &service, &method, vec![]) {
            Ok(token) => {
                let sent = match hostcalls::send_grpc_stream_message(token, Some(&message), true) {
                    Ok(()) => "Ok".to_string(),
                    Err(status) => status_of(status),
                };
                self.report("x-grpc-stream-send", sent);
                self.waiting = Waiting::GrpcStream;
                Action::Pause
            }
            Err(status) => {
                self.report("x-grpc-stream-error", status_of(status));
                Action::Continue
            }
        }
    }

    fn run_grpc_cancel(&mut self) {
        let (cluster, service, method, message) = self.grpc_target();
        let outcome = |result: Result<(), Status>| match result {
            Ok(()) => "Ok".to_string(),
            Err(status) => status_of(status),
        };
        match self.dispatch_grpc_call(
            &cluster,
            &service,
            &method,
            vec![],
            Some(&message),
            CALLOUT_TIMEOUT,
        ) {
            Ok(token) => {
                let cancelled = outcome(hostcalls::cancel_grpc_call(token));
                self.report("x-grpc-cancel", cancelled);
                let again = outcome(hostcalls::cancel_grpc_call(token));
                self.report("x-grpc-cancel-again", again);
            }
            Err(status) => self.report("x-grpc-cancel", format!("dispatch:{}", status_of(status))),
        }
        let close = outcome(hostcalls::close_grpc_stream(0x7fff_fff0));
        self.report("x-grpc-close-unknown", close);
    }

    fn run_wasi(&mut self) {
        let env = std::env::var("LACEWING_TEST_ENV").unwrap_or_else(|_| "<absent>".into());
        self.report("x-wasi-env", env);
        self.report("x-wasi-args", std::env::args().count().to_string());
        let nanos = std::time::SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        self.report("x-wasi-clock-ns", nanos.to_string());
        println!("conformance-filter: printed through WASI fd_write");
        self.report("x-wasi-stdout", "Ok");
    }

    fn run_sizes(&mut self) {
        let (size_status, size) = raw::header_map_size(0);
        let (pairs_status, pairs_len) = raw::header_map_pairs_len(0);
        let matches = if size_status == 0 && pairs_status == 0 {
            (size == pairs_len).to_string()
        } else {
            format!(
                "status:{}/{}",
                raw::status_name(size_status),
                raw::status_name(pairs_status)
            )
        };
        self.report("x-map-size-matches", matches);
    }

    fn run_metrics(&mut self) {
        let counter = self.settings.counter_id;
        let gauge = self.settings.gauge_id;
        let histogram = self.settings.histogram_id;
        let outcome = |result: Result<(), Status>| match result {
            Ok(()) => "Ok".to_string(),
            Err(status) => status_of(status),
        };
        let increment = outcome(hostcalls::increment_metric(counter, 1));
        self.report("x-metric-increment", increment);
        let gauge_set = outcome(hostcalls::record_metric(gauge, 42));
        self.report("x-metric-record-gauge", gauge_set);
        let sample = outcome(hostcalls::record_metric(histogram, 7));
        self.report("x-metric-record-histogram", sample);
        let read = |id| match hostcalls::get_metric(id) {
            Ok(value) => value.to_string(),
            Err(status) => status_of(status),
        };
        let counter_value = read(counter);
        self.report("x-metric-counter", counter_value);
        let gauge_value = read(gauge);
        self.report("x-metric-gauge", gauge_value);
        let unknown = read(0x7fff_fff0);
        self.report("x-metric-unknown", unknown);
    }

    fn shared_key(&self) -> String {
        self.request_header_or("x-shared-key", "conformance-shared")
    }

    fn run_shared(&mut self) {
        let key = self.shared_key();
        let outcome = |result: Result<(), Status>| match result {
            Ok(()) => "Ok".to_string(),
            Err(status) => status_of(status),
        };
        let (_, cas) = self.get_shared_data(&key);
        let first = outcome(self.set_shared_data(&key, Some(b"first"), cas));
        self.report("x-shared-first-set", first);
        let (value, first_cas) = self.get_shared_data(&key);
        let value = value.map(|v| header_safe(&v)).unwrap_or_default();
        self.report("x-shared-after-first", value);
        let second = outcome(self.set_shared_data(&key, Some(b"second"), first_cas));
        self.report("x-shared-second-set", second);
        let stale = outcome(self.set_shared_data(&key, Some(b"stale"), first_cas));
        self.report("x-shared-stale-cas", stale);
        let (value, second_cas) = self.get_shared_data(&key);
        let value = value.map(|v| header_safe(&v)).unwrap_or_default();
        self.report("x-shared-value", value);
        self.report(
            "x-shared-cas-changed",
            (second_cas != first_cas).to_string(),
        );
    }

    fn run_shared_get(&mut self) {
        let key = self.shared_key();
        match hostcalls::get_shared_data(&key) {
            Ok((Some(value), _)) => self.report("x-shared-value", header_safe(&value)),
            Ok((None, _)) => self.report("x-shared-status", "NotFound"),
            Err(status) => self.report("x-shared-status", status_of(status)),
        }
    }

    fn run_shared_set(&mut self) {
        let key = self.shared_key();
        let value = self.request_header_or("x-shared-value", "");
        match hostcalls::set_shared_data(&key, Some(value.as_bytes()), None) {
            Ok(()) => self.report("x-shared-set", "Ok"),
            Err(status) => self.report("x-shared-set", status_of(status)),
        }
    }

    fn run_counter(&mut self) {
        let key = self.shared_key();
        match increment_shared_counter(&key) {
            Ok(value) => self.report("x-counter", value.to_string()),
            Err(status) => self.report("x-counter", status),
        }
    }

    fn run_global(&mut self) {
        let value = GLOBAL_COUNTER.with(|counter| {
            counter.set(counter.get() + 1);
            counter.get()
        });
        self.report("x-global-counter", value.to_string());
    }

    fn run_queue(&mut self) {
        let vm_id = self.request_header_or("x-queue-vm-id", "");
        let value = self.request_header_or("x-queue-value", "item");
        match hostcalls::resolve_shared_queue(&vm_id, QUEUE_NAME) {
            Ok(Some(queue_id)) => {
                let outcome = match self.enqueue_shared_queue(queue_id, Some(value.as_bytes())) {
                    Ok(()) => "Ok".to_string(),
                    Err(status) => status_of(status),
                };
                self.report("x-queue-enqueue", outcome);
            }
            Ok(None) => self.report("x-queue-resolve", "NotFound"),
            Err(status) => self.report("x-queue-resolve", status_of(status)),
        }
    }

    fn run_queue_empty(&mut self) {
        let vm_id = self.request_header_or("x-queue-vm-id", "");
        let idle = match hostcalls::resolve_shared_queue(&vm_id, IDLE_QUEUE_NAME) {
            Ok(Some(id)) => id,
            _ => self.settings.idle_queue_id,
        };
        let dequeued = match self.dequeue_shared_queue(idle) {
            Ok(None) => "Empty".to_string(),
            Ok(Some(item)) => format!("Ok:{}", header_safe(&item)),
            Err(status) => status_of(status),
        };
        self.report("x-queue-dequeue", dequeued);
        let unknown = match hostcalls::resolve_shared_queue(&vm_id, "no-such-queue") {
            Ok(None) => "NotFound".to_string(),
            Ok(Some(id)) => format!("Ok:{id}"),
            Err(status) => status_of(status),
        };
        self.report("x-queue-resolve-unknown", unknown);
        let write = match hostcalls::enqueue_shared_queue(0x7fff_fff0, Some(b"x")) {
            Ok(()) => "Ok".to_string(),
            Err(status) => status_of(status),
        };
        self.report("x-queue-enqueue-unknown", write);
    }

    fn run_foreign(&mut self) {
        match self.call_foreign_function("sha256", Some(b"lacewing")) {
            Ok(Some(digest)) => self.report("x-foreign-sha256", to_hex(&digest)),
            Ok(None) => self.report("x-foreign-sha256", "<empty>"),
            Err(status) => self.report("x-foreign-sha256", status_of(status)),
        }
        match self.call_foreign_function("no_such_function", Some(b"x")) {
            Ok(_) => self.report("x-foreign-unknown", "Ok"),
            Err(status) => self.report("x-foreign-unknown", status_of(status)),
        }
    }

    fn run_oob(&mut self) {
        let key = raw::header_value_with_out_of_bounds_key();
        self.report("x-status-oob-key", raw::status_name(key));
        let ret = raw::header_value_with_out_of_bounds_return("x-test");
        self.report("x-status-oob-return", raw::status_name(ret));
        let log = raw::log_with_out_of_bounds_message();
        self.report("x-status-oob-log", raw::status_name(log));
    }

    fn run_bad_map(&mut self) {
        let map = raw::pairs_of_unknown_map(99);
        self.report("x-status-bad-map", raw::status_name(map));
        let buffer = raw::bytes_of_unknown_buffer(99);
        self.report("x-status-bad-buffer", raw::status_name(buffer));
    }

    fn run_trap_once(&mut self) {
        let key = self.shared_key();
        match hostcalls::get_shared_data(&key) {
            Ok((Some(_), _)) => self.report("x-trap-once", "recovered"),
            _ => {
                let _ = hostcalls::set_shared_data(&key, Some(b"trapped"), None);
                core::arch::wasm32::unreachable()
            }
        }
    }

    fn record_chain_on_request(&mut self) {
        if self.settings.tag.is_empty() {
            return;
        }
        let chain = match self.get_http_request_header("x-chain") {
            Some(before) if !before.is_empty() => format!("{before},{}", self.settings.tag),
            _ => self.settings.tag.clone(),
        };
        self.set_http_request_header("x-chain", Some(&chain));
        self.chain_seen = Some(chain);
    }

    fn record_chain_on_response(&mut self) {
        if self.settings.tag.is_empty() {
            return;
        }
        if let Some(seen) = self.chain_seen.take() {
            let name = format!("x-chain-request-{}", self.settings.tag);
            self.add_http_response_header(&name, &seen);
        }
        let chain = match self.get_http_response_header("x-response-chain") {
            Some(before) if !before.is_empty() => format!("{before},{}", self.settings.tag),
            _ => self.settings.tag.clone(),
        };
        self.set_http_response_header("x-response-chain", Some(&chain));
    }

    fn run_response_headers(&mut self) {
        self.add_http_response_header("x-resp-add", "added");
        self.add_http_response_header("x-resp-replace", "original");
        self.set_http_response_header("x-resp-replace", Some("replaced"));
        self.add_http_response_header("x-resp-temp", "1");
        self.remove_http_response_header("x-resp-temp");
        let removed = match self.get_http_response_header("x-resp-temp") {
            None => "NotFound".to_string(),
            Some(value) => format!("Ok:{value}"),
        };
        self.add_http_response_header("x-resp-removed", &removed);
        let status = self
            .get_http_response_header(":status")
            .unwrap_or_else(|| "<absent>".into());
        self.add_http_response_header("x-resp-status-seen", &status);
    }

    fn run_response_map(&mut self) {
        let headers = self.get_http_response_headers();
        let mut all: Vec<(&str, &str)> = headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_str()))
            .collect();
        all.push(("x-resp-map-set", "1"));
        self.set_http_response_headers(all);
    }
}

impl Context for ConformanceHttp {
    fn on_http_call_response(
        &mut self,
        _token_id: u32,
        num_headers: usize,
        body_size: usize,
        _num_trailers: usize,
    ) {
        let Waiting::HttpCall { answer_locally } = self.waiting else {
            return;
        };
        self.waiting = Waiting::Nothing;
        if num_headers == 0 {
            self.report("x-callout-status", "failed");
        } else {
            let status = self
                .get_http_call_response_header(":status")
                .unwrap_or_else(|| "<absent>".into());
            self.report("x-callout-status", status);
            self.report("x-callout-header-count", num_headers.to_string());
        }
        let body = self
            .get_http_call_response_body(0, body_size)
            .unwrap_or_default();
        self.report("x-callout-body-len", body.len().to_string());
        if answer_locally {
            let mut headers = std::mem::take(&mut self.report);
            headers.push(("x-local".into(), "callout".into()));
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            self.send_http_response(200, headers, Some(&body));
        } else {
            self.set_http_request_header("x-callout-done", Some("1"));
            self.resume_http_request();
        }
    }

    fn on_grpc_call_response(&mut self, _token_id: u32, status_code: u32, response_size: usize) {
        if self.waiting != Waiting::GrpcCall {
            return;
        }
        self.waiting = Waiting::Nothing;
        self.report("x-grpc-status", status_code.to_string());
        let (_, status_message) = self.get_grpc_status();
        self.report("x-grpc-status-message", status_message.unwrap_or_default());
        let message = self
            .get_grpc_call_response_body(0, response_size)
            .unwrap_or_default();
        self.report("x-grpc-response", to_hex(&message));
        self.resume_http_request();
    }

    fn on_grpc_stream_initial_metadata(&mut self, _token_id: u32, num_elements: u32) {
        if self.waiting != Waiting::GrpcStream {
            return;
        }
        self.report("x-grpc-stream-initial-metadata", num_elements.to_string());
        let content_type = self
            .get_grpc_stream_initial_metadata_value("content-type")
            .map(|v| header_safe(&v))
            .unwrap_or_else(|| "<absent>".into());
        self.report("x-grpc-stream-content-type", content_type);
    }

    fn on_grpc_stream_message(&mut self, _token_id: u32, message_size: usize) {
        if self.waiting != Waiting::GrpcStream {
            return;
        }
        let message = self
            .get_grpc_stream_message(0, message_size)
            .unwrap_or_default();
        self.stream_messages.push(to_hex(&message));
    }

    fn on_grpc_stream_trailing_metadata(&mut self, _token_id: u32, num_elements: u32) {
        if self.waiting != Waiting::GrpcStream {
            return;
        }
        self.report("x-grpc-stream-trailing-metadata", num_elements.to_string());
    }

    fn on_grpc_stream_close(&mut self, _token_id: u32, status_code: u32) {
        if self.waiting != Waiting::GrpcStream {
            return;
        }
        self.waiting = Waiting::Nothing;
        self.report("x-grpc-stream-status", status_code.to_string());
        let messages = std::mem::take(&mut self.stream_messages);
        self.report("x-grpc-stream-count", messages.len().to_string());
        self.report("x-grpc-stream-messages", messages.join(","));
        self.resume_http_request();
    }

    fn on_done(&mut self) -> bool {
        let Some(tag) = self.log_tag.clone() else {
            return true;
        };
        let key = format!("conformance-done-{tag}");
        let _ = hostcalls::set_shared_data(&key, Some(b"1"), None);
        if !self.has("deferred-done") {
            return true;
        }
        let item = DeferredDone {
            context_id: self.context_id,
            tag,
        }
        .item();
        // Finished later, from the root context's on_queue_ready.
        hostcalls::enqueue_shared_queue(self.settings.queue_id, Some(item.as_bytes())).is_err()
    }
}

impl HttpContext for ConformanceHttp {
    fn on_http_request_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        self.cases = self
            .get_http_request_header("x-test")
            .unwrap_or_default()
            .split(',')
            .map(|c| c.trim().to_string())
            .filter(|c| !c.is_empty())
            .collect();
        self.log_tag = self.get_http_request_header("x-log-tag");
        self.record_chain_on_request();
        if self.has("trap") {
            core::arch::wasm32::unreachable();
        }
        if self.has("trap-once") {
            self.run_trap_once();
        }
        if self.has("log-controls") {
            let message = b"conformance-filter: \x1b[2Jcleared\nforged line \xff";
            let status = raw::log_bytes(LogLevel::Info, message);
            self.report("x-log-status", raw::status_name(status));
        }
        if self.has("log") {
            self.run_log();
        }
        if self.has("time") {
            self.run_time();
        }
        if self.has("config") {
            self.run_config();
        }
        if self.has("headers") {
            self.run_headers();
        }
        if self.has("request-map") {
            self.run_request_map();
        }
        if self.has("identity") {
            self.run_identity();
        }
        if self.has("upstream") {
            let (status, value) = raw::get_property(&["upstream", "address"]);
            let text = if status == 0 {
                header_safe(&value)
            } else {
                format!("status:{}", raw::status_name(status))
            };
            self.report("x-up-request-address", text);
        }
        if self.has("properties") {
            self.run_properties();
        }
        if self.has("set-property") {
            self.run_set_property();
        }
        if self.has("metrics") {
            self.run_metrics();
        }
        if self.has("shared") {
            self.run_shared();
        }
        if self.has("shared-get") {
            self.run_shared_get();
        }
        if self.has("shared-set") {
            self.run_shared_set();
        }
        if self.has("counter") {
            self.run_counter();
        }
        if self.has("global") {
            self.run_global();
        }
        if self.has("queue") {
            self.run_queue();
        }
        if self.has("queue-empty") {
            self.run_queue_empty();
        }
        if self.has("foreign") {
            self.run_foreign();
        }
        if self.has("oob") {
            self.run_oob();
        }
        if self.has("bad-map") {
            self.run_bad_map();
        }
        if self.has("grpc-cancel") {
            self.run_grpc_cancel();
        }
        if self.has("wasi") {
            self.run_wasi();
        }
        if self.has("sizes") {
            self.run_sizes();
        }
        if self.has("request-body") {
            self.remove_http_request_header("content-length");
        }
        if self.has("reset") {
            self.reset_http_request();
            return Action::Pause;
        }
        if self.has("local-reply") {
            return self.run_local_reply();
        }
        if self.has("callout") {
            let cluster = self.request_header_or("x-callout-cluster", "callout");
            return self.start_callout(&cluster, false);
        }
        if self.has("callout-local") {
            let cluster = self.request_header_or("x-callout-cluster", "callout");
            return self.start_callout(&cluster, true);
        }
        if self.has("callout-unknown") {
            return self.start_callout("no-such-cluster", false);
        }
        if self.has("grpc") {
            return self.start_grpc();
        }
        if self.has("grpc-stream") {
            return self.start_grpc_stream();
        }
        Action::Continue
    }

    fn on_http_request_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.has("request-body") {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        if self.has("sizes") {
            let (status, size) = raw::buffer_status(0);
            let size = if status == 0 {
                size.to_string()
            } else {
                format!("status:{}", raw::status_name(status))
            };
            self.report("x-request-body-status-size", size);
        }
        let body = self.get_http_request_body(0, body_size).unwrap_or_default();
        let mut rewritten = String::from_utf8_lossy(&body).to_uppercase();
        rewritten.push_str("-REWRITTEN");
        self.set_http_request_body(0, body_size, rewritten.as_bytes());
        self.report("x-request-body-len", body.len().to_string());
        Action::Continue
    }

    fn on_http_request_trailers(&mut self, num_trailers: usize) -> Action {
        if !self.has("request-trailers") {
            return Action::Continue;
        }
        let seen = self
            .get_http_request_trailer("x-trailer-in")
            .unwrap_or_else(|| "<absent>".into());
        self.report("x-request-trailer", seen);
        self.report("x-request-trailer-count", num_trailers.to_string());
        self.set_http_request_trailer("x-trailer-in", Some("modified"));
        self.add_http_request_trailer("x-trailer-added", "1");
        Action::Continue
    }

    fn on_http_response_headers(&mut self, _num_headers: usize, _end_of_stream: bool) -> Action {
        for (name, value) in std::mem::take(&mut self.report) {
            self.add_http_response_header(&name, &value);
        }
        self.record_chain_on_response();
        if self.has("upstream") {
            self.run_upstream();
        }
        if self.has("response-headers") {
            self.run_response_headers();
        }
        if self.has("response-map") {
            self.run_response_map();
        }
        if self.has("response-body") {
            self.remove_http_response_header("content-length");
        }
        Action::Continue
    }

    fn on_http_response_body(&mut self, body_size: usize, end_of_stream: bool) -> Action {
        if !self.has("response-body") {
            return Action::Continue;
        }
        if !end_of_stream {
            return Action::Pause;
        }
        let body = self
            .get_http_response_body(0, body_size)
            .unwrap_or_default();
        let rewritten = format!("response-rewritten:{}", body.len());
        self.set_http_response_body(0, body_size, rewritten.as_bytes());
        Action::Continue
    }

    fn on_http_response_trailers(&mut self, _num_trailers: usize) -> Action {
        if !self.has("response-trailers") {
            return Action::Continue;
        }
        let mut names: Vec<String> = self
            .get_http_response_trailers()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        names.sort();
        self.add_http_response_trailer("x-resp-trailer-added", &names.join(","));
        Action::Continue
    }

    fn on_log(&mut self) {
        let Some(tag) = self.log_tag.clone() else {
            return;
        };
        for (path, key) in [
            (["response", "code"], format!("conformance-log-{tag}")),
            (
                ["response", "flags"],
                format!("conformance-log-flags-{tag}"),
            ),
            (
                ["response", "code_details"],
                format!("conformance-log-details-{tag}"),
            ),
        ] {
            let (status, value) = raw::get_property(&path);
            let text = if status == 0 {
                property_text(&path, &value)
            } else {
                format!("status:{}", raw::status_name(status))
            };
            let _ = hostcalls::set_shared_data(&key, Some(text.as_bytes()), None);
        }
    }
}
