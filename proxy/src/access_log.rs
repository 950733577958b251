//! JSON access log: one line per finished request or TCP connection.
//!
//! Worker threads never lock or block on the sink: a line is serialized on the
//! worker and handed to a [`LineQueue`] whose writer thread drains it into
//! the sink. When the queue is full the line is dropped and counted in
//! `lacewing_access_log_dropped_total{reason="queue_full"}`; a line the sink
//! fails to take is counted with `reason="write_error"`.

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use lacewing_config::AccessLogConfig;
use lacewing_core::line_queue::LineQueue;
use lacewing_core::metrics::Metrics;
use lacewing_core::stream::StreamInfo;
use prometheus::IntCounter;
use serde::Serialize;

/// Lines that may wait for the writer thread; beyond, new lines are dropped.
pub const QUEUE_LINES: usize = 8192;

/// Where log lines go; cloned into every listener.
#[derive(Clone)]
pub struct AccessLog {
    queue: LineQueue,
    full: IntCounter,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AccessLog")
    }
}

/// A kind of access log line; its `KIND` is written as the line's `kind` field.
pub trait LogLine: Serialize {
    const KIND: &'static str;
}

/// One HTTP exchange.
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

impl LogLine for Entry<'_> {
    const KIND: &'static str = "http";
}

/// One TCP connection.
#[derive(Debug, Serialize)]
pub struct TcpEntry<'a> {
    /// Start time, seconds since the Unix epoch.
    pub start_time: f64,
    pub listener: &'a str,
    pub downstream: String,
    pub cluster: &'a str,
    /// The endpoint connected to, or "-".
    pub upstream: String,
    /// Bytes read from downstream and forwarded upstream.
    pub bytes_received: u64,
    /// Bytes read from upstream and forwarded downstream.
    pub bytes_sent: u64,
    pub duration_ms: f64,
    /// Response flag (`UF` when no upstream connection could be made) or "-".
    pub flag: &'a str,
}

impl LogLine for TcpEntry<'_> {
    const KIND: &'static str = "tcp";
}

impl<'a> TcpEntry<'a> {
    /// The line of a finished connection: `bytes` is `(received, sent)`, or
    /// `None` when the connection ended with an error.
    pub fn new(info: &'a StreamInfo, bytes: Option<(u64, u64)>) -> Self {
        let flag = match (info.response_flag, bytes, info.upstream_address) {
            (Some(flag), _, _) => flag.code(),
            (None, None, None) => {
                lacewing_core::error::ResponseFlag::UpstreamConnectionFailure.code()
            }
            _ => "-",
        };
        let (bytes_received, bytes_sent) = bytes.unwrap_or_default();
        Self {
            start_time: epoch_seconds(info.start_time),
            listener: &info.listener_name,
            downstream: info.downstream_remote.to_string(),
            cluster: info.cluster_name.as_deref().unwrap_or("-"),
            upstream: info
                .upstream_address
                .as_ref()
                .map_or_else(|| "-".into(), SocketAddr::to_string),
            bytes_received,
            bytes_sent,
            duration_ms: info.start_instant.elapsed().as_secs_f64() * 1000.0,
            flag,
        }
    }
}

#[derive(Serialize)]
struct Tagged<'a, L> {
    kind: &'static str,
    #[serde(flatten)]
    line: &'a L,
}

impl AccessLog {
    /// Opens the configured sink (`stdout`, `stderr` or a file, appended) and
    /// starts its writer thread; dropped lines are counted on `metrics`.
    pub fn open(config: &AccessLogConfig, metrics: &Metrics) -> io::Result<Self> {
        let out: Box<dyn Write + Send> = match config.path.as_str() {
            "stdout" | "-" => Box::new(io::stdout()),
            "stderr" => Box::new(io::stderr()),
            path => Box::new(OpenOptions::new().create(true).append(true).open(path)?),
        };
        Self::with_sink(out, QUEUE_LINES, metrics)
    }

    /// An access log writing to `sink` through a queue of `queue_lines` lines.
    pub fn with_sink(
        sink: Box<dyn Write + Send>,
        queue_lines: usize,
        metrics: &Metrics,
    ) -> io::Result<Self> {
        let write_errors = metrics
            .access_log_dropped
            .with_label_values(&["write_error"]);
        let queue = LineQueue::spawn("access-log", sink, queue_lines, move |lines| {
            write_errors.inc_by(lines)
        })?;
        Ok(Self {
            queue,
            full: metrics
                .access_log_dropped
                .with_label_values(&["queue_full"]),
        })
    }

    /// Queues one line; never blocks. A full queue drops the line (counted),
    /// and logging never fails a request.
    pub fn write<L: LogLine>(&self, entry: &L) {
        let Ok(mut line) = serde_json::to_vec(&Tagged {
            kind: L::KIND,
            line: entry,
        }) else {
            return;
        };
        line.push(b'\n');
        // A gone writer thread (its sink panicked) is counted as a full queue.
        if self.queue.send(line).is_err() {
            self.full.inc();
        }
    }
}

