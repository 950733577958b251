//! The control plane's Prometheus metrics, served at `/metrics` on the gRPC port.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Push latency buckets in seconds (send → ACK), 100µs to 10s.
const PUSH_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Clone)]
pub struct ControlMetrics {
    pub registry: Registry,
    /// Sidecars with an open stream.
    pub connected: IntGauge,
    /// The store's version.
    pub version: IntGauge,
    /// Snapshots sent.
    pub pushes: IntCounter,
    /// Answers by result (`ack`, `nack`) and NACK code.
    pub answers: IntCounterVec,
    /// Time from sending a snapshot to its ACK.
    pub push_latency: Histogram,
    /// Applies by result (`stored`, `unchanged`, `refused`).
    pub applies: IntCounterVec,
    /// Certificate requests by result (`issued`, `refused`).
    pub certificates: IntCounterVec,
    /// Modules sent to sidecars (each asks only for those its cache lacks).
    pub module_downloads: IntCounter,
    /// TLS handshakes on the API port by outcome (`ok` or why not).
    pub tls_handshakes: IntCounterVec,
    /// Calls refused for their credential, by role (`operator`,
    /// `bootstrap`, `join`, `workload`) and reason (`missing`, `wrong`,
    /// `disabled`, `unknown`, `expired`, `replayed`, `wrong_service`,
    /// `not_for_modules`).
    pub token_refusals: IntCounterVec,
    /// Sidecar streams admitted, by credential (`certificate`, `join`, `shared`).
    pub registrations: IntCounterVec,
    /// Roots in the trust bundle (two while the root rotates).
    pub roots: IntGauge,
    /// Root rotations completed (the old root left the bundle).
    pub root_rotations: IntCounter,
}

impl std::fmt::Debug for ControlMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlMetrics")
    }
}

impl ControlMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let connected = IntGauge::new(
            "lacewing_control_sidecars_connected",
            "Sidecars with an open stream.",
        )
        .expect("valid metric");
        let version = IntGauge::new("lacewing_control_mesh_version", "The store's version.")
            .expect("valid metric");
        let pushes = IntCounter::new(
            "lacewing_control_pushes_total",
            "Snapshots sent to sidecars.",
        )
        .expect("valid metric");
        let answers = IntCounterVec::new(
            Opts::new(
                "lacewing_control_answers_total",
                "Sidecar answers to snapshots, by result (ack, nack) and NACK code.",
            ),
            &["result", "code"],
        )
        .expect("valid metric");
        let push_latency = Histogram::with_opts(
            HistogramOpts::new(
                "lacewing_control_push_latency_seconds",
                "Time from sending a snapshot to its ACK.",
            )
            .buckets(PUSH_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let applies = IntCounterVec::new(
            Opts::new(
                "lacewing_control_applies_total",
                "Applies by result (stored, unchanged, refused).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let certificates = IntCounterVec::new(
            Opts::new(
                "lacewing_control_certificates_total",
                "Workload certificate requests by result (issued, refused).",
            ),
            &["result"],
        )
        .expect("valid metric");
        let module_downloads = IntCounter::new(
            "lacewing_control_module_downloads_total",
            "Modules sent to sidecars.",
        )
        .expect("valid metric");
        let tls_handshakes = IntCounterVec::new(
            Opts::new(
                "lacewing_control_tls_handshakes_total",
                "TLS handshakes on the API port by outcome (ok, plaintext_refused, timeout, closed, overloaded, or the TLS failure reason).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let token_refusals = IntCounterVec::new(
            Opts::new(
                "lacewing_control_token_refusals_total",
                "Calls refused for their credential, by role (operator, bootstrap, join, workload) and reason (missing, wrong, disabled, unknown, expired, replayed, wrong_service, not_for_modules).",
            ),
            &["role", "reason"],
        )
        .expect("valid metric");
        let registrations = IntCounterVec::new(
            Opts::new(
                "lacewing_control_registrations_total",
                "Sidecar streams admitted, by credential (certificate, join, shared).",
            ),
            &["credential"],
        )
        .expect("valid metric");
        let roots = IntGauge::new(
            "lacewing_control_trust_bundle_roots",
            "Roots in the mesh trust bundle (two while the root rotates).",
        )
        .expect("valid metric");
        let root_rotations = IntCounter::new(
            "lacewing_control_root_rotations_total",
            "Mesh root rotations completed since start (the old root left the bundle).",
        )
        .expect("valid metric");
        for c in [
            Box::new(connected.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(version.clone()),
            Box::new(pushes.clone()),
            Box::new(answers.clone()),
            Box::new(push_latency.clone()),
            Box::new(applies.clone()),
            Box::new(certificates.clone()),
            Box::new(module_downloads.clone()),
            Box::new(tls_handshakes.clone()),
            Box::new(token_refusals.clone()),
            Box::new(registrations.clone()),
            Box::new(roots.clone()),
            Box::new(root_rotations.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            connected,
            version,
            pushes,
            answers,
            push_latency,
            applies,
            certificates,
            module_downloads,
            roots,
            root_rotations,
            tls_handshakes,
            token_refusals,
            registrations,
        }
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        use prometheus::Encoder;
        let mut out = Vec::new();
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for ControlMetrics {
    fn default() -> Self {
        Self::new()
    }
}
