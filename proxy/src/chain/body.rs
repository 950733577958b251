//! What each filter holds of one body direction: bytes a stopped filter kept
//! (or took), and whether the end of the stream is held with them.
//!
//! The bytes of the latest stop stay in the stream's body buffer, so the
//! filter can read and rewrite them while paused (from a callout reply, say);
//! they are parked here when other bytes need the buffer.

use bytes::BytesMut;
use lacewing_core::filter::FilterStatus;

/// Where one body chunk stopped, or that it went through.
pub(super) enum Passage {
    /// Every filter continued: these bytes go on (with the end, if it came).
    Through { data: BytesMut },
    /// A filter stopped; nothing goes on for now.
    Held,
}

/// Per-filter holds of one body direction, indexed by step (the filter's
/// place in this direction's walk).
#[derive(Debug, Default)]
pub(super) struct Holds {
    held: Vec<Option<BytesMut>>,
    /// The step holding the end of the stream.
    end_at: Option<usize>,
    /// The step whose bytes are in the stream's body buffer.
    in_stream: Option<usize>,
}

impl Holds {
    /// Whether some filter holds bytes or the end of the stream.
    pub(super) fn holding(&self) -> bool {
        self.held.iter().any(Option::is_some)
    }

    /// The first step that holds something.
    pub(super) fn first(&self) -> Option<usize> {
        self.held.iter().position(Option::is_some)
    }

    /// Takes what `step` holds: its bytes and whether the end was held with them.
    pub(super) fn take(&mut self, step: usize) -> (BytesMut, bool) {
        let data = self
            .held
            .get_mut(step)
            .and_then(Option::take)
            .unwrap_or_default();
        let end = self.end_at == Some(step);
        if end {
            self.end_at = None;
        }
        (data, end)
    }

    /// Bytes a filter kept at `step` come before `data`.
    pub(super) fn prepend(&mut self, step: usize, data: BytesMut) -> BytesMut {
        match self.held.get_mut(step).and_then(Option::take) {
            Some(mut before) => {
                before.unsplit(data);
                before
            }
            None => data,
        }
    }

    /// Parks the bytes of the latest stop, taken from the stream's buffer by
    /// `from_stream`, so the buffer can carry other bytes.
    pub(super) fn park(&mut self, from_stream: impl FnOnce() -> BytesMut) {
        if let Some(step) = self.in_stream.take()
            && let Some(slot) = self.held.get_mut(step)
        {
            *slot = Some(from_stream());
        }
    }

    /// Records a stop at `step`: `StopAndBuffer` keeps `data`, any other stop
    /// keeps nothing (the filter took the chunk). The end, if it came, is held
    /// too. Returns what goes back in the stream's buffer.
    pub(super) fn stop(
        &mut self,
        step: usize,
        status: FilterStatus,
        data: BytesMut,
        end: bool,
    ) -> BytesMut {
        if self.held.len() <= step {
            self.held.resize_with(step + 1, || None);
        }
        self.held[step] = Some(BytesMut::new());
        self.in_stream = Some(step);
        if end {
            self.end_at = Some(step);
        }
        if status == FilterStatus::StopAndBuffer {
            data
        } else {
            BytesMut::new()
        }
    }
}
