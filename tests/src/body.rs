//! Request and response bodies generated on the fly, so tests can move hundreds
//! of megabytes without allocating them.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// Size of each generated chunk.
pub const CHUNK_SIZE: usize = 64 * 1024;

/// A body of `len` bytes produced in [`CHUNK_SIZE`] chunks that all share one buffer.
#[derive(Debug, Clone)]
pub struct GeneratedBody {
    remaining: u64,
    chunk: Bytes,
    announce_length: bool,
}

impl GeneratedBody {
    /// A body of `len` bytes whose length is known up front (sent with `content-length`).
    pub fn sized(len: u64) -> Self {
        Self {
            remaining: len,
            chunk: pattern_chunk(),
            announce_length: true,
        }
    }

    /// A body of `len` bytes whose length is not announced (sent chunked on HTTP/1.1).
    pub fn chunked(len: u64) -> Self {
        Self {
            announce_length: false,
            ..Self::sized(len)
        }
    }
}

/// One chunk: `a..z` repeated; every chunk of a generated body is this one.
fn pattern_chunk() -> Bytes {
    let bytes: Vec<u8> = (0..CHUNK_SIZE).map(|i| b'a' + (i % 26) as u8).collect();
    Bytes::from(bytes)
}

impl Body for GeneratedBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.remaining == 0 {
            return Poll::Ready(None);
        }
        let len = self.remaining.min(CHUNK_SIZE as u64) as usize;
        self.remaining -= len as u64;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.slice(0..len)))))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0
    }

    fn size_hint(&self) -> SizeHint {
        if self.announce_length {
            SizeHint::with_exact(self.remaining)
        } else {
            SizeHint::default()
        }
    }
}
