//! Serving one downstream HTTP connection: HTTP/1.1 or h2c (prior knowledge),
//! with limits, timeouts and graceful drain. The connection may be any byte
//! stream ([`serve_io`]), so a TLS stream is served the same way as a socket.
//!
//! Each connection makes up to six periodic looks, all on one timer-wheel
//! entry armed for the earliest and re-armed when it fires (nothing per
//! request): the first request's head (from accept, covering HTTP/1.1 heads
//! and the HTTP/2 preface, SETTINGS and first HEADERS), later HTTP/1.1 heads
//! (a wake-up for hyper's head deadline, [`HeadTimer`]), HTTP/2 header blocks
//! (a HEADERS frame and its CONTINUATION frames left open), write progress
//! (response data waiting and the client taking none, on the whole connection
//! or on one HTTP/2 stream), idleness, and, when configured, the connection's
//! age.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use lacewing_core::ResponseFlag;
use lacewing_core::drain::DrainWatch;
use lacewing_core::stream::TlsFacts;
use lacewing_core::timer::{ArmedSleep, RequestDeadlines};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::head_timer::{self, HeadTimer};
use super::io::{CountingIo, IoStats, NOT_H2};
use super::progress::{self, ConnProgress};
use super::proxy::{ConnContext, handle};
use crate::snapshot::HttpSlot;

/// Runs hyper's HTTP/2 stream tasks on the worker thread, each watched by
/// its connection's write timer.
#[derive(Debug, Clone)]
struct LocalExec(Rc<ConnContext>);

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: std::future::Future + 'static,
{
    fn execute(&self, fut: F) {
        progress::spawn_stream(&self.0, fut);
    }
}

/// Serves one accepted TCP connection until it closes, idles out or drains.
pub async fn serve(
    stream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    id: u64,
    slot: HttpSlot,
    drain: DrainWatch,
) {
    let _ = stream.set_nodelay(true);
    serve_io(stream, remote, local, id, slot, drain, None).await;
}

