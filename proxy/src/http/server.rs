//! Serving one downstream HTTP connection: HTTP/1.1 or h2c (prior knowledge),
//! with limits, timeouts and graceful drain.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use lacewing_core::drain::DrainWatch;
use tokio::net::TcpStream;

use super::io::{CountingIo, IoStats};
use super::proxy::{ConnContext, handle};
use crate::snapshot::HttpListenerState;

/// Runs hyper's HTTP/2 stream tasks on the worker thread.
#[derive(Debug, Clone, Copy)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: std::future::Future + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// Serves one accepted connection until it closes, idles out or drains.
pub async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    id: u64,
    slot: Arc<ArcSwap<HttpListenerState>>,
    mut drain: DrainWatch,
) {
    let _ = stream.set_nodelay(true);
    let state = slot.load_full();
    let limits = &state.config.limits;
    let stats = &state.stats;
    stats.connections_total.inc();
    stats.connections_active.inc();
    let io_stats = IoStats::new();
    let io = TokioIo::new(CountingIo::new(stream, io_stats.clone()));
    let ctx = Rc::new(ConnContext {
        id,
        remote,
        local,
        slot: slot.clone(),
    });
    let service = service_fn(move |req| handle(req, ctx.clone()));

    let mut builder = auto::Builder::new(LocalExec);
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout.0)
        // Validation keeps the limit at or above hyper's smallest read buffer;
        // the `max` only keeps a configuration built in code from panicking.
        .max_buf_size(
            limits
                .max_request_headers
                .as_usize()
                .max(lacewing_config::MIN_REQUEST_HEADERS as usize),
        )
        .max_headers(limits.max_header_count)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_request_headers.0).unwrap_or(u32::MAX))
        .max_concurrent_streams(1024);
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);

    // Idle detection: a connection that moved no byte over a whole
    // `idle_timeout` window is asked to close (so idle for between one and two windows).
    let idle_timeout = limits.idle_timeout.0.max(Duration::from_millis(10));
    let mut moved_at_last_look = io_stats.moved();
    let mut draining = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!(error = %e, %remote, "downstream connection ended with an error");
                }
                break;
            }
            _ = drain.signaled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tokio::time::sleep(idle_timeout), if !draining => {
                let moved = io_stats.moved();
                if moved == moved_at_last_look {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                moved_at_last_look = moved;
            }
        }
    }
    stats.connections_active.dec();
    stats.bytes_received.inc_by(io_stats.received());
    stats.bytes_sent.inc_by(io_stats.sent());
}
