//! [`TlsStream`]: an established rustls session over a tokio TCP socket, the
//! stream every mesh connection reads and writes once its handshake is done.
//!
//! The handshake itself is tokio-rustls' (`TlsConnector`, `TlsAcceptor`);
//! its result is taken apart with [`TlsStream::from_client`] or
//! [`TlsStream::from_server`]. What this type does differently from
//! tokio-rustls is the read path, polled several times a request (hyper looks
//! for the next message, and for the peer's close while idle), most often
//! finding nothing:
//! - while the session holds no plaintext, the socket's readiness is asked
//!   first, so an empty poll costs one readiness check and never runs
//!   rustls' record reader or builds a `WouldBlock` error;
//! - a read returns as soon as it has plaintext, instead of polling the
//!   socket again for more (which registers the waker a second time and
//!   finds nothing on a request/response connection).
//!
//! Writes, flushes and shutdown behave as tokio-rustls' do: plaintext is
//! sealed into records the session queues, and the queue goes to the socket
//! in one vectored write when the socket takes it.

use std::io::{self, BufRead, Read, Write};
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustls::{ClientConnection, ConnectionCommon, ServerConnection, SideData};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TLS session past its handshake, over the TCP socket it runs on.
#[derive(Debug)]
pub struct TlsStream<C> {
    tcp: TcpStream,
    session: C,
    /// A read of the socket returned its end.
    socket_ended: bool,
}

/// The client side of a mesh connection.
pub type ClientTlsStream = TlsStream<ClientConnection>;
/// The server side of a mesh connection.
pub type ServerTlsStream = TlsStream<ServerConnection>;

impl TlsStream<ClientConnection> {
    /// The stream of a handshake tokio-rustls completed as the client.
    pub fn from_client(stream: tokio_rustls::client::TlsStream<TcpStream>) -> Self {
        let (tcp, session) = stream.into_inner();
        Self::new(tcp, session)
    }
}

impl TlsStream<ServerConnection> {
    /// The stream of a handshake tokio-rustls completed as the server.
    pub fn from_server(stream: tokio_rustls::server::TlsStream<TcpStream>) -> Self {
        let (tcp, session) = stream.into_inner();
        Self::new(tcp, session)
    }
}

impl<C> TlsStream<C> {
    /// A stream over `tcp` for `session`, whose handshake is complete (any
    /// plaintext or records it still holds are read or sent first).
    pub fn new(tcp: TcpStream, session: C) -> Self {
        Self {
            tcp,
            session,
            socket_ended: false,
        }
    }

    /// The socket and the session.
    pub fn get_ref(&self) -> (&TcpStream, &C) {
        (&self.tcp, &self.session)
    }

    /// The socket and the session, taken apart.
    pub fn into_inner(self) -> (TcpStream, C) {
        (self.tcp, self.session)
    }
}

impl<C, D> TlsStream<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<D>>,
    D: SideData,
{
    /// Sends what the session has queued until it is empty or the socket
    /// is full: `Pending` (waker registered) only when nothing was sent.
    fn poll_send_queued(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut sent_any = false;
        while self.session.wants_write() {
            let mut socket = SocketWriter {
                tcp: &mut self.tcp,
                cx,
            };
            match self.session.write_tls(&mut socket) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => sent_any = true,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    return if sent_any {
                        Poll::Ready(Ok(()))
                    } else {
                        Poll::Pending
                    };
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Sends everything the session has queued.
    fn poll_send_all(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.session.wants_write() {
            ready!(self.poll_send_queued(cx))?;
        }
        Poll::Ready(Ok(()))
    }
}

impl<C, D> AsyncRead for TlsStream<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            // `wants_read` is false exactly when the session holds plaintext
            // or saw close_notify; past the socket's end, the reader says
            // which end it was.
            if !this.session.wants_read() || this.socket_ended {
                match this.session.reader().fill_buf() {
                    Ok(plaintext) => {
                        // Empty: the peer's close_notify, the end of the stream.
                        let n = plaintext.len().min(buf.remaining());
                        buf.put_slice(&plaintext[..n]);
                        this.session.reader().consume(n);
                        return Poll::Ready(Ok(()));
                    }
                    Err(e) if e.kind() != io::ErrorKind::WouldBlock => {
                        // The socket ended without close_notify.
                        return Poll::Ready(Err(e));
                    }
                    Err(_) if this.socket_ended => {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    Err(_) => {}
                }
            }
            // Only new records can make progress. A socket that is not ready
            // registers the waker here, as the read would have (readiness
            // is cleared only when a read finds the socket drained, so a
            // stale "ready" falls through to it).
            ready!(this.tcp.poll_read_ready(cx))?;
            let mut socket = SocketReader {
                tcp: &mut this.tcp,
                cx,
            };
            match this.session.read_tls(&mut socket) {
                // The socket's end: the session records it, and the reader
                // reports it above.
                Ok(0) => this.socket_ended = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
            if let Err(error) = this.session.process_new_packets() {
                // Tell the peer why (rustls queued an alert), as far as the
                // socket takes it now.
                let _ = this.poll_send_queued(cx);
                return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, error)));
            }
        }
    }
}

impl<C, D> AsyncWrite for TlsStream<C>
where
    C: DerefMut + Deref<Target = ConnectionCommon<D>> + Unpin,
    D: SideData,
{
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.poll_write_vectored(cx, &[io::IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        // The session takes plaintext up to its buffer limit (none when its
        // queue of records is full); a queue the socket drained makes room
        // for a second try.
        for _ in 0..2 {
            let taken = this.session.writer().write_vectored(bufs)?;
            let blocked = this.poll_send_queued(cx)?.is_pending();
            match (taken, blocked) {
                (0, true) => return Poll::Pending,
                (0, false) => continue,
                (n, _) => return Poll::Ready(Ok(n)),
            }
        }
        Poll::Ready(Err(io::ErrorKind::WriteZero.into()))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.session.writer().flush()?;
        this.poll_send_all(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Queued once: rustls ignores the calls after the first.
        this.session.send_close_notify();
        ready!(this.poll_send_all(cx))?;
        match ready!(Pin::new(&mut this.tcp).poll_shutdown(cx)) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Poll::Ready(Err(e)),
            _ => Poll::Ready(Ok(())),
        }
    }
}

/// The socket as rustls reads records from it: `WouldBlock` when it has none.
struct SocketReader<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Read for SocketReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        // Through `poll_read`, not `try_read`: a short read clears the
        // socket's readiness, so the next empty poll costs no system call.
        let mut buf = ReadBuf::new(buf);
        match Pin::new(&mut *self.tcp).poll_read(self.cx, &mut buf) {
            Poll::Ready(Ok(())) => Ok(buf.filled().len()),
            Poll::Ready(Err(e)) => Err(e),
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }
}

/// The socket as rustls writes records to it: `WouldBlock` when it is full.
struct SocketWriter<'a, 'b> {
    tcp: &'a mut TcpStream,
    cx: &'a mut Context<'b>,
}

impl Write for SocketWriter<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_write(self.cx, buf) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        match Pin::new(&mut *self.tcp).poll_write_vectored(self.cx, bufs) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}