/// Seconds since the Unix epoch of a wall-clock time.
pub fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Condvar, Mutex};
    use std::time::{Duration, Instant};

    use super::*;
    use lacewing_core::line_queue::{IDLE_POLLS, WRITER_POLL};

    #[derive(Default)]
    struct Gate {
        /// The writer thread is inside `write`.
        writing: bool,
        /// Writes may complete.
        open: bool,
        written: Vec<u8>,
    }

    /// A sink that holds every write until the test opens its gate, and
    /// keeps what it was given.
    #[derive(Clone, Default)]
    struct GatedSink {
        gate: Arc<(Mutex<Gate>, Condvar)>,
    }

    impl GatedSink {
        fn wait_until_writing(&self) {
            let (lock, cv) = &*self.gate;
            let _gate = cv
                .wait_while(lock.lock().unwrap(), |gate| !gate.writing)
                .unwrap();
        }

        fn open(&self) {
            let (lock, cv) = &*self.gate;
            lock.lock().unwrap().open = true;
            cv.notify_all();
        }

        fn written(&self) -> String {
            String::from_utf8(self.gate.0.lock().unwrap().written.clone()).unwrap()
        }
    }

    impl Write for GatedSink {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let (lock, cv) = &*self.gate;
            let mut gate = lock.lock().unwrap();
            gate.writing = true;
            cv.notify_all();
            let mut gate = cv.wait_while(gate, |gate| !gate.open).unwrap();
            gate.written.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn entry(path: &str) -> Entry<'_> {
        Entry {
            start_time: 0.0,
            listener: "main",
            downstream: "127.0.0.1:1".into(),
            protocol: "HTTP/1.1",
            method: "GET",
            authority: "a",
            path,
            status: 200,
            flag: "-",
            route: "r",
            cluster: "c",
            upstream: "-".into(),
            attempts: 1,
            duration_ms: 0.0,
            request_id: "-",
            user_agent: "-",
        }
    }

    fn dropped(metrics: &Metrics, reason: &str) -> u64 {
        metrics
            .access_log_dropped
            .with_label_values(&[reason])
            .get()
    }

    fn eventually(mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !check() {
            assert!(Instant::now() < deadline, "condition never held");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_stalled_sink_drops_and_counts_lines_beyond_the_queue_never_blocking() {
        let metrics = Metrics::new();
        let sink = GatedSink::default();
        let log = AccessLog::with_sink(Box::new(sink.clone()), 4, &metrics).unwrap();
        // The writer thread takes the first line and stalls in the sink.
        log.write(&entry("/0"));
        sink.wait_until_writing();
        // Four more fill the queue; the next three find it full and return at once.
        for i in 1..8 {
            log.write(&entry(&format!("/{i}")));
        }
        assert_eq!(dropped(&metrics, "queue_full"), 3);
        sink.open();
        drop(log);
        eventually(|| sink.written().lines().count() == 5);
        let paths: Vec<String> = sink
            .written()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["path"].to_string())
            .collect();
        assert_eq!(paths, ["\"/0\"", "\"/1\"", "\"/2\"", "\"/3\"", "\"/4\""]);
        assert_eq!(dropped(&metrics, "write_error"), 0);
    }

    #[test]
    fn a_line_after_the_writer_went_idle_is_written() {
        let metrics = Metrics::new();
        let sink = GatedSink::default();
        sink.open();
        let log = AccessLog::with_sink(Box::new(sink.clone()), 16, &metrics).unwrap();
        log.write(&entry("/before"));
        eventually(|| sink.written().lines().count() == 1);
        // Long enough for the writer to stop polling and block for the next line.
        std::thread::sleep(WRITER_POLL * (IDLE_POLLS + 10));
        log.write(&entry("/after"));
        eventually(|| sink.written().lines().count() == 2);
        drop(log);
    }

    #[test]
    fn lines_carry_their_kind() {
        let metrics = Metrics::new();
        let sink = GatedSink::default();
        sink.open();
        let log = AccessLog::with_sink(Box::new(sink.clone()), 16, &metrics).unwrap();
        log.write(&entry("/x"));
        let info = StreamInfo::new(
            7,
            "127.0.0.1:1000".parse().unwrap(),
            "127.0.0.1:2000".parse().unwrap(),
            "raw".into(),
        );
        log.write(&TcpEntry::new(&info, None));
        eventually(|| sink.written().lines().count() == 2);
        let lines: Vec<serde_json::Value> = sink
            .written()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["kind"], "http");
        assert_eq!(lines[0]["path"], "/x");
        assert_eq!(lines[1]["kind"], "tcp");
        assert_eq!(lines[1]["listener"], "raw");
        assert_eq!(lines[1]["downstream"], "127.0.0.1:1000");
        assert_eq!(lines[1]["upstream"], "-");
        assert_eq!(lines[1]["flag"], "UF");
    }

    struct FailingSink;

    impl Write for FailingSink {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::Error::other("disk full"))
        }

        fn flush(&mut self) -> io::Result<()> {
            Err(io::Error::other("disk full"))
        }
    }

    #[test]
    fn a_failing_sink_counts_its_lost_lines() {
        let metrics = Metrics::new();
        let log = AccessLog::with_sink(Box::new(FailingSink), 16, &metrics).unwrap();
        for _ in 0..3 {
            log.write(&entry("/"));
        }
        eventually(|| dropped(&metrics, "write_error") == 3);
    }
}
