//! W3C Trace Context `traceparent`: `00-<trace-id 32 hex>-<parent-id 16 hex>-<flags 2 hex>`.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};

/// A parsed `traceparent`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub span_id: String,
    pub flags: String,
}

fn is_hex(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl TraceParent {
    /// Parses a version-00 header; `None` if malformed or an all-zero id.
    pub fn parse(header: &str) -> Option<Self> {
        let mut it = header.trim().split('-');
        let (version, trace, span, flags) = (it.next()?, it.next()?, it.next()?, it.next()?);
        if it.next().is_some() || version != "00" {
            return None;
        }
        let valid = is_hex(trace, 32)
            && is_hex(span, 16)
            && is_hex(flags, 2)
            && trace.bytes().any(|b| b != b'0')
            && span.bytes().any(|b| b != b'0');
        valid.then(|| TraceParent {
            trace_id: trace.into(),
            span_id: span.into(),
            flags: flags.into(),
        })
    }

    /// This hop's context: the same trace (or a new sampled one) and a new span id.
    pub fn next_hop(incoming: Option<&TraceParent>, ids: &mut Ids) -> TraceParent {
        match incoming {
            Some(p) => TraceParent {
                trace_id: p.trace_id.clone(),
                span_id: ids.span_id(),
                flags: p.flags.clone(),
            },
            None => TraceParent {
                trace_id: ids.span_id() + &ids.span_id(),
                span_id: ids.span_id(),
                flags: "01".into(),
            },
        }
    }

    /// The header value.
    pub fn header(&self) -> String {
        // Pushed piece by piece: `format!` costs several times as much in wasm.
        let mut value = String::with_capacity(55);
        value.push_str("00-");
        value.push_str(&self.trace_id);
        value.push('-');
        value.push_str(&self.span_id);
        value.push('-');
        value.push_str(&self.flags);
        value
    }
}

/// Random non-zero 64-bit ids: SipHash under a random key (from WASI
/// `random_get`, as std seeds `RandomState`) over a counter.
#[derive(Debug)]
pub struct Ids {
    state: RandomState,
    counter: u64,
}

impl Default for Ids {
    fn default() -> Self {
        Self {
            state: RandomState::new(),
            counter: 0,
        }
    }
}

impl Ids {
    /// 16 hex digits, never all zero.
    pub fn span_id(&mut self) -> String {
        loop {
            self.counter += 1;
            let mut h = self.state.build_hasher();
            h.write_u64(self.counter);
            let v = h.finish();
            if v != 0 {
                return hex16(v);
            }
        }
    }
}

/// `v` as 16 lowercase hex digits (what `format!("{v:016x}")` gives, without
/// the formatting machinery).
fn hex16(v: u64) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 16];
    for (i, digit) in out.iter_mut().enumerate() {
        *digit = DIGITS[((v >> (60 - 4 * i)) & 0xf) as usize];
    }
    // Only ASCII hex digits were written.
    out.iter().map(|&b| b as char).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_next_hop() {
        let p =
            TraceParent::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let mut ids = Ids::default();
        let next = TraceParent::next_hop(Some(&p), &mut ids);
        assert_eq!(next.trace_id, p.trace_id);
        assert_ne!(next.span_id, p.span_id);
        assert!(TraceParent::parse(&next.header()).is_some());
        let fresh = TraceParent::next_hop(None, &mut ids);
        assert!(TraceParent::parse(&fresh.header()).is_some());
    }

    #[test]
    fn hex16_is_zero_padded_lowercase() {
        for v in [1u64, 0xdead_beef, u64::MAX, 0x0123_4567_89ab_cdef] {
            assert_eq!(hex16(v), format!("{v:016x}"));
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
        ] {
            assert_eq!(TraceParent::parse(bad), None, "{bad}");
        }
    }
}
