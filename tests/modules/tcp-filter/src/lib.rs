//! tcp-filter: a proxy-wasm network filter for the end-to-end tests.
//!
//! Built with the official `proxy-wasm` crate, unmodified. On every connection it
//! counts the bytes in each direction and reports through plugin metrics (the
//! only channel a TCP filter has that a test can read without touching the
//! bytes):
//!
//! | metric | meaning |
//! |---|---|
//! | `tcp_filter_connections_total` | `on_new_connection` calls |
//! | `tcp_filter_downstream_bytes_total` | bytes seen in `on_downstream_data` |
//! | `tcp_filter_upstream_bytes_total` | bytes seen in `on_upstream_data` |
//! | `tcp_filter_downstream_closed_total` / `tcp_filter_upstream_closed_total` | close events |
//! | `tcp_filter_logged_total` | `on_log` calls |
//! | `tcp_filter_source_address_ok_total` | connections whose `source.address` property read as `ip:port` |
//!
//! Magic downstream payloads: a chunk containing `WHOAMI` is replaced by
//! `source=<source.address>\n`; `REWRITE-ME` is replaced by `REWRITTEN!`;
//! `CLOSE-ME` closes the connection without forwarding the chunk. Upstream
//! chunks containing `UPSTREAM-REWRITE` are replaced by `UPSTREAM-REWRITTEN`.
//! In a chunk containing `IDENTITY?`, that word is replaced by one line
//! `<listener_name>: <property>=<value> ...` of the identity properties
//! ([`IDENTITY_PROPERTIES`], `-` when not found, booleans `true`/`false`)
//! followed by `IDENTITY?` again, so each proxy on the way adds its line.

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, RootContext, StreamContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MetricType, PeerType};

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(TcpRoot::default()) });
}}

/// Metric ids, defined once per plugin in `on_configure`.
#[derive(Debug, Default, Clone, Copy)]
struct Metrics {
    connections: u32,
    downstream_bytes: u32,
    upstream_bytes: u32,
    downstream_closed: u32,
    upstream_closed: u32,
    logged: u32,
    source_address_ok: u32,
}

impl Metrics {
    fn define() -> Self {
        let counter =
            |name| hostcalls::define_metric(MetricType::Counter, name).unwrap_or(u32::MAX);
        Self {
            connections: counter("tcp_filter_connections_total"),
            downstream_bytes: counter("tcp_filter_downstream_bytes_total"),
            upstream_bytes: counter("tcp_filter_upstream_bytes_total"),
            downstream_closed: counter("tcp_filter_downstream_closed_total"),
            upstream_closed: counter("tcp_filter_upstream_closed_total"),
            logged: counter("tcp_filter_logged_total"),
            source_address_ok: counter("tcp_filter_source_address_ok_total"),
        }
    }

    fn add(id: u32, delta: usize) {
        if let Err(status) = hostcalls::increment_metric(id, delta as i64) {
            log::warn!("tcp-filter: increment_metric failed: {status:?}");
        }
    }
}

#[derive(Default)]
struct TcpRoot {
    metrics: Metrics,
}

impl Context for TcpRoot {}

impl RootContext for TcpRoot {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        self.metrics = Metrics::define();
        true
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(TcpCounter {
            metrics: self.metrics,
            source_address: String::new(),
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::StreamContext)
    }
}

struct TcpCounter {
    metrics: Metrics,
    source_address: String,
}

impl Context for TcpCounter {}

/// The properties an `IDENTITY?` line reports, in order.
const IDENTITY_PROPERTIES: &[&str] = &[
    "source.principal",
    "connection.mtls",
    "connection.tls_version",
    "connection.uri_san_peer_certificate",
    "connection.uri_san_local_certificate",
    "upstream.tls_version",
    "upstream.uri_san_peer_certificate",
];

/// Properties read as one byte meaning a boolean.
const BOOLEAN_PROPERTIES: &[&str] = &["connection.mtls"];

impl TcpCounter {
    fn identity_line(&self) -> String {
        let name = self
            .get_property(vec!["listener_name"])
            .map(|v| String::from_utf8_lossy(&v).into_owned())
            .unwrap_or_default();
        let mut line = format!("{name}:");
        for property in IDENTITY_PROPERTIES {
            let value = match self.get_property(property.split('.').collect()) {
                None => "-".to_string(),
                Some(v) if BOOLEAN_PROPERTIES.contains(property) => {
                    (v.first() == Some(&1)).to_string()
                }
                Some(v) => String::from_utf8_lossy(&v).into_owned(),
            };
            line.push_str(&format!(" {property}={value}"));
        }
        line.push('\n');
        line
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl StreamContext for TcpCounter {
    fn on_new_connection(&mut self) -> Action {
        Metrics::add(self.metrics.connections, 1);
        if let Some(value) = self.get_property(vec!["source", "address"]) {
            self.source_address = String::from_utf8_lossy(&value).into_owned();
        }
        let looks_like_ip_port = self
            .source_address
            .rsplit_once(':')
            .is_some_and(|(ip, port)| !ip.is_empty() && port.parse::<u16>().is_ok());
        if looks_like_ip_port {
            Metrics::add(self.metrics.source_address_ok, 1);
        }
        Action::Continue
    }

    fn on_downstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        Metrics::add(self.metrics.downstream_bytes, data_size);
        let data = self.get_downstream_data(0, data_size).unwrap_or_default();
        if contains(&data, b"CLOSE-ME") {
            self.set_downstream_data(0, data_size, b"");
            self.close_downstream();
            return Action::Pause;
        }
        if contains(&data, b"IDENTITY?") {
            let text = String::from_utf8_lossy(&data).replacen(
                "IDENTITY?",
                &format!("{}IDENTITY?", self.identity_line()),
                1,
            );
            self.set_downstream_data(0, data_size, text.as_bytes());
        } else if contains(&data, b"WHOAMI") {
            let reply = format!("source={}\n", self.source_address);
            self.set_downstream_data(0, data_size, reply.as_bytes());
        } else if contains(&data, b"REWRITE-ME") {
            self.set_downstream_data(0, data_size, b"REWRITTEN!");
        }
        Action::Continue
    }

    fn on_downstream_close(&mut self, _peer_type: PeerType) {
        Metrics::add(self.metrics.downstream_closed, 1);
    }

    fn on_upstream_data(&mut self, data_size: usize, _end_of_stream: bool) -> Action {
        Metrics::add(self.metrics.upstream_bytes, data_size);
        let data = self.get_upstream_data(0, data_size).unwrap_or_default();
        if contains(&data, b"UPSTREAM-REWRITE") {
            self.set_upstream_data(0, data_size, b"UPSTREAM-REWRITTEN");
        }
        Action::Continue
    }

    fn on_upstream_close(&mut self, _peer_type: PeerType) {
        Metrics::add(self.metrics.upstream_closed, 1);
    }

    fn on_log(&mut self) {
        Metrics::add(self.metrics.logged, 1);
    }
}
