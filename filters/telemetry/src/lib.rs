//! telemetry: per source, destination and route, counts requests and
//! responses by status class and records latency (SMI TrafficMetrics), writes
//! one JSON access-log line per request, and propagates W3C `traceparent`
//! (same trace id, a new span id per hop; a new trace when absent).
//! Schema and metric names in README.md.

mod trace;

use std::cell::RefCell;
use std::rc::Rc;

use lacewing_sdk::http::Headers;
use lacewing_sdk::keys::{Key, KeyMap};
use lacewing_sdk::metrics::{Counter, Histogram};
use lacewing_sdk::{Action, Filter, Plugin};
use serde::Deserialize;

pub use trace::{Ids, TraceParent};

/// The plugin configuration; every field is optional.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The destination's name in metrics; default: the `cluster_name` property.
    #[serde(default)]
    pub destination: Option<String>,
    /// Write the JSON access-log line (default true).
    #[serde(default = "yes")]
    pub access_log: bool,
    /// Propagate and generate `traceparent` (default true).
    #[serde(default = "yes")]
    pub trace: bool,
}

fn yes() -> bool {
    true
}

/// The plugin: configuration and metric handles defined on first use.
pub struct Telemetry {
    config: Config,
    /// One set of handles per (source, destination, route), keyed by
    /// `source\0destination\0route`: a request costs one lookup, not a name
    /// built and looked up per metric.
    /// Hashed and compared eight bytes a step ([`lacewing_sdk::keys`]):
    /// SipHash and the byte-at-a-time `memcmp` cost about 1.2k instructions
    /// a request here.
    series: RefCell<KeyMap<Series>>,
    /// Scratch for the series key and the access-log line, reused by every
    /// request (saves two allocations per request).
    scratch: RefCell<(Key, String)>,
    ids: RefCell<Ids>,
}

/// The metrics of one (source, destination, route).
struct Series {
    requests: Option<Counter>,
    successes: Option<Counter>,
    failures: Option<Counter>,
    latency: Option<Histogram>,
    /// By status class: none, 1xx … 5xx; defined when first seen.
    responses: [Option<Option<Counter>>; 6],
    labels: String,
}

impl Series {
    fn new(labels: String) -> Self {
        let counter = |name: &str| Counter::define(&format!("telemetry_{name}.{labels}")).ok();
        Series {
            requests: counter("requests"),
            successes: counter("successes"),
            failures: counter("failures"),
            latency: Histogram::define(&format!("telemetry_latency_ms.{labels}")).ok(),
            responses: [None; 6],
            labels,
        }
    }

    fn observe(&mut self, code: i64, duration_ms: u64) {
        // Metrics must not fail requests: a host error is dropped.
        if let Some(c) = &self.requests {
            let _ = c.inc();
        }
        let class = if (100..600).contains(&code) {
            (code / 100) as usize
        } else {
            0
        };
        let labels = &self.labels;
        let response = self.responses[class].get_or_insert_with(|| {
            Counter::define(&format!(
                "telemetry_responses.{labels}.class.{}",
                status_class(code)
            ))
            .ok()
        });
        if let Some(c) = response {
            let _ = c.inc();
        }
        let outcome = if code >= 500 || code == 0 {
            &self.failures
        } else {
            &self.successes
        };
        if let Some(c) = outcome {
            let _ = c.inc();
        }
        if let Some(h) = &self.latency {
            let _ = h.record(duration_ms);
        }
    }
}

impl Plugin for Telemetry {
    type Config = Config;
    type Filter = TelemetryFilter;

    fn configure(config: Config) -> Result<Self, String> {
        if config.destination.as_deref() == Some("") {
            return Err("destination: must not be empty".into());
        }
        Ok(Telemetry {
            config,
            series: RefCell::new(KeyMap::default()),
            scratch: RefCell::new((Key::default(), String::new())),
            ids: RefCell::new(Ids::default()),
        })
    }

    fn new_filter(self: &Rc<Self>) -> TelemetryFilter {
        TelemetryFilter {
            plugin: self.clone(),
            trace: None,
        }
    }
}

/// One request's observations.
pub struct TelemetryFilter {
    plugin: Rc<Telemetry>,
    trace: Option<TraceParent>,
}

/// Appends a text property to `out` (`unknown` when absent or empty). The
/// value is read from the buffer the SDK lends the host: no allocation.
fn push_prop(out: &mut String, path: &str) {
    let before = out.len();
    let _ = lacewing_sdk::hostcalls::with_property(path, |bytes| {
        // Valid UTF-8 (always, from Lacewing) is checked once: the lossy
        // conversion checked it twice (about 600 instructions a request).
        match lacewing_sdk::text::from_utf8(bytes) {
            Ok(text) => out.push_str(text),
            Err(_) => out.push_str(&String::from_utf8_lossy(bytes)),
        }
    });
    if out.len() == before {
        out.push_str("unknown");
    }
}

