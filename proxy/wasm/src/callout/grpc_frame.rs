//! The gRPC wire format a callout needs: length-prefixed message framing,
//! the status in `grpc-status`/`grpc-message` (or mapped from HTTP), and the
//! `grpc-timeout` encoding.

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::{HeaderMap, StatusCode};

use super::grpc_status;

/// Length of the gRPC message prefix: compressed flag and big-endian length.
const GRPC_PREFIX_LEN: usize = 5;

/// One gRPC message with its length prefix (never compressed).
pub(super) fn grpc_frame(message: &[u8]) -> Bytes {
    let mut frame = BytesMut::with_capacity(GRPC_PREFIX_LEN + message.len());
    frame.extend_from_slice(&[0]);
    // `send` bounds messages to MAX_GRPC_MESSAGE_BYTES, far below u32::MAX.
    let len = u32::try_from(message.len()).unwrap_or(u32::MAX);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(message);
    frame.freeze()
}

/// How a stream ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Closed {
    pub(super) status: u32,
    pub(super) message: String,
}

impl Closed {
    pub(super) fn new(status: u32, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
        }
    }
}

/// Splits a byte stream into gRPC messages.
#[derive(Debug)]
pub(super) struct MessageDecoder {
    buffer: BytesMut,
    max_message: usize,
}

impl MessageDecoder {
    pub(super) fn new(max_message: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            max_message,
        }
    }

    pub(super) fn push(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    pub(super) fn has_partial(&self) -> bool {
        !self.buffer.is_empty()
    }

    /// The next complete message, `None` if more bytes are needed, or the
    /// status to close with when the stream is malformed.
    pub(super) fn next_message(&mut self) -> Result<Option<Bytes>, Closed> {
        let Some(prefix) = self.buffer.get(..GRPC_PREFIX_LEN) else {
            return Ok(None);
        };
        let compressed = prefix[0];
        let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]);
        if compressed != 0 {
            return Err(Closed::new(
                grpc_status::INTERNAL,
                "compressed message, but no compression was negotiated",
            ));
        }
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        if len > self.max_message {
            return Err(Closed::new(
                grpc_status::RESOURCE_EXHAUSTED,
                format!(
                    "message of {len} bytes exceeds the {} byte limit",
                    self.max_message
                ),
            ));
        }
        if self.buffer.len() - GRPC_PREFIX_LEN < len {
            return Ok(None);
        }
        self.buffer.advance(GRPC_PREFIX_LEN);
        Ok(Some(self.buffer.split_to(len).freeze()))
    }
}

/// The status in `grpc-status` / `grpc-message`.
pub(super) fn status_of(map: &HeaderMap) -> Closed {
    let message = map
        .get("grpc-message")
        .map(|value| percent_decode(value.as_bytes()))
        .unwrap_or_default();
    match map.get("grpc-status") {
        None => Closed::new(grpc_status::UNKNOWN, "missing grpc-status"),
        Some(value) => match std::str::from_utf8(value.as_bytes())
            .ok()
            .and_then(|text| text.trim().parse::<u32>().ok())
        {
            Some(status) => Closed::new(status, message),
            None => Closed::new(grpc_status::UNKNOWN, "unreadable grpc-status"),
        },
    }
}

/// The gRPC status for a non-200 HTTP answer without `grpc-status`, per the
/// gRPC HTTP-to-gRPC status mapping.
pub(super) fn grpc_status_of_http(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => grpc_status::INTERNAL,
        401 => grpc_status::UNAUTHENTICATED,
        403 => grpc_status::PERMISSION_DENIED,
        404 => grpc_status::UNIMPLEMENTED,
        429 | 502 | 503 | 504 => grpc_status::UNAVAILABLE,
        _ => grpc_status::UNKNOWN,
    }
}

