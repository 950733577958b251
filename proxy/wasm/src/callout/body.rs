//! A request or response body whose frames arrive on a channel: a gRPC
//! stream's request side, an HTTP callout's body with trailers, and test
//! responses written frame by frame.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use lacewing_core::body::BoxError;
use tokio::sync::mpsc::UnboundedReceiver;

/// A body whose frames arrive on a channel; it ends when every sender is gone.
#[derive(Debug)]
pub(super) struct ChannelBody {
    frames: UnboundedReceiver<Frame<Bytes>>,
    ended: bool,
}

impl ChannelBody {
    pub(super) fn new(frames: UnboundedReceiver<Frame<Bytes>>) -> Self {
        Self {
            frames,
            ended: false,
        }
    }
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if self.ended {
            return Poll::Ready(None);
        }
        match self.frames.poll_recv(cx) {
            Poll::Ready(Some(frame)) => Poll::Ready(Some(Ok(frame))),
            Poll::Ready(None) => {
                self.ended = true;
                Poll::Ready(None)
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