/// Appends a request header as a JSON string (`""` when absent), read from
/// the buffer the SDK lends the host.
fn push_request_header(out: &mut String, name: &str) {
    let found = Headers::REQUEST.with_value(name, |v| json_string(out, v));
    if !matches!(found, Ok(Some(()))) {
        json_string(out, "");
    }
}

fn int_prop(path: &str) -> Option<i64> {
    lacewing_sdk::hostcalls::with_property(path, |bytes| {
        Some(i64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
    })
    .ok()
    .flatten()
    .flatten()
}

/// `2xx`, `4xx`, …; `none` when no response was sent.
fn status_class(code: i64) -> String {
    if (100..600).contains(&code) {
        format!("{}xx", code / 100)
    } else {
        "none".into()
    }
}

impl Filter for TelemetryFilter {
    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        if self.plugin.config.trace {
            let incoming = headers
                .with_value("traceparent", TraceParent::parse)
                .ok()
                .flatten()
                .flatten();
            let next = TraceParent::next_hop(incoming.as_ref(), &mut self.plugin.ids.borrow_mut());
            if let Err(e) = headers.set("traceparent", next.write_header(&mut [0; 55])) {
                lacewing_sdk::warn!("telemetry: cannot set traceparent: {e}");
            }
            self.trace = Some(next);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let p = &self.plugin;
        let code = int_prop("response.code").unwrap_or(0);
        let duration_ms = int_prop("request.duration").map_or(0, |ns| ns.max(0) / 1_000_000);
        let mut scratch = p.scratch.borrow_mut();
        let (probe, line) = &mut *scratch;
        // The key `source\0destination\0route` is built from the properties
        // in place; its three parts are then the labels and log fields.
        let key = probe.text_mut();
        key.clear();
        push_prop(key, "source.principal");
        let source_end = key.len();
        key.push('\0');
        match &p.config.destination {
            Some(d) => key.push_str(d),
            None => push_prop(key, "cluster_name"),
        }
        let destination_end = key.len();
        key.push('\0');
        push_prop(key, "route_name");
        let key = probe.as_str();
        let (source, destination, route) = (
            &key[..source_end],
            &key[source_end + 1..destination_end],
            &key[destination_end + 1..],
        );
        {
            let mut series = p.series.borrow_mut();
            let entry = match series.get_mut(probe) {
                Some(entry) => entry,
                None => series.entry(probe.clone()).or_insert_with(|| {
                    Series::new(format!(
                        "source.{source}.destination.{destination}.route.{route}"
                    ))
                }),
            };
            entry.observe(code, u64::try_from(duration_ms).unwrap_or(0));
        }
        if p.config.access_log {
            let trace = self.trace.as_ref();
            // Method and path are read now, from the buffer the SDK lends
            // the host, straight into the line (kept from the request
            // headers phase, they cost two allocations a request).
            access_line(
                line,
                |out| push_request_header(out, ":method"),
                |out| push_request_header(out, ":path"),
                &AccessFields {
                    status: code,
                    duration_ms,
                    source,
                    destination,
                    route,
                    trace_id: trace.map(TraceParent::trace_id),
                    span_id: trace.map(TraceParent::span_id),
                },
            );
            lacewing_sdk::log::log(lacewing_sdk::log::LogLevel::Info, line);
        }
    }
}

/// What one access-log line says.
struct AccessFields<'a> {
    status: i64,
    duration_ms: i64,
    source: &'a str,
    destination: &'a str,
    route: &'a str,
    trace_id: Option<&'a str>,
    span_id: Option<&'a str>,
}

/// Writes the JSON access-log line into `out` (cleared first); the method
/// and path are written by the two functions given. Written by hand into a
/// reused buffer: building a `serde_json::Value` allocated for every field
/// and key, per request.
fn access_line(
    out: &mut String,
    write_method: impl FnOnce(&mut String),
    write_path: impl FnOnce(&mut String),
    f: &AccessFields<'_>,
) {
    out.clear();
    out.push_str("{\"type\":\"access\",\"method\":");
    write_method(out);
    out.push_str(",\"path\":");
    write_path(out);
    out.push_str(",\"status\":");
    push_int(out, f.status);
    out.push_str(",\"duration_ms\":");
    push_int(out, f.duration_ms);
    for (name, value) in [
        ("source", f.source),
        ("destination", f.destination),
        ("route", f.route),
    ] {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        json_string(out, value);
    }
    // Trace and span ids are hex digits: nothing to escape.
    for (name, value) in [("trace_id", f.trace_id), ("span_id", f.span_id)] {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        match value {
            Some(v) => {
                out.push('"');
                out.push_str(v);
                out.push('"');
            }
            None => out.push_str("null"),
        }
    }
    out.push('}');
}

