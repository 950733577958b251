//! Text checks for the bytes a filter reads on every request: header values,
//! properties, its own ids and numbers.
//!
//! On `wasm32-wasip1`, `core::str::from_utf8` looks at four bytes a step
//! only from a four-byte-aligned address and a byte at a time otherwise
//! (several instructions a byte once compiled, and about 100 a call for a
//! short string). [`from_utf8`] first asks whether the bytes are ASCII,
//! sixteen at a time, which header values, paths and identities almost
//! always are, and is inlined where it is used.
//!
//! ```
//! assert_eq!(lacewing_sdk::text::from_utf8(b"/api/orders"), Ok("/api/orders"));
//! assert_eq!(lacewing_sdk::text::from_utf8("café".as_bytes()), Ok("café"));
//! assert!(lacewing_sdk::text::from_utf8(b"\xff").is_err());
//! ```

use core::str::Utf8Error;

use crate::keys::word;

/// `bytes` as text: exactly what `core::str::from_utf8` answers, ASCII
/// checked sixteen bytes a step first.
#[inline]
pub fn from_utf8(bytes: &[u8]) -> Result<&str, Utf8Error> {
    if is_ascii(bytes) {
        // SAFETY: every byte is below 0x80, and ASCII is valid UTF-8.
        #[allow(unsafe_code)]
        return Ok(unsafe { core::str::from_utf8_unchecked(bytes) });
    }
    core::str::from_utf8(bytes)
}

/// Whether every byte of `bytes` is below 0x80, looked at eight at a time
/// (sixteen a loop step: each step also pays the runtime's interruption check).
#[inline]
pub fn is_ascii(bytes: &[u8]) -> bool {
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    let mut pairs = bytes.chunks_exact(16);
    let mut seen = 0u64;
    for pair in &mut pairs {
        seen |= word(&pair[..8]) | word(&pair[8..]);
    }
    let rest = pairs.remainder();
    let mut words = rest.chunks_exact(8);
    for one in &mut words {
        seen |= word(one);
    }
    for &byte in words.remainder() {
        seen |= u64::from(byte);
    }
    seen & HIGHS == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_as_core_does_for_every_length_and_offset() {
        let specials: [&[u8]; 5] = [
            b"\x80",
            b"\xff",
            "é".as_bytes(),
            "€".as_bytes(),
            b"\xe2\x82",
        ];
        for len in 0..24 {
            let plain = vec![b'a'; len];
            assert_eq!(from_utf8(&plain), core::str::from_utf8(&plain));
            assert!(is_ascii(&plain));
            for at in 0..=len {
                for special in specials {
                    let mut bytes = plain.clone();
                    bytes.splice(at..at, special.iter().copied());
                    assert_eq!(from_utf8(&bytes), core::str::from_utf8(&bytes), "{bytes:?}");
                    assert!(!is_ascii(&bytes), "{bytes:?}");
                }
            }
        }
    }
}
