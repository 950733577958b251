//! Raw TCP proxying: each accepted connection is spliced to an endpoint of
//! the listener's cluster, through the listener's network filters if any
//! (see [`crate::chain::network`] for how they pause and resume). A listener
//! with `tls` first completes the downstream handshake as HTTP listeners do
//! ([`crate::http::tls::accept`]); a cluster with `tls` hands over a mutual
//! TLS stream to its endpoint. A plaintext connection is closed (both sides
//! at once, as a drain closes it) when a new generation makes its listener
//! TLS only (STRICT).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::BytesMut;
use lacewing_core::drain::DrainWatch;
use lacewing_core::filter::PeerType;
use lacewing_core::stream::TlsFacts;
use lacewing_core::stream::{ConnectionStream, SharedConnection, StreamInfo};
use lacewing_upstream::Conn;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::access_log::TcpEntry;
use crate::chain::NetworkChain;
use crate::chain::network::Flow;
use crate::http::tls::{Accepted, accept};
use crate::snapshot::{ListenerRef, TcpListenerState};

const READ_CHUNK: usize = 16 * 1024;

/// Serves one accepted TCP connection of `listener`: through the listener's
/// TLS first when it has any.
pub async fn serve(
    downstream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    id: u64,
    state: Arc<TcpListenerState>,
    listener: ListenerRef,
    drain: DrainWatch,
) {
    let Some(tls) = state.tls.clone() else {
        let _ = downstream.set_nodelay(true);
        let ended = ended(drain, remote, Some(listener));
        return splice(downstream, remote, local, id, state, ended, None).await;
    };
    match accept(downstream, &tls, remote).await {
        None => {}
        Some(Accepted::Plain(stream)) => {
            let ended = ended(drain, remote, Some(listener));
            splice(stream, remote, local, id, state, ended, None).await;
        }
        Some(Accepted::Tls(stream, facts)) => {
            let ended = ended(drain, remote, None);
            splice(*stream, remote, local, id, state, ended, Some(facts)).await;
        }
    }
}

/// Completes when the connection must end before its sides do: the proxy
/// drains, or (for a plaintext connection, whose `listener` is given) a
/// generation makes its listener TLS only. Polled to completion once.
async fn ended(mut drain: DrainWatch, remote: SocketAddr, plaintext_on: Option<ListenerRef>) {
    let forbidden = async {
        match &plaintext_on {
            Some(listener) => listener.turns_tls_only().await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = drain.signaled() => {}
        () = forbidden => {
            tracing::info!(%remote, "plaintext connection closed: its listener is now TLS only (STRICT)");
        }
    }
}

/// Splices one connection (a socket or a TLS stream; `tls` is what its
/// handshake established) to the cluster, until both sides end or `ended`
/// completes.
async fn splice<S>(
    mut downstream: S,
    remote: SocketAddr,
    local: SocketAddr,
    id: u64,
    state: Arc<TcpListenerState>,
    ended: impl Future<Output = ()>,
    tls: Option<Arc<TlsFacts>>,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    tokio::pin!(ended);
    state.stats.connections_total.inc();
    state.stats.connections_active.inc();
    // The connection's facts exist only when filters or the access log read them.
    let conn = (!state.filters.is_empty() || state.access_log.is_some()).then(|| {
        let mut info = StreamInfo::new(id, remote, local, state.stats.name.clone());
        info.tls = tls;
        ConnectionStream::new(info).shared()
    });
    let result = match conn.as_ref() {
        Some(conn) if !state.filters.is_empty() => {
            let mut chain = NetworkChain::new(&state.filters, conn.clone());
            // The filters log and end when the chain drops, after the splice.
            Splice {
                state: &state,
                conn,
                chain: &mut chain,
            }
            .run(&mut downstream, ended.as_mut())
            .await
        }
        _ => {
            async {
                let mut upstream = connect(&state, conn.as_ref()).await?;
                tokio::select! {
                    r = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => r,
                    () = &mut ended => Ok((0, 0)),
                }
            }
            .await
        }
    };
    let bytes = result.as_ref().ok().copied();
    match result {
        Ok((up, down)) => {
            state.stats.bytes_received.inc_by(up);
            state.stats.bytes_sent.inc_by(down);
        }
        Err(e) => {
            tracing::debug!(error = %e, %remote, listener = %state.stats.name, "tcp connection failed")
        }
    }
    if let (Some(log), Some(conn)) = (&state.access_log, &conn) {
        log.write(&TcpEntry::new(&conn.borrow().info, bytes));
    }
    state.stats.connections_active.dec();
}

/// Connects to an endpoint of the listener's cluster.
async fn connect(
    state: &TcpListenerState,
    conn: Option<&SharedConnection>,
) -> std::io::Result<Conn> {
    let (upstream, endpoint, info) = state
        .cluster
        .connect_tcp()
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    if let Some(conn) = conn {
        let mut c = conn.borrow_mut();
        c.info.upstream_address = Some(endpoint);
        c.info.upstream_connection = Some(info);
        c.info.cluster_name = Some(state.cluster.name().into());
    }
    Ok(upstream)
}

/// One filtered connection being spliced.
struct Splice<'a> {
    state: &'a TcpListenerState,
    conn: &'a SharedConnection,
    chain: &'a mut NetworkChain,
}

