//! The root context: VM start, plugin configuration, metrics, queues and the tick timer.

use std::rc::Rc;
use std::time::Duration;

use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{ContextType, MetricType};

use crate::http::ConformanceHttp;

/// Queue that requests enqueue to and `on_queue_ready` drains.
pub const QUEUE_NAME: &str = "conformance-queue";
/// Queue that is registered but never written to.
pub const IDLE_QUEUE_NAME: &str = "conformance-idle-queue";
/// Shared-data key the tick timer counts into.
pub const TICKS_KEY: &str = "conformance-ticks";
/// Shared-data key holding the last item `on_queue_ready` dequeued.
pub const QUEUE_LAST_KEY: &str = "conformance-queue-last";
/// Shared-data key counting the items `on_queue_ready` dequeued.
pub const QUEUE_COUNT_KEY: &str = "conformance-queue-count";

/// Everything a request context needs from its plugin.
#[derive(Debug, Default)]
pub struct Settings {
    /// `tag=` from the plugin configuration: this plugin's name in the chain.
    pub tag: String,
    /// The plugin configuration bytes, as text.
    pub plugin_configuration: String,
    /// The VM configuration bytes, as text.
    pub vm_configuration: String,
    pub counter_id: u32,
    pub gauge_id: u32,
    pub histogram_id: u32,
    pub idle_queue_id: u32,
    /// The id of [`QUEUE_NAME`], which `on_queue_ready` drains.
    pub queue_id: u32,
}

#[derive(Default)]
pub struct ConformanceRoot {
    vm_configuration: String,
    settings: Rc<Settings>,
}

impl Context for ConformanceRoot {}

/// Makes bytes printable as an HTTP header value.
pub fn header_safe(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Reads a shared-data counter and adds one, retrying on CAS mismatch.
pub fn increment_shared_counter(key: &str) -> Result<u64, String> {
    for _ in 0..100 {
        let (value, cas) = hostcalls::get_shared_data(key).map_err(|s| format!("{s:?}"))?;
        let current = value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        let next = current + 1;
        match hostcalls::set_shared_data(key, Some(next.to_string().as_bytes()), cas) {
            Ok(()) => return Ok(next),
            Err(proxy_wasm::types::Status::CasMismatch) => continue,
            Err(status) => return Err(format!("{status:?}")),
        }
    }
    Err("CasMismatch".into())
}

/// A stream context whose `on_done` returned false, to be finished from the root
/// context with `proxy_set_effective_context` + `proxy_done`.
pub struct DeferredDone {
    pub context_id: u32,
    pub tag: String,
}

impl DeferredDone {
    const PREFIX: &'static str = "deferred-done:";

    /// The queue item that asks the root context to finish the stream.
    pub fn item(&self) -> String {
        format!("{}{}:{}", Self::PREFIX, self.context_id, self.tag)
    }

    fn parse(item: &[u8]) -> Option<Self> {
        let text = std::str::from_utf8(item).ok()?.strip_prefix(Self::PREFIX)?;
        let (id, tag) = text.split_once(':')?;
        Some(Self {
            context_id: id.parse().ok()?,
            tag: tag.to_string(),
        })
    }

    /// Switches to the stream's context and calls `proxy_done`; records both
    /// statuses in shared key `conformance-deferred-done-<tag>`.
    fn finish(&self) {
        let effective = match hostcalls::set_effective_context(self.context_id) {
            Ok(()) => "Ok".to_string(),
            Err(status) => crate::raw::status_name(status as u32),
        };
        let done = crate::raw::status_name(crate::raw::done());
        let key = format!("conformance-deferred-done-{}", self.tag);
        let value = format!("{effective},{done}");
        let _ = hostcalls::set_shared_data(&key, Some(value.as_bytes()), None);
    }
}

impl RootContext for ConformanceRoot {
    fn on_vm_start(&mut self, _vm_configuration_size: usize) -> bool {
        if let Some(bytes) = self.get_vm_configuration() {
            self.vm_configuration = header_safe(&bytes);
        }
        log::info!("conformance-filter: VM started");
        true
    }

    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let configuration = self
            .get_plugin_configuration()
            .map(|bytes| header_safe(&bytes))
            .unwrap_or_default();
        let mut tag = String::new();
        let mut tick_ms = 0u64;
        for word in configuration
            .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
            .map(|w| w.trim_matches(|c| c == '"' || c == '{' || c == '}'))
            .filter(|w| !w.is_empty())
        {
            match word.split_once('=') {
                Some(("tag", value)) => tag = value.to_string(),
                Some(("tick_ms", value)) => tick_ms = value.parse().unwrap_or(0),
                _ if word == "fail_configure" => {
                    log::error!("conformance-filter: configured to refuse its configuration");
                    return false;
                }
                _ if word == "trap_configure" => core::arch::wasm32::unreachable(),
                _ => {}
            }
        }
        if tick_ms > 0 {
            self.set_tick_period(Duration::from_millis(tick_ms));
        }
        let queue_id = hostcalls::register_shared_queue(QUEUE_NAME).unwrap_or_else(|status| {
            log::warn!("conformance-filter: cannot register {QUEUE_NAME}: {status:?}");
            u32::MAX
        });
        let idle_queue_id = hostcalls::register_shared_queue(IDLE_QUEUE_NAME).unwrap_or(0);
        let metric = |kind, name| hostcalls::define_metric(kind, name).unwrap_or(u32::MAX);
        self.settings = Rc::new(Settings {
            tag,
            plugin_configuration: configuration,
            vm_configuration: self.vm_configuration.clone(),
            counter_id: metric(MetricType::Counter, "conformance_requests_total"),
            gauge_id: metric(MetricType::Gauge, "conformance_gauge"),
            histogram_id: metric(MetricType::Histogram, "conformance_sample"),
            idle_queue_id,
            queue_id,
        });
        true
    }

    fn on_tick(&mut self) {
        crate::pause::on_tick();
        if let Err(status) = increment_shared_counter(TICKS_KEY) {
            log::warn!("conformance-filter: tick count failed: {status}");
        }
    }

    fn on_queue_ready(&mut self, queue_id: u32) {
        while let Ok(Some(item)) = hostcalls::dequeue_shared_queue(queue_id) {
            if crate::pause::on_queue_item(&item) {
                continue;
            }
            if let Some(request) = DeferredDone::parse(&item) {
                request.finish();
                continue;
            }
            let _ = hostcalls::set_shared_data(QUEUE_LAST_KEY, Some(&item), None);
            let _ = increment_shared_counter(QUEUE_COUNT_KEY);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        if let Some(mode) = crate::pause::mode(&self.settings.plugin_configuration) {
            return Some(Box::new(crate::pause::PauseHttp::new(
                context_id,
                mode,
                self.settings.queue_id,
            )));
        }
        Some(Box::new(ConformanceHttp::new(
            context_id,
            self.settings.clone(),
        )))
    }

    fn create_stream_context(&self, _context_id: u32) -> Option<Box<dyn StreamContext>> {
        crate::pause::mode(&self.settings.plugin_configuration)
            .map(|mode| Box::new(crate::pause::PauseTcp::new(mode)) as Box<dyn StreamContext>)
    }

    fn get_type(&self) -> Option<ContextType> {
        match crate::pause::mode(&self.settings.plugin_configuration) {
            Some(mode) if crate::pause::is_network(&mode) => Some(ContextType::StreamContext),
            _ => Some(ContextType::HttpContext),
        }
    }
}
