//! telemetry: per source, destination and route, counts requests and
//! responses by status class and records latency (SMI TrafficMetrics), writes
//! one JSON access-log line per request, and propagates W3C `traceparent`
//! (same trace id, a new span id per hop; a new trace when absent).
//! Schema and metric names in README.md.

mod trace;

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use lacewing_sdk::http::Headers;
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
    series: RefCell<HashMap<String, Series>>,
    /// Scratch for the series key and the access-log line, reused by every
    /// request (saves two allocations per request).
    scratch: RefCell<(String, String)>,
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
            series: RefCell::new(HashMap::new()),
            scratch: RefCell::new((String::new(), String::new())),
            ids: RefCell::new(Ids::default()),
        })
    }

    fn new_filter(self: &Rc<Self>) -> TelemetryFilter {
        TelemetryFilter {
            plugin: self.clone(),
            method: String::new(),
            path: String::new(),
            trace: None,
        }
    }
}

/// One request's observations.
pub struct TelemetryFilter {
    plugin: Rc<Telemetry>,
    method: String,
    path: String,
    trace: Option<TraceParent>,
}

fn prop(path: &str) -> Option<String> {
    let bytes = lacewing_sdk::hostcalls::property(path).ok().flatten()?;
    if bytes.is_empty() {
        return None;
    }
    // Valid UTF-8 (the usual case) is taken as it is, without a second copy.
    Some(
        String::from_utf8(bytes)
            .unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
    )
}

fn int_prop(path: &str) -> Option<i64> {
    let bytes = lacewing_sdk::hostcalls::property(path).ok().flatten()?;
    Some(i64::from_le_bytes(bytes.get(..8)?.try_into().ok()?))
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
        if self.plugin.config.access_log {
            self.method = headers.get(":method").ok().flatten().unwrap_or_default();
            self.path = headers.get(":path").ok().flatten().unwrap_or_default();
        }
        if self.plugin.config.trace {
            let incoming = headers
                .get("traceparent")
                .ok()
                .flatten()
                .and_then(|v| TraceParent::parse(&v));
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
        let source = prop("source.principal");
        let source = source.as_deref().unwrap_or("unknown");
        let cluster;
        let destination = match &p.config.destination {
            Some(d) => d.as_str(),
            None => {
                cluster = prop("cluster_name");
                cluster.as_deref().unwrap_or("unknown")
            }
        };
        let route = prop("route_name");
        let route = route.as_deref().unwrap_or("unknown");
        let code = int_prop("response.code").unwrap_or(0);
        let duration_ms = int_prop("request.duration").map_or(0, |ns| ns.max(0) / 1_000_000);
        let mut scratch = p.scratch.borrow_mut();
        let (key, line) = &mut *scratch;
        key.clear();
        for (i, part) in [source, destination, route].into_iter().enumerate() {
            if i > 0 {
                key.push('\0');
            }
            key.push_str(part);
        }
        {
            let mut series = p.series.borrow_mut();
            let entry = match series.get_mut(key.as_str()) {
                Some(entry) => entry,
                None => series.entry(key.clone()).or_insert_with(|| {
                    Series::new(format!(
                        "source.{source}.destination.{destination}.route.{route}"
                    ))
                }),
            };
            entry.observe(code, u64::try_from(duration_ms).unwrap_or(0));
        }
        if p.config.access_log {
            let trace = self.trace.as_ref();
            access_line(
                line,
                &AccessFields {
                    method: &self.method,
                    path: &self.path,
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
    method: &'a str,
    path: &'a str,
    status: i64,
    duration_ms: i64,
    source: &'a str,
    destination: &'a str,
    route: &'a str,
    trace_id: Option<&'a str>,
    span_id: Option<&'a str>,
}

/// Writes the JSON access-log line into `out` (cleared first). Written by
/// hand into a reused buffer: building a `serde_json::Value` allocated for
/// every field and key, per request.
fn access_line(out: &mut String, f: &AccessFields<'_>) {
    use std::fmt::Write as _;
    out.clear();
    out.push_str("{\"type\":\"access\",\"method\":");
    json_string(out, f.method);
    out.push_str(",\"path\":");
    json_string(out, f.path);
    let _ = write!(
        out,
        ",\"status\":{},\"duration_ms\":{}",
        f.status, f.duration_ms
    );
    for (name, value) in [
        ("source", Some(f.source)),
        ("destination", Some(f.destination)),
        ("route", Some(f.route)),
        ("trace_id", f.trace_id),
        ("span_id", f.span_id),
    ] {
        out.push_str(",\"");
        out.push_str(name);
        out.push_str("\":");
        match value {
            Some(v) => json_string(out, v),
            None => out.push_str("null"),
        }
    }
    out.push('}');
}

/// Appends `s` as a JSON string literal (RFC 8259 escapes). Runs of
/// characters that need no escape are copied at once.
fn json_string(out: &mut String, s: &str) {
    use std::fmt::Write as _;
    out.push('"');
    let bytes = s.as_bytes();
    let mut plain_from = 0;
    let mut at = 0;
    while let Some(&byte) = bytes.get(at) {
        // Eight plain bytes at a time: most of a line needs no escape.
        if let Some(word) = bytes[at..].first_chunk::<8>()
            && !needs_escape(u64::from_le_bytes(*word))
        {
            at += 8;
            continue;
        }
        let escape = match byte {
            b'"' => "\\\"",
            b'\\' => "\\\\",
            b'\n' => "\\n",
            b'\r' => "\\r",
            b'\t' => "\\t",
            0..=0x1f => "",
            _ => {
                at += 1;
                continue;
            }
        };
        out.push_str(&s[plain_from..at]);
        if escape.is_empty() {
            let _ = write!(out, "\\u{:04x}", byte);
        } else {
            out.push_str(escape);
        }
        at += 1;
        plain_from = at;
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
            &AccessFields {
                method: "GET",
                path: "/a\"b\\c\n\u{1}é",
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
    }
}

lacewing_sdk::register!(Telemetry);
