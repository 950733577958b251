//! Captures what a plugin logs (the host emits `proxy_log` as tracing events
//! with a `plugin` field) so tests can assert on it.

use std::sync::{Arc, Mutex, PoisonError};

use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// One line a plugin logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLine {
    /// `ERROR`, `WARN`, `INFO`, `DEBUG` or `TRACE`.
    pub level: Level,
    /// The plugin's name.
    pub plugin: String,
    /// The message as the plugin wrote it.
    pub message: String,
}

#[derive(Default)]
struct Fields {
    plugin: Option<String>,
    message: String,
}

impl Visit for Fields {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "plugin" {
            self.plugin = Some(value.to_string());
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => self.message = format!("{value:?}"),
            "plugin" => self.plugin = Some(format!("{value:?}").trim_matches('"').to_string()),
            _ => {}
        }
    }
}

/// A tracing layer keeping plugin log lines.
#[derive(Clone, Default)]
pub(crate) struct Capture(pub(crate) Arc<Mutex<Vec<LogLine>>>);

impl Capture {
    pub(crate) fn lines(&self) -> Vec<LogLine> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

impl<S: Subscriber> Layer<S> for Capture {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut fields = Fields::default();
        event.record(&mut fields);
        if let Some(plugin) = fields.plugin {
            self.0
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(LogLine {
                    level: *event.metadata().level(),
                    plugin,
                    message: fields.message,
                });
        }
    }
}
