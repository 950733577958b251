//! Raw TCP proxying: each accepted connection is spliced to an endpoint of
//! the listener's cluster, through the listener's network filters if any.

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::BytesMut;
use lacewing_core::drain::DrainWatch;
use lacewing_core::filter::{FilterStatus, NetworkFilter, PeerType};
use lacewing_core::stream::{ConnectionStream, SharedConnection, StreamInfo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::access_log::TcpEntry;
use crate::snapshot::TcpListenerState;

const READ_CHUNK: usize = 16 * 1024;

/// Serves one accepted TCP connection.
pub async fn serve(
    mut downstream: TcpStream,
    remote: SocketAddr,
    local: SocketAddr,
    id: u64,
    slot: Arc<ArcSwap<TcpListenerState>>,
    mut drain: DrainWatch,
) {
    let state = slot.load_full();
    state.stats.connections_total.inc();
    state.stats.connections_active.inc();
    let _ = downstream.set_nodelay(true);
    let info = StreamInfo::new(id, remote, local, state.stats.name.clone());
    let conn = ConnectionStream::new(info).shared();
    let mut filters: Vec<Box<dyn NetworkFilter>> = state
        .filters
        .iter()
        .filter_map(|f| f.create(&conn))
        .collect();

    let result = async {
        for f in filters.iter_mut() {
            f.on_new_connection(&conn);
        }
        if conn.borrow().close {
            return Ok((0, 0));
        }
        let (mut upstream, endpoint) = state
            .cluster
            .connect_tcp()
            .await
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let _ = upstream.set_nodelay(true);
        conn.borrow_mut().info.upstream_address = Some(endpoint);
        conn.borrow_mut().info.cluster_name = Some(state.cluster.name().into());
        if filters.is_empty() {
            tokio::select! {
                r = tokio::io::copy_bidirectional(&mut downstream, &mut upstream) => r,
                _ = drain.signaled() => Ok((0, 0)),
            }
        } else {
            splice_filtered(&mut downstream, &mut upstream, &conn, &mut filters).await
        }
    }
    .await;
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
    for f in filters.iter_mut() {
        f.on_log(&conn);
    }
    if let Some(log) = &state.access_log {
        log.write(&TcpEntry::new(&conn.borrow().info, bytes));
    }
    drop(filters);
    state.stats.connections_active.dec();
}

/// Copies both directions, passing every chunk through the filters.
async fn splice_filtered(
    downstream: &mut TcpStream,
    upstream: &mut TcpStream,
    conn: &SharedConnection,
    filters: &mut [Box<dyn NetworkFilter>],
) -> std::io::Result<(u64, u64)> {
    let mut down_buf = BytesMut::with_capacity(READ_CHUNK);
    let mut up_buf = BytesMut::with_capacity(READ_CHUNK);
    let (mut down_open, mut up_open) = (true, true);
    let (mut sent_up, mut sent_down) = (0u64, 0u64);
    while down_open || up_open {
        tokio::select! {
            r = downstream.read_buf(&mut down_buf), if down_open => {
                let n = r?;
                let eos = n == 0;
                conn.borrow_mut().downstream_data.extend_from_slice(&down_buf.split());
                let forward = run(filters, conn, |f, c| f.on_downstream_data(c, eos));
                if conn.borrow().close { break; }
                if forward || eos {
                    let data = conn.borrow_mut().downstream_data.split();
                    sent_up += data.len() as u64;
                    upstream.write_all(&data).await?;
                }
                if eos {
                    down_open = false;
                    for f in filters.iter_mut() { f.on_downstream_close(conn, PeerType::Remote); }
                    let _ = upstream.shutdown().await;
                }
            }
            r = upstream.read_buf(&mut up_buf), if up_open => {
                let n = r?;
                let eos = n == 0;
                conn.borrow_mut().upstream_data.extend_from_slice(&up_buf.split());
                let forward = run(filters, conn, |f, c| f.on_upstream_data(c, eos));
                if conn.borrow().close { break; }
                if forward || eos {
                    let data = conn.borrow_mut().upstream_data.split();
                    sent_down += data.len() as u64;
                    downstream.write_all(&data).await?;
                }
                if eos {
                    up_open = false;
                    for f in filters.iter_mut() { f.on_upstream_close(conn, PeerType::Remote); }
                    let _ = downstream.shutdown().await;
                }
            }
        }
    }
    Ok((sent_up, sent_down))
}

fn run(
    filters: &mut [Box<dyn NetworkFilter>],
    conn: &SharedConnection,
    call: impl Fn(&mut dyn NetworkFilter, &SharedConnection) -> FilterStatus,
) -> bool {
    for f in filters.iter_mut() {
        if call(f.as_mut(), conn) != FilterStatus::Continue {
            return false;
        }
    }
    true
}