/// Serves one connection over any byte stream (a socket, a TLS stream, an
/// in-memory pipe) until it closes, idles out or drains. `Send` because an
/// upgraded connection (`CONNECT`, WebSocket) may be handed to another task.
/// `tls` is what the handshake of a TLS connection established.
pub async fn serve_io<I>(
    stream: I,
    remote: SocketAddr,
    local: SocketAddr,
    id: u64,
    slot: HttpSlot,
    mut drain: DrainWatch,
    tls: Option<Arc<TlsFacts>>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
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
        progress: ConnProgress::default(),
        tls,
        deadlines: RequestDeadlines::default(),
    });
    let service = {
        let ctx = ctx.clone();
        service_fn(move |req| handle(req, ctx.clone()))
    };

    let mut builder = auto::Builder::new(LocalExec(ctx.clone()));
    builder
        .http1()
        // Deadlines only, seen when `head` below wakes the connection.
        .timer(HeadTimer)
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
    let buffer = h2_buffers(limits);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_request_headers.0).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams)
        .initial_connection_window_size(buffer.window)
        .initial_stream_window_size(buffer.window)
        .max_send_buf_size(buffer.send_per_stream);
    let conn = builder.serve_connection_with_upgrades(io, service);
    tokio::pin!(conn);

    // Idle detection: a connection that moved no byte, or had no exchange,
    // over a whole `idle_timeout` window is asked to close (so idle for
    // between one and two windows).
    let idle_timeout = limits.idle_timeout.0.max(Duration::from_millis(10));
    let mut moved_at_last_look = io_stats.moved();
    let mut exchanges_at_last_look = ctx.progress.exchange_view();
    let max_age = limits.max_connection_duration.map(|d| d.0);
    let mut draining = false;
    // HTTP/2 header blocks: the same block open at two looks one
    // `header_read_timeout` apart closes the connection (hyper and h2 time
    // no HEADERS or CONTINUATION frame).
    let header_timeout = limits.header_read_timeout.0;
    let mut block_at_last_look = 0;
    // Write progress: response data waiting on the client at two looks one
    // `write_timeout` apart, and none taken in between, closes the connection.
    let write_timeout = limits.write_timeout.0.max(Duration::from_millis(10));
    let mut write_at_last_look = (0, 0);
    // HTTP/1 request heads after the first: hyper's `header_read_timeout`
    // timer is a bare deadline ([`HeadTimer`]), seen when this look wakes
    // the connection.
    let head_period = head_timer::look_period(header_timeout);
    let started = Instant::now();
    let mut looks = Looks {
        // The first request head must come within `header_read_timeout` of
        // accept: hyper's own HTTP/1.1 timer starts only once the protocol
        // is known, and HTTP/2 has none.
        first_head: Some(started + header_timeout),
        header_blocks: Some(started + header_timeout),
        head: Some(started + head_period),
        write: started + write_timeout,
        aged: max_age.map(|age| started + age),
        idle: started + idle_timeout,
    };
    // One timer for all the looks: every wake-up of the connection polls it,
    // so one entry instead of five saves about 0.6k instructions a request
    // (timer polls and waker registrations, callgrind), and `ArmedSleep`
    // answers those polls with one atomic load (about 0.2k more).
    let mut look = ArmedSleep::until(looks.next());
    // A plaintext connection watches for generations that forbid it (its
    // listener turned STRICT) and is then closed as a drain closes it.
    // Pinned once: a future made per loop turn would join and leave the
    // watch's waiter list (two lock round trips) on every wake-up.
    let forbidden = forbids_plaintext(ctx.tls.is_none().then(|| slot.clone()));
    tokio::pin!(forbidden);
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
            () = &mut forbidden, if !draining => {
                tracing::info!(%remote, "plaintext connection closed: its listener is now TLS only (STRICT)");
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            () = look.fired() => {
                let now = Instant::now();
                if Looks::due(&mut looks.first_head, now) && !ctx.progress.has_request() {
                    tracing::debug!(%remote, "no request head within header_read_timeout; closing");
                    break;
                }
                if Looks::due(&mut looks.header_blocks, now) {
                    let blocks = io_stats.header_blocks();
                    if blocks != NOT_H2 {
                        if blocks & 1 == 1 && blocks == block_at_last_look {
                            tracing::debug!(%remote, "an HTTP/2 header block stayed open for header_read_timeout; closing");
                            break;
                        }
                        block_at_last_look = blocks;
                        looks.header_blocks = Some(now + header_timeout);
                    }
                }
                if looks.write <= now {
                    let (waiting, sent) = ctx.progress.write_view();
                    let (waited, sent_before) = write_at_last_look;
                    if waiting > 0 && waited > 0 && sent == sent_before {
                        tracing::debug!(%remote, "the client took no response data within write_timeout; closing");
                        ctx.progress.cut(ResponseFlag::StreamIdleTimeout);
                        break;
                    }
                    write_at_last_look = (waiting, sent);
                    // One HTTP/2 stream the client stalls while others move.
                    let cut = ctx.progress.cut_stalled_streams();
                    if cut > 0 {
                        tracing::debug!(%remote, cut, "HTTP/2 streams whose data the client took none of within write_timeout were reset");
                    }
                    looks.write = now + write_timeout;
                }
                if Looks::due(&mut looks.head, now) {
                    // Waking the task is the point: the loop polls `conn`
                    // next, and hyper its head deadline. HTTP/2 has no such
                    // timer (its header blocks are looked at above).
                    if io_stats.header_blocks() == NOT_H2 || !ctx.progress.has_request() {
                        looks.head = Some(now + head_period);
                    }
                }
                if Looks::due(&mut looks.aged, now) && !draining {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
                if looks.idle <= now {
                    // Idle: no byte moved, or (bytes such as pings did move
                    // but) no exchange was open at either look nor started
                    // in between.
                    let moved = io_stats.moved();
                    let exchanges = ctx.progress.exchange_view();
                    let no_exchange = exchanges.0 == exchanges_at_last_look.0
                        && exchanges.1 == 0
                        && exchanges_at_last_look.1 == 0;
                    if moved == moved_at_last_look || no_exchange {
                        if draining {
                            // Still idle a window after being asked to close
                            // (an HTTP/2 client that never acknowledges the
                            // shutdown's PING): close it outright.
                            break;
                        }
                        draining = true;
                        conn.as_mut().graceful_shutdown();
                    }
                    moved_at_last_look = moved;
                    exchanges_at_last_look = exchanges;
                    looks.idle = now + idle_timeout;
                }
                look.reset(looks.next());
            }
        }
    }
    stats.connections_active.dec();
    stats.bytes_received.inc_by(io_stats.received());
    stats.bytes_sent.inc_by(io_stats.sent());
}

