//! Follows the HTTP/2 frames a client sends just far enough to tell whether a
//! header block (a HEADERS frame and its CONTINUATION frames) is open: hyper
//! and h2 keep no timer on a block that never ends, so the connection's loop
//! times it with `header_read_timeout`.
//!
//! It reads the 9-byte frame headers (length, type, flags) in the bytes the
//! connection reads anyway and skips payloads by arithmetic: no allocation,
//! no copy beyond a frame header, a few comparisons per frame. A connection
//! that does not start with the HTTP/2 client preface (HTTP/1.1) is left
//! alone after its first byte.

/// The HTTP/2 client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

/// Where the watcher is in the client's bytes.
#[derive(Debug, Clone, Copy)]
enum State {
    /// Matching the preface: this many bytes matched.
    Preface(u8),
    /// Collecting a frame header: this many bytes of it so far.
    Header(u8),
    /// Skipping a frame's payload: this many bytes left; `ends_block` when
    /// the frame closes the open header block once its payload is through.
    Payload { left: u32, ends_block: bool },
    /// Not HTTP/2: nothing to follow.
    Off,
}

/// Whether the client has a header block open, from the bytes it sent.
#[derive(Debug, Clone)]
pub struct FrameWatch {
    state: State,
    header: [u8; FRAME_HEADER],
    /// Header blocks opened so far.
    opened: u64,
    open: bool,
}

impl Default for FrameWatch {
    fn default() -> Self {
        Self {
            state: State::Preface(0),
            header: [0; FRAME_HEADER],
            opened: 0,
            open: false,
        }
    }
}

impl FrameWatch {
    /// The header-block view: blocks opened so far, twice, plus one while a
    /// block is open. The same odd value at two looks means one block stayed
    /// open in between.
    pub fn view(&self) -> u64 {
        self.opened << 1 | u64::from(self.open)
    }

    /// Whether the bytes are HTTP/2 frames (the preface came, or is coming).
    pub fn is_on(&self) -> bool {
        !matches!(self.state, State::Off)
    }

    /// Follows `bytes`, the next bytes read from the client; returns whether
    /// [`Self::view`] changed.
    pub fn feed(&mut self, mut bytes: &[u8]) -> bool {
        let before = self.view();
        while !bytes.is_empty() {
            match self.state {
                State::Off => break,
                State::Preface(matched) => {
                    let matched = usize::from(matched);
                    let n = bytes.len().min(PREFACE.len() - matched);
                    if bytes[..n] != PREFACE[matched..matched + n] {
                        self.state = State::Off;
                        break;
                    }
                    bytes = &bytes[n..];
                    self.state = if matched + n == PREFACE.len() {
                        State::Header(0)
                    } else {
                        State::Preface((matched + n) as u8)
                    };
                }
                State::Header(have) => {
                    let have = usize::from(have);
                    let n = bytes.len().min(FRAME_HEADER - have);
                    self.header[have..have + n].copy_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if have + n < FRAME_HEADER {
                        self.state = State::Header((have + n) as u8);
                    } else {
                        self.frame_header();
                    }
                }
                State::Payload { left, ends_block } => {
                    let n = bytes.len().min(left as usize);
                    bytes = &bytes[n..];
                    let left = left - n as u32;
                    if left == 0 {
                        self.payload_done(ends_block);
                    } else {
                        self.state = State::Payload { left, ends_block };
                    }
                }
            }
        }
        self.view() != before
    }

    /// A whole frame header came: a HEADERS frame opens a block that lasts
    /// until the payload of the frame carrying END_HEADERS is through.
    fn frame_header(&mut self) {
        let [l0, l1, l2, kind, flags, ..] = self.header;
        let left = u32::from_be_bytes([0, l0, l1, l2]);
        let mut ends_block = false;
        if kind == HEADERS || kind == CONTINUATION {
            if !self.open {
                self.open = true;
                self.opened += 1;
            }
            ends_block = flags & END_HEADERS != 0;
        }
        if left == 0 {
            self.payload_done(ends_block);
        } else {
            self.state = State::Payload { left, ends_block };
        }
    }

    fn payload_done(&mut self, ends_block: bool) {
        if ends_block {
            self.open = false;
        }
        self.state = State::Header(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut out = len.to_be_bytes()[1..].to_vec();
        out.extend_from_slice(&[kind, flags, 0, 0, 0, 1]);
        out.extend_from_slice(payload);
        out
    }

    #[test]
    fn http1_is_left_alone() {
        let mut watch = FrameWatch::default();
        assert!(!watch.feed(b"GET / HTTP/1.1\r\n"));
        assert!(!watch.is_on());
        assert_eq!(watch.view(), 0);
    }

    #[test]
    fn a_block_is_open_until_the_payload_of_its_end_headers_frame_is_through() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(0x4, 0, &[])); // SETTINGS
        let headers = frame(HEADERS, 0, b"abc");
        let continuation = frame(CONTINUATION, END_HEADERS, b"de");
        let ping = frame(0x6, 0, &[0; 8]);
        let mut watch = FrameWatch::default();
        // Fed one byte at a time, as a client trickling them sends them.
        let mut views = Vec::new();
        for chunk in [&bytes, &headers, &continuation, &ping] {
            for byte in chunk.iter() {
                watch.feed(std::slice::from_ref(byte));
            }
            views.push(watch.view());
        }
        assert_eq!(views, [0, 3, 2, 2]);
        assert!(watch.is_on());
        // A HEADERS frame with END_HEADERS is a block while its payload trickles.
        let single = frame(HEADERS, END_HEADERS | 0x1, b"xyz");
        assert!(watch.feed(&single[..10]));
        assert_eq!(watch.view(), 5);
        assert!(watch.feed(&single[10..]));
        assert_eq!(watch.view(), 4);
    }

    #[test]
    fn frames_in_one_read_are_all_followed() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(HEADERS, END_HEADERS, b"one"));
        bytes.extend(frame(0x0, 0x1, &[7; 100]));
        bytes.extend(frame(HEADERS, 0, b"two"));
        let mut watch = FrameWatch::default();
        assert!(watch.feed(&bytes));
        assert_eq!(watch.view(), 2 << 1 | 1);
    }
}
