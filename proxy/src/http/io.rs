//! A downstream socket wrapper that counts the bytes moved, for metrics and
//! idle detection, follows a client's HTTP/2 header blocks for their timer
//! (no clock reads on the I/O path), and closes lingering: when the server
//! shuts the connection down it reads and discards what the client still
//! sends, for a bounded time and amount, so a client still writing a request
//! the proxy answered early (413, 400) reads the answer instead of a reset.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::h2_watch::FrameWatch;

/// Longest a shut-down connection reads what the client still sends.
pub const LINGER_TIME: Duration = Duration::from_secs(1);
/// Most bytes a shut-down connection reads and discards: as much as a
/// filter may buffer by default (`max_buffered_body`), so a client whose
/// body was refused at that limit can finish sending it and read the answer.
pub const LINGER_BYTES: usize = 1024 * 1024;

/// [`IoStats::header_blocks`] once the connection is known not to be HTTP/2.
pub const NOT_H2: u64 = u64::MAX;

/// Byte counts of one connection, read by its owner.
///
/// Atomics because an upgraded connection may be moved by hyper; they are
/// only ever touched by one thread, so the adds stay uncontended.
#[derive(Debug, Default)]
pub struct IoStats {
    received: AtomicU64,
    sent: AtomicU64,
    /// The client's HTTP/2 header blocks ([`FrameWatch::view`]), or [`NOT_H2`].
    header_blocks: AtomicU64,
}

impl IoStats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Bytes read from the peer.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes written to the peer.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// The client's HTTP/2 header blocks: opened so far, twice, plus one
    /// while one is open; [`NOT_H2`] for a connection that is not HTTP/2.
    pub fn header_blocks(&self) -> u64 {
        self.header_blocks.load(Ordering::Relaxed)
    }

    /// Bytes moved either way; unchanged between two looks means idle in between.
    pub fn moved(&self) -> u64 {
        self.received() + self.sent()
    }

    fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
    }

    fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// An I/O object that records traffic in [`IoStats`].
#[derive(Debug)]
pub struct CountingIo<T> {
    inner: T,
    stats: Arc<IoStats>,
    watch: FrameWatch,
    /// Set once the write side is shut down: the lingering read's deadline
    /// and the bytes it discarded (allocated then, only then).
    linger: Option<(Pin<Box<tokio::time::Sleep>>, usize)>,
}

impl<T> CountingIo<T> {
    pub fn new(inner: T, stats: Arc<IoStats>) -> Self {
        Self {
            inner,
            stats,
            watch: FrameWatch::default(),
            linger: None,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountingIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let res = Pin::new(&mut this.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        if n > 0 {
            this.stats.add_received(n);
            if this.watch.is_on() {
                let changed = this.watch.feed(&buf.filled()[before..]);
                if !this.watch.is_on() {
                    this.stats.header_blocks.store(NOT_H2, Ordering::Relaxed);
                } else if changed {
                    let view = this.watch.view();
                    this.stats.header_blocks.store(view, Ordering::Relaxed);
                }
            }
        }
        res
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = res {
            this.stats.add_sent(n);
        }
        res
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let res = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = res {
            this.stats.add_sent(n);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    /// Shuts the write side down (the client sees the end of the stream),
    /// then reads until the client closes too, [`LINGER_BYTES`] were read or
    /// [`LINGER_TIME`] passed: closing with unread bytes would make the
    /// kernel send a reset, which can destroy the answer before the client
    /// reads it.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.linger.is_none() {
            ready!(Pin::new(&mut this.inner).poll_shutdown(cx))?;
            this.linger = Some((Box::pin(tokio::time::sleep(LINGER_TIME)), 0));
        }
        let Some((deadline, drained)) = this.linger.as_mut() else {
            return Poll::Ready(Ok(()));
        };
        let mut scratch = [0u8; 4096];
        while *drained < LINGER_BYTES {
            if deadline.as_mut().poll(cx).is_ready() {
                break;
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut this.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => *drained += buf.filled().len(),
                // The client closed too, or the connection broke: done.
                Poll::Ready(_) => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    #[tokio::test]
    async fn shutdown_reads_what_the_client_still_sends_up_to_the_bound() {
        let (client, server) = tokio::io::duplex(4096);
        let mut io = CountingIo::new(server, IoStats::new());
        let (mut client_read, mut client_write) = tokio::io::split(client);
        // A client still sending a large request body, and never closing.
        let writer = tokio::spawn(async move {
            let chunk = [b'x'; 1024];
            let mut written = 0usize;
            while client_write.write_all(&chunk).await.is_ok() {
                written += chunk.len();
            }
            written
        });
        io.shutdown().await.unwrap();
        // The client saw the end of the stream, and its writes were read
        // until the bound.
        let mut rest = Vec::new();
        client_read.read_to_end(&mut rest).await.unwrap();
        assert!(rest.is_empty());
        let (_, drained) = io.linger.as_ref().unwrap();
        assert_eq!(*drained, LINGER_BYTES);
        drop(io);
        assert!(writer.await.unwrap() >= LINGER_BYTES);
    }

    #[tokio::test]
    async fn shutdown_ends_when_the_client_closes_too() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut io = CountingIo::new(server, IoStats::new());
        client.write_all(b"the rest of a body").await.unwrap();
        client.shutdown().await.unwrap();
        io.shutdown().await.unwrap();
        let (_, drained) = io.linger.as_ref().unwrap();
        assert_eq!(*drained, 18);
    }
}