/// One direction's progress.
#[derive(Default)]
struct Side {
    /// The source has ended (end of stream seen by the filters).
    ended: bool,
    /// The end has been passed on (the other side shut down for writing).
    shut: bool,
    /// Bytes passed on.
    sent: u64,
}

impl Splice<'_> {
    /// Copies both directions, every chunk through the filters, holding what
    /// they hold, until both sides end, a filter closes the connection or
    /// `ended` completes.
    async fn run<S>(
        self,
        downstream: &mut S,
        mut ended: Pin<&mut impl Future<Output = ()>>,
    ) -> std::io::Result<(u64, u64)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Self { state, conn, chain } = self;
        let resumed = conn.borrow().resumed();
        let mut upstream = if chain.new_connection() && !chain.closing() {
            Some(connect(state, Some(conn)).await?)
        } else {
            None
        };
        let mut down_buf = BytesMut::with_capacity(READ_CHUNK);
        let mut up_buf = BytesMut::with_capacity(READ_CHUNK);
        let (mut down, mut up) = (Side::default(), Side::default());
        loop {
            if chain.closing() {
                break;
            }
            if let Some(u) = upstream.as_mut() {
                flush(conn, chain, Flow::Downstream, &mut down, u).await?;
                flush(conn, chain, Flow::Upstream, &mut up, downstream).await?;
            }
            if down.shut && up.shut {
                break;
            }
            let waiting = chain.holding() || chain.waiting_to_connect();
            if upstream.is_none() && down.ended && !waiting {
                // The client left before the connection went on.
                break;
            }
            tokio::select! {
                biased;
                () = &mut ended => break,
                () = resumed.notified(), if waiting => {
                    if chain.closing() {
                        break;
                    }
                    let (connect_now, _, _) = chain.resume([down.ended, up.ended]);
                    if connect_now && upstream.is_none() {
                        upstream = Some(connect(state, Some(conn)).await?);
                    }
                }
                r = downstream.read_buf(&mut down_buf), if !down.ended => {
                    let eos = r? == 0;
                    down.ended = eos;
                    conn.borrow_mut().downstream_data.extend_from_slice(&down_buf.split());
                    let forward = chain.data(Flow::Downstream, eos);
                    if eos {
                        chain.closed(Flow::Downstream, PeerType::Remote);
                    }
                    if forward && upstream.is_none() && !chain.closing() {
                        upstream = Some(connect(state, Some(conn)).await?);
                    }
                }
                r = read_upstream(upstream.as_mut(), &mut up_buf), if upstream.is_some() && !up.ended => {
                    let eos = r? == 0;
                    up.ended = eos;
                    conn.borrow_mut().upstream_data.extend_from_slice(&up_buf.split());
                    chain.data(Flow::Upstream, eos);
                    if eos {
                        chain.closed(Flow::Upstream, PeerType::Remote);
                    }
                }
            }
        }
        Ok((down.sent, up.sent))
    }
}

async fn read_upstream(upstream: Option<&mut Conn>, buf: &mut BytesMut) -> std::io::Result<usize> {
    match upstream {
        Some(u) => u.read_buf(buf).await,
        None => std::future::pending().await,
    }
}

/// Writes the bytes of `flow` the filters let go of to `to`, and passes the
/// end on once nothing of it is held.
async fn flush(
    conn: &SharedConnection,
    chain: &NetworkChain,
    flow: Flow,
    side: &mut Side,
    to: &mut (impl AsyncWrite + Unpin),
) -> std::io::Result<()> {
    if chain.holds(flow) {
        return Ok(());
    }
    let data = {
        let mut c = conn.borrow_mut();
        match flow {
            Flow::Downstream => c.downstream_data.split(),
            Flow::Upstream => c.upstream_data.split(),
        }
    };
    if !data.is_empty() {
        side.sent += data.len() as u64;
        to.write_all(&data).await?;
    }
    if side.ended && !side.shut {
        side.shut = true;
        let _ = to.shutdown().await;
    }
    Ok(())
}