/// Appends `n` in decimal (`core::fmt` cost about 1k instructions for the
/// line's two numbers).
fn push_int(out: &mut String, n: i64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = n.unsigned_abs();
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    if n < 0 {
        out.push('-');
    }
    // One copy of the digits (a `push` per digit cost about 20 instructions each).
    out.push_str(lacewing_sdk::text::from_utf8(&digits[at..]).unwrap_or_default());
}

/// Appends `s` as a JSON string literal (RFC 8259 escapes). A string that
/// needs no escape (the usual case) is checked eight bytes at a time and
/// copied at once; the escaping itself is out of line, so the usual case
/// does not pay for its larger frame (about 0.1k instructions a line).
#[inline]
fn json_string(out: &mut String, s: &str) {
    let bytes = s.as_bytes();
    let mut words = bytes.chunks_exact(8);
    let escapes = words
        .any(|word| needs_escape(u64::from_le_bytes(word.try_into().unwrap_or_default())))
        || words
            .remainder()
            .iter()
            .any(|&b| b < 0x20 || b == b'"' || b == b'\\');
    if escapes {
        json_string_escaped(out, s);
        return;
    }
    out.reserve(s.len() + 2);
    out.push('"');
    out.push_str(s);
    out.push('"');
}

/// [`json_string`] for a string with something to escape: runs that need
/// none are copied at once.
#[inline(never)]
fn json_string_escaped(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.push('"');
    let mut plain_from = 0;
    for (at, &byte) in s.as_bytes().iter().enumerate() {
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => continue,
        };
        out.push_str(&s[plain_from..at]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", byte);
        } else {
            out.push_str(escape);
        }
        plain_from = at + 1;
    }
    out.push_str(&s[plain_from..]);
    out.push('"');
}

/// Whether any of the eight bytes in `word` needs escaping in a JSON string:
/// a control character (below 0x20), `"` or `\`. One test for eight bytes
/// (the classic "has a byte less than n" and "has a zero byte" bit tricks).
fn needs_escape(word: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let has_zero = |w: u64| w.wrapping_sub(ONES) & !w & HIGHS;
    let below_space = word.wrapping_sub(ONES * 0x20) & !word & HIGHS;
    let quote = has_zero(word ^ (ONES * u64::from(b'"')));
    let backslash = has_zero(word ^ (ONES * u64::from(b'\\')));
    below_space | quote | backslash != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_strings_escape_what_json_requires_at_any_offset() {
        let specials = [
            '"', '\\', '\n', '\r', '\t', '\u{1}', '\u{1f}', 'é', ' ', '~', '\u{7f}',
        ];
        for len in 0..20 {
            for at in 0..len.max(1) {
                for special in specials {
                    let text: String = (0..len)
                        .map(|i| if i == at { special } else { 'a' })
                        .collect();
                    let mut out = String::new();
                    json_string(&mut out, &text);
                    let back: String = serde_json::from_str(&out).unwrap();
                    assert_eq!(back, text, "{out}");
                    assert_eq!(out, serde_json::to_string(&text).unwrap());
                }
            }
        }
    }

    #[test]
    fn the_access_line_is_json_with_escapes() {
        let mut line = String::from("left over");
        access_line(
            &mut line,
            |out| json_string(out, "GET"),
            |out| json_string(out, "/a\"b\\c\n\u{1}é"),
            &AccessFields {
                status: 200,
                duration_ms: 3,
                source: "spiffe://lacewing.local/ns/default/sa/web",
                destination: "orders",
                route: "unknown",
                trace_id: Some("4bf92f3577b34da6a3ce929d0e0e4736"),
                span_id: None,
            },
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["type"], "access");
        assert_eq!(v["path"], "/a\"b\\c\n\u{1}é");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 3);
        assert_eq!(v["source"], "spiffe://lacewing.local/ns/default/sa/web");
        assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert!(v["span_id"].is_null());
        assert_eq!(v["method"], "GET");
    }

    #[test]
    fn integers_are_written_in_decimal() {
        for n in [0, 7, 10, 200, 504, 1_000_000, -1, -45, i64::MAX, i64::MIN] {
            let mut out = String::new();
            push_int(&mut out, n);
            assert_eq!(out, n.to_string());
        }
    }
}

lacewing_sdk::register!(Telemetry);
