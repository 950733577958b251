//! telemetry: per source, destination and route, counts requests and
//! responses by status class and records latency (SMI TrafficMetrics), writes
//! one JSON access-log line per request, and propagates W3C `traceparent`
//! (same trace id, a new span id per hop; a new trace when absent).
//! Schema and metric names in README.md.

mod trace;

use std::cell::RefCell;
use std::rc::Rc;

use lacewing_sdk::http::Headers;
use lacewing_sdk::metrics::{Counter, Family, Histogram};
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
    counters: Family<Counter>,
    histograms: Family<Histogram>,
    ids: RefCell<Ids>,
}

impl Telemetry {
    fn count(&self, name: String) {
        self.counters.with(&name, |c| c.inc());
    }

    fn record(&self, name: String, value: u64) {
        self.histograms.with(&name, |h| h.record(value));
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
            counters: Family::default(),
            histograms: Family::default(),
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
    lacewing_sdk::property(path)
        .ok()
        .flatten()
        .filter(|s| !s.is_empty())
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
        self.method = headers.get(":method").ok().flatten().unwrap_or_default();
        self.path = headers.get(":path").ok().flatten().unwrap_or_default();
        if self.plugin.config.trace {
            let incoming = headers
                .get("traceparent")
                .ok()
                .flatten()
                .and_then(|v| TraceParent::parse(&v));
            let next = TraceParent::next_hop(incoming.as_ref(), &mut self.plugin.ids.borrow_mut());
            if let Err(e) = headers.set("traceparent", &next.header()) {
                lacewing_sdk::warn!("telemetry: cannot set traceparent: {e}");
            }
            self.trace = Some(next);
        }
        Action::Continue
    }

    fn on_log(&mut self) {
        let p = &self.plugin;
        let source = prop("source.principal").unwrap_or_else(|| "unknown".into());
        let destination = p
            .config
            .destination
            .clone()
            .or_else(|| prop("cluster_name"))
            .unwrap_or_else(|| "unknown".into());
        let route = prop("route_name").unwrap_or_else(|| "unknown".into());
        let code = int_prop("response.code").unwrap_or(0);
        let class = status_class(code);
        let duration_ms = int_prop("request.duration").map_or(0, |ns| ns.max(0) / 1_000_000);
        let labels = format!("source.{source}.destination.{destination}.route.{route}");
        p.count(format!("telemetry_requests.{labels}"));
        p.count(format!("telemetry_responses.{labels}.class.{class}"));
        let outcome = if code >= 500 || code == 0 {
            "failures"
        } else {
            "successes"
        };
        p.count(format!("telemetry_{outcome}.{labels}"));
        p.record(
            format!("telemetry_latency_ms.{labels}"),
            u64::try_from(duration_ms).unwrap_or(0),
        );
        if p.config.access_log {
            let line = serde_json::json!({
                "type": "access",
                "method": self.method,
                "path": self.path,
                "status": code,
                "duration_ms": duration_ms,
                "source": source,
                "destination": destination,
                "route": route,
                "trace_id": self.trace.as_ref().map(|t| t.trace_id.as_str()),
                "span_id": self.trace.as_ref().map(|t| t.span_id.as_str()),
            });
            lacewing_sdk::info!("{line}");
        }
    }
}

lacewing_sdk::register!(Telemetry);
