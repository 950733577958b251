//! Metrics that plugins define with `proxy_define_metric`, exported on the
//! proxy's `/metrics`.
//!
//! Three families are registered once on the proxy's registry:
//! `lacewing_wasm_plugin_counter`, `lacewing_wasm_plugin_gauge` and
//! `lacewing_wasm_plugin_histogram`, each labelled by `plugin` and `name` (the
//! metric name the module chose, kept verbatim as a label value so any UTF-8
//! name is safe to export). A metric id is shared by every worker's VM of a
//! plugin: defining the same `(plugin, kind, name)` again returns the same id.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use lacewing_abi::MetricType;
use prometheus::{Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge};
use prometheus::{IntGaugeVec, Opts, Registry};

/// Most metrics one plugin may define.
pub const MAX_METRICS_PER_PLUGIN: usize = 1000;
/// Longest metric name accepted, in bytes.
pub const MAX_METRIC_NAME_BYTES: usize = 512;

/// Buckets of plugin histograms: values are in units the plugin chose, so
/// the buckets span a wide range (the same as Envoy's default buckets).
pub const HISTOGRAM_BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// The kind of a plugin metric (`proxy_metric_type_t`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down, or is set.
    Gauge,
    /// A distribution of recorded values.
    Histogram,
}

impl From<MetricType> for MetricKind {
    fn from(kind: MetricType) -> Self {
        match kind {
            MetricType::Counter => Self::Counter,
            MetricType::Gauge => Self::Gauge,
            MetricType::Histogram => Self::Histogram,
        }
    }
}

/// Why a metric operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetricError {
    /// No metric has that id (`NOT_FOUND`).
    #[error("no metric with id {0}")]
    NotFound(u32),
    /// The operation or value does not fit the metric (`BAD_ARGUMENT`).
    #[error("bad metric argument: {0}")]
    BadArgument(String),
    /// The plugin already defined as many metrics as it may.
    #[error("plugin `{plugin}` defined the maximum of {limit} metrics")]
    TooMany { plugin: String, limit: usize },
    /// Reading a histogram's value is not supported (`UNIMPLEMENTED`).
    #[error("metric {0} is a histogram; its value cannot be read")]
    Unsupported(u32),
}

/// The checked metric name for bytes a module passed: valid UTF-8, not
/// empty, at most [`MAX_METRIC_NAME_BYTES`].
pub fn metric_name(bytes: &[u8]) -> Result<&str, MetricError> {
    let name = std::str::from_utf8(bytes)
        .map_err(|_| MetricError::BadArgument("metric name is not valid UTF-8".into()))?;
    check_name(name)?;
    Ok(name)
}

fn check_name(name: &str) -> Result<(), MetricError> {
    if name.is_empty() {
        return Err(MetricError::BadArgument("metric name is empty".into()));
    }
    if name.len() > MAX_METRIC_NAME_BYTES {
        return Err(MetricError::BadArgument(format!(
            "metric name of {} bytes exceeds {MAX_METRIC_NAME_BYTES}",
            name.len()
        )));
    }
    Ok(())
}

/// One defined metric, its labelled child resolved once.
enum Handle {
    Counter(IntCounter),
    Gauge(IntGauge),
    Histogram(Histogram),
}

#[derive(Default)]
struct Table {
    /// `handles[id - 1]` is metric `id`.
    handles: Vec<Handle>,
    ids: HashMap<(String, MetricKind, String), u32>,
    per_plugin: HashMap<String, usize>,
}

/// The metrics all plugins defined, shared by every worker.
pub struct PluginMetrics {
    counters: IntCounterVec,
    gauges: IntGaugeVec,
    histograms: HistogramVec,
    table: RwLock<Table>,
}

impl std::fmt::Debug for PluginMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PluginMetrics").finish_non_exhaustive()
    }
}

const LABELS: &[&str] = &["plugin", "name"];

