//! What a sidecar exports about its control-plane state, added to the
//! proxy's own registry so they appear on its admin `/metrics`.

use prometheus::{IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct AgentMetrics {
    /// The mesh version being served (0: none yet).
    pub version: IntGauge,
    /// Unix time (seconds) of the last snapshot put into service.
    pub last_update: IntGauge,
    /// 1 while the stream to the control plane is up.
    pub connected: IntGauge,
    /// Snapshots by result (`ack`, `nack`).
    pub snapshots: IntCounterVec,
}

impl std::fmt::Debug for AgentMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AgentMetrics")
    }
}

impl AgentMetrics {
    /// Creates the metrics and registers them in `registry`; the proxy's
    /// registry prefixes them `lacewing_` (`lacewing_sidecar_snapshot_version`).
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            version: IntGauge::new(
                "sidecar_snapshot_version",
                "The mesh version this sidecar serves (0: none yet).",
            )?,
            last_update: IntGauge::new(
                "sidecar_snapshot_last_update_seconds",
                "Unix time of the last snapshot put into service.",
            )?,
            connected: IntGauge::new(
                "sidecar_control_connected",
                "1 while the stream to the control plane is up.",
            )?,
            snapshots: IntCounterVec::new(
                Opts::new(
                    "sidecar_snapshots_total",
                    "Snapshots received, by result (ack, nack).",
                ),
                &["result"],
            )?,
        };
        registry.register(Box::new(metrics.version.clone()))?;
        registry.register(Box::new(metrics.last_update.clone()))?;
        registry.register(Box::new(metrics.connected.clone()))?;
        registry.register(Box::new(metrics.snapshots.clone()))?;
        Ok(metrics)
    }
}