/// Decodes `grpc-message` percent-encoding; bad escapes stay as written.
pub(super) fn percent_decode(raw: &[u8]) -> String {
    fn hex(digit: u8) -> Option<u8> {
        char::from(digit)
            .to_digit(16)
            .and_then(|value| u8::try_from(value).ok())
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut index = 0;
    while index < raw.len() {
        let byte = raw[index];
        if byte == b'%'
            && let (Some(high), Some(low)) = (
                raw.get(index + 1).copied().and_then(hex),
                raw.get(index + 2).copied().and_then(hex),
            )
        {
            out.push(high << 4 | low);
            index += 3;
            continue;
        }
        out.push(byte);
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A `grpc-timeout` value: at most 8 digits and a unit.
pub(super) fn grpc_timeout(timeout: Duration) -> String {
    const MAX: u128 = 99_999_999;
    let millis = timeout.as_millis();
    if millis == 0 {
        return format!("{}u", timeout.as_micros().min(MAX));
    }
    if millis <= MAX {
        return format!("{millis}m");
    }
    let seconds = u128::from(timeout.as_secs());
    if seconds <= MAX {
        return format!("{seconds}S");
    }
    if seconds / 60 <= MAX {
        return format!("{}M", seconds / 60);
    }
    format!("{}H", (seconds / 3600).min(MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn decoder_reassembles_messages_split_anywhere() {
        let mut stream = Vec::new();
        for message in [&b"first"[..], b"", b"third message"] {
            stream.extend_from_slice(&grpc_frame(message));
        }
        for chunk_size in 1..stream.len() {
            let mut decoder = MessageDecoder::new(64);
            let mut messages = Vec::new();
            for chunk in stream.chunks(chunk_size) {
                decoder.push(chunk);
                while let Some(message) = decoder.next_message().unwrap() {
                    messages.push(message);
                }
            }
            assert_eq!(
                messages,
                vec![
                    Bytes::from_static(b"first"),
                    Bytes::new(),
                    Bytes::from_static(b"third message")
                ]
            );
            assert!(!decoder.has_partial());
        }
    }

    #[test]
    fn decoder_refuses_compressed_and_oversized_frames() {
        let mut decoder = MessageDecoder::new(4);
        decoder.push(&[1, 0, 0, 0, 1, b'x']);
        assert_eq!(
            decoder.next_message().unwrap_err().status,
            grpc_status::INTERNAL
        );
        let mut decoder = MessageDecoder::new(4);
        decoder.push(&[0, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(
            decoder.next_message().unwrap_err().status,
            grpc_status::RESOURCE_EXHAUSTED
        );
        let mut decoder = MessageDecoder::new(4);
        decoder.push(&[0, 0, 0]);
        assert_eq!(decoder.next_message(), Ok(None));
        assert!(decoder.has_partial());
    }

    #[test]
    fn frames_have_a_length_prefix() {
        assert_eq!(&grpc_frame(b"ab")[..], &[0, 0, 0, 0, 2, b'a', b'b']);
    }

    #[test]
    fn grpc_timeout_fits_eight_digits() {
        assert_eq!(grpc_timeout(Duration::from_millis(1500)), "1500m");
        assert_eq!(grpc_timeout(Duration::from_micros(250)), "250u");
        assert_eq!(grpc_timeout(Duration::ZERO), "0u");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000)), "200000S");
        assert_eq!(grpc_timeout(Duration::from_secs(200_000_000)), "3333333M");
        assert_eq!(grpc_timeout(Duration::MAX), "99999999H");
    }

    #[test]
    fn grpc_message_is_percent_decoded() {
        assert_eq!(percent_decode(b"a%20b%2"), "a b%2");
        assert_eq!(percent_decode(b"%E2%9C%93 ok%zz"), "\u{2713} ok%zz");
        assert_eq!(percent_decode(b"%ff"), "\u{fffd}");
    }

    #[test]
    fn status_comes_from_trailers() {
        let mut map = HeaderMap::new();
        assert_eq!(status_of(&map).status, grpc_status::UNKNOWN);
        map.insert("grpc-status", HeaderValue::from_static("nine"));
        assert_eq!(status_of(&map).status, grpc_status::UNKNOWN);
        map.insert("grpc-status", HeaderValue::from_static("9"));
        map.insert("grpc-message", HeaderValue::from_static("stop"));
        assert_eq!(status_of(&map), Closed::new(9, "stop"));
    }

    #[test]
    fn http_status_maps_to_grpc_status() {
        assert_eq!(
            grpc_status_of_http(StatusCode::NOT_FOUND),
            grpc_status::UNIMPLEMENTED
        );
        assert_eq!(
            grpc_status_of_http(StatusCode::UNAUTHORIZED),
            grpc_status::UNAUTHENTICATED
        );
        assert_eq!(
            grpc_status_of_http(StatusCode::IM_A_TEAPOT),
            grpc_status::UNKNOWN
        );
    }
}
