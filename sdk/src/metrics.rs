//! Metric handles over `proxy_define_metric`. The host exports them on its
//! `/metrics` (Lacewing: `lacewing_wasm_plugin_{counter,gauge,histogram}`
//! labelled by plugin and name). Define handles in `configure` and keep them.
//!
//! ```no_run
//! use lacewing_sdk::metrics::Counter;
//! let denied = Counter::define("authz_denied")?;
//! denied.inc()?;
//! # Ok::<(), lacewing_sdk::HostError>(())
//! ```

use lacewing_abi::MetricType;

use crate::error::Result;
use crate::hostcalls;

/// A counter: only goes up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counter(u32);

impl Counter {
    /// Defines the counter `name` (the same name gives the same counter).
    pub fn define(name: &str) -> Result<Self> {
        hostcalls::define_metric(MetricType::Counter, name).map(Self)
    }
    /// Adds one.
    pub fn inc(&self) -> Result<()> {
        self.add(1)
    }
    /// Adds `n`.
    pub fn add(&self, n: u64) -> Result<()> {
        hostcalls::increment_metric(self.0, i64::try_from(n).unwrap_or(i64::MAX))
    }
    /// The current value.
    pub fn value(&self) -> Result<u64> {
        hostcalls::metric(self.0)
    }
}

/// A gauge: goes up and down, or is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gauge(u32);

impl Gauge {
    /// Defines the gauge `name`.
    pub fn define(name: &str) -> Result<Self> {
        hostcalls::define_metric(MetricType::Gauge, name).map(Self)
    }
    /// Adds `delta` (negative to decrease).
    pub fn add(&self, delta: i64) -> Result<()> {
        hostcalls::increment_metric(self.0, delta)
    }
    /// Sets the value.
    pub fn set(&self, value: u64) -> Result<()> {
        hostcalls::record_metric(self.0, value)
    }
    /// The current value.
    pub fn value(&self) -> Result<u64> {
        hostcalls::metric(self.0)
    }
}

/// A histogram: a distribution of recorded values (in units the filter chooses).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Histogram(u32);

impl Histogram {
    /// Defines the histogram `name`.
    pub fn define(name: &str) -> Result<Self> {
        hostcalls::define_metric(MetricType::Histogram, name).map(Self)
    }
    /// Records one value.
    pub fn record(&self, value: u64) -> Result<()> {
        hostcalls::record_metric(self.0, value)
    }
}

/// Metrics named at run time (`requests.source.<principal>`), each defined
/// on first use and kept. A name the host refuses is remembered as refused.
///
/// ```no_run
/// use lacewing_sdk::metrics::{Counter, Family};
/// let denied: Family<Counter> = Family::default();
/// denied.with("denied.source.web", |c| c.inc());
/// ```
#[derive(Debug)]
pub struct Family<M> {
    handles: std::cell::RefCell<std::collections::HashMap<String, Option<M>>>,
}

impl<M> Default for Family<M> {
    fn default() -> Self {
        Self {
            handles: std::cell::RefCell::new(std::collections::HashMap::new()),
        }
    }
}

/// A metric kind a [`Family`] can define.
pub trait Define: Copy + Sized {
    /// Defines (or finds) the metric `name`.
    fn define(name: &str) -> Result<Self>;
}

impl Define for Counter {
    fn define(name: &str) -> Result<Self> {
        Counter::define(name)
    }
}

impl Define for Gauge {
    fn define(name: &str) -> Result<Self> {
        Gauge::define(name)
    }
}

impl Define for Histogram {
    fn define(name: &str) -> Result<Self> {
        Histogram::define(name)
    }
}

impl<M: Define> Family<M> {
    /// Runs `f` on the metric `name`, defining it first if needed; the
    /// result of `f` (or of defining) is dropped, as metrics must not fail requests.
    pub fn with(&self, name: &str, f: impl FnOnce(M) -> Result<()>) {
        let handle = {
            let mut handles = self.handles.borrow_mut();
            match handles.get(name) {
                Some(h) => *h,
                None => *handles
                    .entry(name.to_string())
                    .or_insert(M::define(name).ok()),
            }
        };
        if let Some(m) = handle {
            let _ = f(m);
        }
    }
}