/// When each of a connection's periodic looks is next due; `None` for a
/// look that is over (the first head came, the connection is not HTTP/2, the
/// age limit was reached) or not configured.
struct Looks {
    first_head: Option<Instant>,
    header_blocks: Option<Instant>,
    /// HTTP/1: the next wake-up for hyper's head deadline ([`HeadTimer`]).
    head: Option<Instant>,
    write: Instant,
    aged: Option<Instant>,
    idle: Instant,
}

impl Looks {
    /// The earliest look due: what the connection's one timer is set to.
    fn next(&self) -> Instant {
        [self.first_head, self.header_blocks, self.head, self.aged]
            .into_iter()
            .flatten()
            .fold(self.write.min(self.idle), Instant::min)
    }

    /// Whether the one-off look `at` is due by `now`; a due look is over.
    fn due(at: &mut Option<Instant>, now: Instant) -> bool {
        let due = at.is_some_and(|at| at <= now);
        if due {
            *at = None;
        }
        due
    }
}

/// Completes when a new generation makes the listener of `slot` (a
/// plaintext connection's) TLS only; never for `None` (a TLS connection).
async fn forbids_plaintext(slot: Option<HttpSlot>) {
    match slot {
        Some(slot) => slot.turns_tls_only().await,
        None => std::future::pending().await,
    }
}

/// How an HTTP/2 connection's `max_connection_buffer` is spent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct H2Buffers {
    /// The connection's receive window, and each stream's: request body
    /// bytes the client may send ahead of the proxy.
    window: u32,
    /// Response bytes queued per stream (hyper's send buffer).
    send_per_stream: usize,
}

/// The least queued per stream: one frame of the default size.
const MIN_SEND_PER_STREAM: usize = 16 * 1024;

