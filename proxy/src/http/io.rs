//! A downstream socket wrapper that counts bytes and remembers when it last moved.

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Byte counts and last activity of one connection, read by its owner.
#[derive(Debug)]
pub struct IoStats {
    pub received: Cell<u64>,
    pub sent: Cell<u64>,
    pub last_activity: Cell<Instant>,
}

impl IoStats {
    pub fn new() -> Rc<Self> {
        Rc::new(Self {
            received: Cell::new(0),
            sent: Cell::new(0),
            last_activity: Cell::new(Instant::now()),
        })
    }
}

/// An I/O object that records traffic in [`IoStats`].
#[derive(Debug)]
pub struct CountingIo<T> {
    inner: T,
    stats: Rc<IoStats>,
}

impl<T> CountingIo<T> {
    pub fn new(inner: T, stats: Rc<IoStats>) -> Self {
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
            this.stats.received.set(this.stats.received.get() + n as u64);
            this.stats.last_activity.set(Instant::now());
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
            this.stats.sent.set(this.stats.sent.get() + n as u64);
            this.stats.last_activity.set(Instant::now());
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
            this.stats.sent.set(this.stats.sent.get() + n as u64);
            this.stats.last_activity.set(Instant::now());
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
