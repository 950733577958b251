//! The host's own metrics about plugins: traps, deadlines, VM restarts,
//! callbacks run and (sampled) callback durations.

use std::sync::OnceLock;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, Opts, Registry,
};

use crate::vm::Callback;

/// Metric families of the wasm host, registered once on the proxy registry.
#[derive(Clone)]
pub(crate) struct HostMetrics {
    traps: IntCounterVec,
    deadlines: IntCounterVec,
    restarts: IntCounterVec,
    calls: IntCounterVec,
    durations: HistogramVec,
}

/// One callback in this many (per plugin and callback) has its duration
/// recorded; every callback is counted. Two clock reads and a histogram
/// update cost about 110 to 130 instructions a callback (callgrind: one
/// header-echo filter, seven callbacks a request, 55.9k to 55.1k
/// instructions a request when sampled); the sample keeps the mean.
pub(crate) const TIMED_ONE_IN: u64 = 8;

/// Buckets of callback durations: 10µs to 1s.
const CALLBACK_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 1.0,
];

impl HostMetrics {
    /// Creates the families and registers them (names get the registry's `lacewing_` prefix).
    /// When they are registered already (a second host on the same registry), the
    /// families still count but are not exported twice.
    pub fn new(registry: &Registry) -> Self {
        let counter = |name: &str, help: &str| {
            IntCounterVec::new(Opts::new(name, help), &["plugin"]).expect("valid metric definition")
        };
        let m = Self {
            traps: counter("wasm_traps_total", "Plugin callbacks that trapped."),
            deadlines: counter(
                "wasm_deadline_exceeded_total",
                "Plugin callbacks stopped at their CPU deadline.",
            ),
            restarts: counter(
                "wasm_vm_restarts_total",
                "Plugin VMs recreated after a failure.",
            ),
            calls: IntCounterVec::new(
                Opts::new("wasm_callbacks_total", "Plugin callbacks run."),
                &["plugin", "callback"],
            )
            .expect("valid metric definition"),
            durations: HistogramVec::new(
                HistogramOpts::new(
                    "wasm_callback_duration_seconds",
                    format!(
                        "Time spent in one plugin callback; one callback in {TIMED_ONE_IN} is timed."
                    ),
                )
                .buckets(CALLBACK_BUCKETS.to_vec()),
                &["plugin", "callback"],
            )
            .expect("valid metric definition"),
        };
        for c in [&m.traps, &m.deadlines, &m.restarts] {
            if let Err(e) = registry.register(Box::new(c.clone())) {
                tracing::warn!("wasm host metric not exported: {e}");
            }
        }
        if let Err(e) = registry.register(Box::new(m.calls.clone())) {
            tracing::warn!("wasm host metric not exported: {e}");
        }
        if let Err(e) = registry.register(Box::new(m.durations.clone())) {
            tracing::warn!("wasm host metric not exported: {e}");
        }
        // One process-wide counter, exported by every registry that hosts plugins.
        let dropped = crate::plugin_log::DROPPED.clone();
        if let Err(e) = registry.register(Box::new(dropped))
            && !matches!(e, prometheus::Error::AlreadyReg)
        {
            tracing::warn!("wasm host metric not exported: {e}");
        }
        m
    }

    /// The children of one plugin, resolved once so recording is an atomic add.
    pub fn for_plugin(&self, plugin: &str) -> PluginHostMetrics {
        PluginHostMetrics {
            traps: self.traps.with_label_values(&[plugin]),
            deadlines: self.deadlines.with_label_values(&[plugin]),
            restarts: self.restarts.with_label_values(&[plugin]),
            calls_family: self.calls.clone(),
            durations_family: self.durations.clone(),
            plugin: plugin.to_string(),
            calls: Callback::ALL.iter().map(|_| OnceLock::new()).collect(),
            durations: Callback::ALL.iter().map(|_| OnceLock::new()).collect(),
        }
    }
}

/// One plugin's resolved metric children.
pub(crate) struct PluginHostMetrics {
    pub traps: IntCounter,
    pub deadlines: IntCounter,
    pub restarts: IntCounter,
    calls_family: IntCounterVec,
    durations_family: HistogramVec,
    plugin: String,
    /// Indexed by `Callback as usize`; resolved on first use so callbacks a
    /// module never exports add no series.
    calls: Vec<OnceLock<IntCounter>>,
    durations: Vec<OnceLock<Histogram>>,
}

impl PluginHostMetrics {
    /// Counts one run of `callback`; the histogram its duration goes to when
    /// this run is one of those timed (the first, then one in
    /// [`TIMED_ONE_IN`]).
    pub fn callback_started(&self, callback: Callback) -> Option<&Histogram> {
        let index = callback as usize;
        let calls = self.calls.get(index)?.get_or_init(|| {
            self.calls_family
                .with_label_values(&[self.plugin.as_str(), callback.name()])
        });
        calls.inc();
        // Workers of one plugin may race between the two: a sample more or
        // less, never a lost count.
        if calls.get() % TIMED_ONE_IN != 1 {
            return None;
        }
        Some(self.durations.get(index)?.get_or_init(|| {
            self.durations_family
                .with_label_values(&[self.plugin.as_str(), callback.name()])
        }))
    }
}
