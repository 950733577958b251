//! JSON access log: one line per finished request or connection.

use std::fs::OpenOptions;
use std::io::{self, LineWriter, Write};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use lacewing_config::AccessLogConfig;
use serde::Serialize;

/// Where log lines go; cloned into every listener.
#[derive(Clone)]
pub struct AccessLog {
    sink: Arc<Mutex<LineWriter<Box<dyn Write + Send>>>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessLog")
    }
}

/// One access log entry.
#[derive(Debug, Serialize)]
pub struct Entry<'a> {
    /// Start time, seconds since the Unix epoch.
    pub start_time: f64,
    pub listener: &'a str,
    pub downstream: String,
    pub protocol: &'a str,
    pub method: &'a str,
    pub authority: &'a str,
    pub path: &'a str,
    pub status: u16,
    /// Response flag (UF, UT, NR, LR, ...) or "-".
    pub flag: &'a str,
    pub route: &'a str,
    pub cluster: &'a str,
    pub upstream: String,
    pub attempts: u32,
    pub duration_ms: f64,
    pub request_id: &'a str,
    pub user_agent: &'a str,
}

impl AccessLog {
    /// Opens the configured sink (`stdout`, `stderr` or a file, appended).
    pub fn open(config: &AccessLogConfig) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match config.path.as_str() {
            "stdout" | "-" => Box::new(io::stdout()),
            "stderr" => Box::new(io::stderr()),
            path => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
        };
        Ok(Self {
            sink: Arc::new(Mutex::new(LineWriter::new(out))),
        })
    }

    /// Writes one entry; a failing sink is ignored (logging never fails a request).
    pub fn write(&self, entry: &Entry<'_>) {
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        if let Ok(mut sink) = self.sink.lock() {
            let _ = sink.write_all(&line);
        }
    }
}

/// Seconds since the Unix epoch of a wall-clock time.
pub fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}
