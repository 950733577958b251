//! [`ReadyFirst`]: a TLS stream over TCP that asks the socket whether it has
//! bytes before it asks rustls for plaintext.
//!
//! An HTTP/1 connection is polled for reading several times a request (hyper
//! looks for the next message, and for the peer's close while idle), and most
//! of those polls find nothing. On a plain socket that costs a readiness
//! check; through tokio-rustls it also runs rustls' record reader and builds
//! a `WouldBlock` error to find the same thing out. When the session holds no
//! decrypted bytes, the socket's readiness is what decides, so it is checked
//! first; everything else goes to tokio-rustls unchanged.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use rustls::CommonState;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A TLS stream whose reads wait for socket readiness while its session has
/// no plaintext buffered. Reads, writes and shutdown otherwise behave as the
/// wrapped stream's.
#[derive(Debug)]
pub struct ReadyFirst<S>(S);

/// The socket and the session state of a tokio-rustls stream.
pub trait TlsOverTcp {
    fn socket(&self) -> &TcpStream;
    fn session(&self) -> &CommonState;
}

impl TlsOverTcp for tokio_rustls::client::TlsStream<TcpStream> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0
    }
    fn session(&self) -> &CommonState {
        self.get_ref().1
    }
}

impl TlsOverTcp for tokio_rustls::server::TlsStream<TcpStream> {
    fn socket(&self) -> &TcpStream {
        self.get_ref().0
    }
    fn session(&self) -> &CommonState {
        self.get_ref().1
    }
}

impl<S> ReadyFirst<S> {
    pub fn new(stream: S) -> Self {
        Self(stream)
    }

    pub fn get_ref(&self) -> &S {
        &self.0
    }

    pub fn into_inner(self) -> S {
        self.0
    }
}

impl<S: TlsOverTcp + AsyncRead + Unpin> AsyncRead for ReadyFirst<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let stream = &mut self.get_mut().0;
        // `wants_read` holds exactly when no plaintext is buffered and no
        // close_notify came: then only new bytes on the socket can make the
        // read progress. A not-ready socket registers the waker just as the
        // read itself would have (readiness is cleared only when a read
        // finds the socket empty, so a stale "ready" falls through to it).
        if stream.session().wants_read() {
            ready!(stream.socket().poll_read_ready(cx))?;
        }
        Pin::new(stream).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for ReadyFirst<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