fn h2_buffers(limits: &lacewing_config::ListenerLimits) -> H2Buffers {
    let cap = limits.max_connection_buffer.0.clamp(
        lacewing_config::MIN_CONNECTION_BUFFER,
        lacewing_config::MAX_CONNECTION_BUFFER,
    );
    let streams = u64::from(limits.max_concurrent_streams.max(1));
    H2Buffers {
        window: u32::try_from(cap).unwrap_or(u32::MAX),
        send_per_stream: usize::try_from(cap / streams)
            .unwrap_or(usize::MAX)
            .max(MIN_SEND_PER_STREAM),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::convert::Infallible;

    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty, Full};
    use lacewing_core::metrics::Metrics;
    use lacewing_wasm::{HostOptions, LogLevel, WasmHost};

    use super::*;
    use crate::snapshot::{HttpListenerState, Snapshot};

    /// An upstream on 127.0.0.1:0 answering every request with its path.
    pub(crate) async fn upstream() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::task::spawn_local(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let service = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                    let body = format!("upstream saw {}", req.uri().path());
                    Ok::<_, Infallible>(hyper::Response::new(Full::new(Bytes::from(body))))
                });
                tokio::task::spawn_local(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service),
                );
            }
        });
        addr
    }

    /// The state of listener `main` routing everything to `upstream`.
    pub(crate) fn listener_state(
        upstream: SocketAddr,
        metrics: &Metrics,
    ) -> Arc<HttpListenerState> {
        let yaml = format!(
            "admin: {{ address: null }}
listeners:
  - name: main
    address: 127.0.0.1:0
    routes: [{{ name: all, cluster: backend }}]
clusters:
  - {{ name: backend, endpoints: ['{upstream}'] }}
"
        );
        let config = lacewing_config::from_yaml_str(&yaml, "test.yaml").unwrap();
        let wasm = WasmHost::new(HostOptions {
            cache_dir: None,
            metrics: metrics.clone(),
            log_level: LogLevel::Info,
        })
        .unwrap();
        let callouts =
            lacewing_upstream::Upstreams::build(&config.clusters, metrics, None, None, None)
                .unwrap();
        let snapshot =
            Snapshot::build(Arc::new(config), metrics, &wasm, None, callouts, None, None).unwrap();
        snapshot.http["main"].clone()
    }

    #[test]
    fn the_one_timer_is_set_to_the_earliest_look_and_a_due_one_off_look_ends() {
        let start = Instant::now();
        let secs = |n: u64| start + Duration::from_secs(n);
        let mut looks = Looks {
            first_head: Some(secs(3)),
            header_blocks: None,
            head: Some(secs(6)),
            write: secs(5),
            aged: Some(secs(2)),
            idle: secs(4),
        };
        assert_eq!(looks.next(), secs(2));
        assert!(!Looks::due(&mut looks.first_head, secs(2)));
        assert!(Looks::due(&mut looks.aged, secs(2)));
        assert_eq!(looks.aged, None);
        assert_eq!(looks.next(), secs(3));
        assert!(Looks::due(&mut looks.first_head, secs(4)));
        assert!(
            !Looks::due(&mut looks.first_head, secs(5)),
            "a one-off look is due once"
        );
        assert_eq!(looks.next(), secs(4));
        looks.idle = secs(9);
        assert_eq!(looks.next(), secs(5));
    }

    #[test]
    fn the_connection_buffer_is_the_window_and_is_shared_by_the_streams() {
        let mut limits = lacewing_config::ListenerLimits::default();
        assert_eq!(
            h2_buffers(&limits),
            H2Buffers {
                window: 1 << 20,
                send_per_stream: MIN_SEND_PER_STREAM,
            }
        );
        limits.max_connection_buffer = lacewing_config::units::Size(8 << 20);
        limits.max_concurrent_streams = 16;
        assert_eq!(
            h2_buffers(&limits),
            H2Buffers {
                window: 8 << 20,
                send_per_stream: 512 << 10,
            }
        );
    }

    #[test]
    fn serves_a_connection_that_is_not_a_socket() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, async {
            let state = listener_state(upstream().await, &Metrics::new());
            let slot = HttpSlot::fixed(state);
            // An in-memory pipe stands where a TLS stream would.
            let (client_end, proxy_end) = tokio::io::duplex(64 * 1024);
            let (_trigger, drain) = lacewing_core::drain::channel();
            let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
            let local: SocketAddr = "127.0.0.1:8080".parse().unwrap();
            tokio::task::spawn_local(serve_io(proxy_end, peer, local, 1, slot, drain, None));

            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(client_end))
                    .await
                    .unwrap();
            tokio::task::spawn_local(connection);
            for path in ["/first", "/second"] {
                let request = hyper::Request::get(path)
                    .header("host", "example")
                    .body(Empty::<Bytes>::new())
                    .unwrap();
                let response = sender.send_request(request).await.unwrap();
                assert_eq!(response.status(), 200);
                let body = response.into_body().collect().await.unwrap().to_bytes();
                assert_eq!(body, format!("upstream saw {path}"));
            }
        });
    }
}
