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
    /// One set of handles per `source.<s>.destination.<d>.route.<r>`: a
    /// request costs one lookup, not a name built and looked up per metric.
    series: RefCell<HashMap<String, Series>>,
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
        let duration_ms = int_prop("request.duration").map_or(0, |ns| ns.max(0) / 1_000_000);
        let labels = format!("source.{source}.destination.{destination}.route.{route}");
        {
            let mut series = p.series.borrow_mut();
            let entry = match series.get_mut(&labels) {
                Some(entry) => entry,
                None => series
                    .entry(labels.clone())
                    .or_insert_with(|| Series::new(labels.clone())),
            };
            entry.observe(code, u64::try_from(duration_ms).unwrap_or(0));
        }
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
