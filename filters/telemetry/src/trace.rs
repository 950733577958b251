//! W3C Trace Context `traceparent`: `00-<trace-id 32 hex>-<parent-id 16 hex>-<flags 2 hex>`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// A parsed `traceparent`, its ids kept as the lowercase hex digits they are
/// on the wire: parsing, the next hop and the header value allocate nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    trace_id: [u8; 32],
    span_id: [u8; 16],
    flags: [u8; 2],
}

/// Lowercase hex only (W3C forbids upper case in version 00).
fn is_hex(s: &[u8]) -> bool {
    s.iter().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Hex digits as text (they are ASCII by construction).
fn hex_str(digits: &[u8]) -> &str {
    lacewing_sdk::text::from_utf8(digits).unwrap_or_default()
}

/// The length of a `traceparent` value: `00-` + 32 + `-` + 16 + `-` + 2.
const HEADER_LEN: usize = 55;

impl TraceParent {
    /// Parses a version-00 header; `None` if malformed or an all-zero id.
    pub fn parse(header: &str) -> Option<Self> {
        let h = header.trim().as_bytes();
        if h.len() != HEADER_LEN || &h[..3] != b"00-" || h[35] != b'-' || h[52] != b'-' {
            return None;
        }
        let (trace, span, flags) = (&h[3..35], &h[36..52], &h[53..55]);
        let valid = is_hex(trace)
            && is_hex(span)
            && is_hex(flags)
            && trace.iter().any(|&b| b != b'0')
            && span.iter().any(|&b| b != b'0');
        valid.then(|| TraceParent {
            trace_id: trace.try_into().unwrap_or([b'0'; 32]),
            span_id: span.try_into().unwrap_or([b'0'; 16]),
            flags: flags.try_into().unwrap_or([b'0'; 2]),
        })
    }

    /// This hop's context: the same trace (or a new sampled one) and a new span id.
    pub fn next_hop(incoming: Option<&TraceParent>, ids: &mut Ids) -> TraceParent {
        match incoming {
            Some(p) => TraceParent {
                span_id: ids.span_id(),
                ..*p
            },
            None => {
                let mut trace_id = [0u8; 32];
                trace_id[..16].copy_from_slice(&ids.span_id());
                trace_id[16..].copy_from_slice(&ids.span_id());
                TraceParent {
                    trace_id,
                    span_id: ids.span_id(),
                    flags: *b"01",
                }
            }
        }
    }

    /// The trace id, 32 hex digits.
    pub fn trace_id(&self) -> &str {
        hex_str(&self.trace_id)
    }

    /// This hop's span id, 16 hex digits.
    pub fn span_id(&self) -> &str {
        hex_str(&self.span_id)
    }

    /// The header value, written into `out`.
    pub fn write_header<'a>(&self, out: &'a mut [u8; HEADER_LEN]) -> &'a str {
        out[..3].copy_from_slice(b"00-");
        out[3..35].copy_from_slice(&self.trace_id);
        out[35] = b'-';
        out[36..52].copy_from_slice(&self.span_id);
        out[52] = b'-';
        out[53..].copy_from_slice(&self.flags);
        hex_str(out)
    }
}

/// Non-zero 64-bit ids that look random: SplitMix64's output function over
/// a counter started at a random seed (from WASI `random_get`, as std seeds
/// `RandomState`). Distinct for 2^64 ids in a row, spread evenly, and a
/// fraction of the cost of SipHash over the counter (about 200 instructions
/// an id in wasm). Not meant to be unguessable: trace ids are not secrets.
#[derive(Debug)]
pub struct Ids {
    next: u64,
}

impl Default for Ids {
    fn default() -> Self {
        let mut seed = RandomState::new().build_hasher();
        seed.write_u64(0);
        Self {
            next: seed.finish(),
        }
    }
}

impl Ids {
    /// 16 hex digits, never all zero.
    pub fn span_id(&mut self) -> [u8; 16] {
        loop {
            self.next = self.next.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut v = self.next;
            v = (v ^ (v >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            v = (v ^ (v >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            v ^= v >> 31;
            if v != 0 {
                return hex16(v);
            }
        }
    }
}

/// `v` as 16 lowercase hex digits (what `format!("{v:016x}")` gives, without
/// the formatting machinery or an allocation).
fn hex16(v: u64) -> [u8; 16] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(p: &TraceParent) -> String {
        p.write_header(&mut [0; HEADER_LEN]).to_owned()
    }

    #[test]
    fn parse_and_next_hop() {
        let p =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let mut ids = Ids::default();
        let next = TraceParent::next_hop(Some(&p), &mut ids);
        assert_eq!(next.trace_id(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(next.span_id(), p.span_id());
        assert_eq!(next.span_id().len(), 16);
        assert!(TraceParent::parse(&header(&next)).is_some());
        let fresh = TraceParent::next_hop(None, &mut ids);
        assert!(TraceParent::parse(&header(&fresh)).is_some());
        assert_eq!(
            TraceParent::parse(" 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01 ")
                .map(|p| header(&p)),
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned())
        );
    }

    #[test]
    fn span_ids_differ_from_one_another_and_between_generators() {
        let mut seen = std::collections::HashSet::new();
        for mut ids in [Ids::default(), Ids::default()] {
            for _ in 0..10_000 {
                let id = ids.span_id();
                assert!(id.iter().any(|&d| d != b'0'));
                assert!(seen.insert(id), "a span id repeated");
            }
        }
    }

    #[test]
    fn hex16_is_zero_padded_lowercase() {
        for v in [1u64, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(hex_str(&hex16(v)), format!("{v:016x}"));
        }
    }

    #[test]
    fn malformed_headers_are_ignored() {
        for bad in [
            "",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0g",
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }
}
