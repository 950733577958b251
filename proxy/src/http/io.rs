//! A downstream socket wrapper that counts bytes and remembers when it last moved.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Byte counts and last activity of one connection, read by its owner.
///
/// Atomics because an upgraded connection may be moved by hyper; they are
/// only ever touched by one thread, so the adds stay uncontended.
#[derive(Debug)]
pub struct IoStats {
    received: AtomicU64,
    sent: AtomicU64,
    /// Nanoseconds after `opened` of the last byte moved.
    last_activity: AtomicU64,
    opened: Instant,
}

impl IoStats {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            last_activity: AtomicU64::new(0),
            opened: Instant::now(),
        })
    }

    /// Bytes read from the peer.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Bytes written to the peer.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Time since a byte last moved.
    pub fn idle_for(&self) -> Duration {
        let last = Duration::from_nanos(self.last_activity.load(Ordering::Relaxed));
        self.opened.elapsed().saturating_sub(last)
    }

    fn touch(&self) {
        let now = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.last_activity.store(now, Ordering::Relaxed);
    }

    fn add_received(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }

    fn add_sent(&self, n: usize) {
        self.sent.fetch_add(n as u64, Ordering::Relaxed);
        self.touch();
    }
}

/// An I/O object that records traffic in [`IoStats`].
#[derive(Debug)]
pub struct CountingIo<T> {
    inner: T,
    stats: Arc<IoStats>,
}

impl<T> CountingIo<T> {
    pub fn new(inner: T, stats: Arc<IoStats>) -> Self {
        Self { inner, stats }
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
        }
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountingIo<T> {
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

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