impl PluginMetrics {
    /// Creates the three families and registers them on `registry` (whose
    /// `lacewing` prefix makes them `lacewing_wasm_plugin_*`). Create one
    /// per registry: a second registration of the same families is refused
    /// by the registry and logged, and that instance's values are then not
    /// exported.
    pub fn new(registry: &Registry) -> Self {
        // The names, help texts, labels and buckets are constants, valid by
        // construction; `metrics_are_exported_with_prefix` covers them.
        let counters = IntCounterVec::new(
            Opts::new("wasm_plugin_counter", "Counters defined by wasm plugins."),
            LABELS,
        )
        .expect("constant counter options are valid");
        let gauges = IntGaugeVec::new(
            Opts::new("wasm_plugin_gauge", "Gauges defined by wasm plugins."),
            LABELS,
        )
        .expect("constant gauge options are valid");
        let histograms = HistogramVec::new(
            HistogramOpts::new(
                "wasm_plugin_histogram",
                "Histograms defined by wasm plugins.",
            )
            .buckets(HISTOGRAM_BUCKETS.to_vec()),
            LABELS,
        )
        .expect("constant histogram options are valid");
        for (family, collector) in [
            (
                "counter",
                Box::new(counters.clone()) as Box<dyn prometheus::core::Collector>,
            ),
            ("gauge", Box::new(gauges.clone())),
            ("histogram", Box::new(histograms.clone())),
        ] {
            if let Err(error) = registry.register(collector) {
                tracing::warn!(%error, family, "plugin metric family not registered");
            }
        }
        Self {
            counters,
            gauges,
            histograms,
            table: RwLock::new(Table::default()),
        }
    }

    /// Defines (or finds) the metric `name` of `kind` for `plugin` and
    /// returns its id. Ids start at 1.
    pub fn define(&self, plugin: &str, kind: MetricKind, name: &str) -> Result<u32, MetricError> {
        check_name(name)?;
        let key = (plugin.to_owned(), kind, name.to_owned());
        if let Some(id) = self.read().ids.get(&key) {
            return Ok(*id);
        }
        let mut table = self.table.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(id) = table.ids.get(&key) {
            return Ok(*id);
        }
        let defined = table.per_plugin.get(plugin).copied().unwrap_or(0);
        if defined >= MAX_METRICS_PER_PLUGIN {
            return Err(MetricError::TooMany {
                plugin: plugin.to_owned(),
                limit: MAX_METRICS_PER_PLUGIN,
            });
        }
        let id = u32::try_from(table.handles.len() + 1).map_err(|_| MetricError::TooMany {
            plugin: plugin.to_owned(),
            limit: MAX_METRICS_PER_PLUGIN,
        })?;
        let labels = [plugin, name];
        let handle = match kind {
            MetricKind::Counter => Handle::Counter(self.counters.with_label_values(&labels)),
            MetricKind::Gauge => Handle::Gauge(self.gauges.with_label_values(&labels)),
            MetricKind::Histogram => Handle::Histogram(self.histograms.with_label_values(&labels)),
        };
        table.handles.push(handle);
        table.ids.insert(key, id);
        table.per_plugin.insert(plugin.to_owned(), defined + 1);
        Ok(id)
    }

    /// Adds `delta` to a counter (which refuses negative deltas) or a gauge.
    pub fn increment(&self, id: u32, delta: i64) -> Result<(), MetricError> {
        self.with_handle(id, |handle| match handle {
            Handle::Counter(counter) => {
                let delta = u64::try_from(delta).map_err(|_| {
                    MetricError::BadArgument(format!("counter {id} cannot decrease"))
                })?;
                counter.inc_by(delta);
                Ok(())
            }
            Handle::Gauge(gauge) => {
                gauge.add(delta);
                Ok(())
            }
            Handle::Histogram(_) => Err(MetricError::BadArgument(format!(
                "histogram {id} records values, it is not incremented"
            ))),
        })
    }

    /// Sets a gauge to `value` or records `value` in a histogram. Counters
    /// only increment.
    pub fn record(&self, id: u32, value: u64) -> Result<(), MetricError> {
        self.with_handle(id, |handle| match handle {
            Handle::Counter(_) => Err(MetricError::BadArgument(format!(
                "counter {id} is incremented, not recorded"
            ))),
            Handle::Gauge(gauge) => {
                let value = i64::try_from(value).map_err(|_| {
                    MetricError::BadArgument(format!("gauge value {value} is out of range"))
                })?;
                gauge.set(value);
                Ok(())
            }
            Handle::Histogram(histogram) => {
                // Precision loss above 2^53 is acceptable for a distribution.
                histogram.observe(value as f64);
                Ok(())
            }
        })
    }

    /// The value of a counter or gauge (a gauge below zero reads as 0).
    pub fn get(&self, id: u32) -> Result<u64, MetricError> {
        self.with_handle(id, |handle| match handle {
            Handle::Counter(counter) => Ok(counter.get()),
            Handle::Gauge(gauge) => Ok(u64::try_from(gauge.get()).unwrap_or(0)),
            Handle::Histogram(_) => Err(MetricError::Unsupported(id)),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        // Every table update is completed before the lock is released, so a
        // poisoned lock still guards a consistent table.
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `f` on the handle of metric `id`, under the table's read lock (a
    /// clone of the handle would cost two more atomic operations per update).
    fn with_handle<T>(
        &self,
        id: u32,
        f: impl FnOnce(&Handle) -> Result<T, MetricError>,
    ) -> Result<T, MetricError> {
        let index = usize::try_from(id)
            .ok()
            .and_then(|id| id.checked_sub(1))
            .ok_or(MetricError::NotFound(id))?;
        f(self
            .read()
            .handles
            .get(index)
            .ok_or(MetricError::NotFound(id))?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn registry() -> Registry {
        Registry::new_custom(Some("lacewing".into()), None).unwrap()
    }

    fn render(registry: &Registry) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        prometheus::TextEncoder::new()
            .encode(&registry.gather(), &mut out)
            .unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn metrics_are_exported_with_prefix() {
        let registry = registry();
        let metrics = PluginMetrics::new(&registry);
        let c = metrics
            .define("authz", MetricKind::Counter, "requests denied")
            .unwrap();
        let g = metrics
            .define("authz", MetricKind::Gauge, "cache.size")
            .unwrap();
        let h = metrics
            .define("authz", MetricKind::Histogram, "latency_ms")
            .unwrap();
        metrics.increment(c, 3).unwrap();
        metrics.record(g, 42).unwrap();
        metrics.record(h, 7).unwrap();
        let text = render(&registry);
        assert!(
            text.contains(
                r#"lacewing_wasm_plugin_counter{name="requests denied",plugin="authz"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"lacewing_wasm_plugin_gauge{name="cache.size",plugin="authz"} 42"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"lacewing_wasm_plugin_histogram_bucket{name="latency_ms",plugin="authz",le="10"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"lacewing_wasm_plugin_histogram_sum{name="latency_ms",plugin="authz"} 7"#
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE lacewing_wasm_plugin_counter counter"));
    }

    #[test]
    fn odd_names_are_escaped_label_values() {
        let registry = registry();
        let metrics = PluginMetrics::new(&registry);
        let id = metrics
            .define("p", MetricKind::Counter, "a\"b\\c\nd")
            .unwrap();
        metrics.increment(id, 1).unwrap();
        let text = render(&registry);
        assert!(
            text.contains(r#"lacewing_wasm_plugin_counter{name="a\"b\\c\nd",plugin="p"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn same_definition_same_id_across_threads() {
        let metrics = Arc::new(PluginMetrics::new(&registry()));
        let ids: Vec<u32> = (0..4)
            .map(|_| {
                let metrics = Arc::clone(&metrics);
                std::thread::spawn(move || metrics.define("p", MetricKind::Gauge, "g").unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect();
        assert!(ids.iter().all(|id| *id == ids[0]));
        assert_ne!(ids[0], 0);
        let other_kind = metrics.define("p", MetricKind::Counter, "g").unwrap();
        let other_plugin = metrics.define("q", MetricKind::Gauge, "g").unwrap();
        assert_ne!(other_kind, ids[0]);
        assert_ne!(other_plugin, ids[0]);
    }

    #[test]
    fn counter_rules() {
        let metrics = PluginMetrics::new(&registry());
        let c = metrics.define("p", MetricKind::Counter, "c").unwrap();
        metrics.increment(c, 5).unwrap();
        metrics.increment(c, 0).unwrap();
        assert!(matches!(
            metrics.increment(c, -1),
            Err(MetricError::BadArgument(_))
        ));
        assert!(matches!(
            metrics.record(c, 1),
            Err(MetricError::BadArgument(_))
        ));
        assert_eq!(metrics.get(c), Ok(5));
    }

    #[test]
    fn gauge_rules() {
        let metrics = PluginMetrics::new(&registry());
        let g = metrics.define("p", MetricKind::Gauge, "g").unwrap();
        metrics.record(g, 10).unwrap();
        metrics.increment(g, -3).unwrap();
        assert_eq!(metrics.get(g), Ok(7));
        metrics.increment(g, -10).unwrap();
        assert_eq!(metrics.get(g), Ok(0));
        assert!(matches!(
            metrics.record(g, u64::MAX),
            Err(MetricError::BadArgument(_))
        ));
    }

    #[test]
    fn histogram_rules() {
        let metrics = PluginMetrics::new(&registry());
        let h = metrics.define("p", MetricKind::Histogram, "h").unwrap();
        metrics.record(h, u64::MAX).unwrap();
        assert_eq!(metrics.get(h), Err(MetricError::Unsupported(h)));
        assert!(matches!(
            metrics.increment(h, 1),
            Err(MetricError::BadArgument(_))
        ));
    }

    #[test]
    fn unknown_ids_are_not_found() {
        let metrics = PluginMetrics::new(&registry());
        for id in [0, 1, u32::MAX] {
            assert_eq!(metrics.get(id), Err(MetricError::NotFound(id)));
            assert_eq!(metrics.increment(id, 1), Err(MetricError::NotFound(id)));
            assert_eq!(metrics.record(id, 1), Err(MetricError::NotFound(id)));
        }
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(metric_name(b"ok"), Ok("ok"));
        assert!(matches!(
            metric_name(b"\xff\xfe"),
            Err(MetricError::BadArgument(_))
        ));
        assert!(matches!(metric_name(b""), Err(MetricError::BadArgument(_))));
        let long = vec![b'a'; MAX_METRIC_NAME_BYTES + 1];
        assert!(matches!(
            metric_name(&long),
            Err(MetricError::BadArgument(_))
        ));
        let metrics = PluginMetrics::new(&registry());
        assert!(matches!(
            metrics.define("p", MetricKind::Counter, ""),
            Err(MetricError::BadArgument(_))
        ));
    }

    #[test]
    fn per_plugin_cap() {
        let metrics = PluginMetrics::new(&registry());
        for n in 0..MAX_METRICS_PER_PLUGIN {
            metrics
                .define("p", MetricKind::Counter, &format!("m{n}"))
                .unwrap();
        }
        assert!(matches!(
            metrics.define("p", MetricKind::Counter, "one more"),
            Err(MetricError::TooMany { .. })
        ));
        // Redefining an existing one and other plugins are unaffected.
        assert_eq!(metrics.define("p", MetricKind::Counter, "m0"), Ok(1));
        metrics.define("q", MetricKind::Counter, "m0").unwrap();
    }

    #[test]
    fn second_instance_on_one_registry_does_not_panic() {
        let registry = registry();
        let _first = PluginMetrics::new(&registry);
        let second = PluginMetrics::new(&registry);
        let id = second.define("p", MetricKind::Counter, "c").unwrap();
        second.increment(id, 1).unwrap();
    }

    #[test]
    fn kinds_map_from_wire_enum() {
        assert_eq!(MetricKind::from(MetricType::Counter), MetricKind::Counter);
        assert_eq!(MetricKind::from(MetricType::Gauge), MetricKind::Gauge);
        assert_eq!(
            MetricKind::from(MetricType::Histogram),
            MetricKind::Histogram
        );
    }
}
