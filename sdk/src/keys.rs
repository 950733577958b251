//! Cheap equality and hashing for the keys a filter looks up on every
//! request: identities, route and service names, its own series keys.
//!
//! On `wasm32-wasip1`, `==` on strings and byte slices ends in wasi-libc's
//! `memcmp`, which compares one byte at a time (about 8 instructions a byte
//! once compiled), and std's `HashMap` hashes with SipHash (a few hundred
//! instructions for a SPIFFE id). [`bytes_eq`] compares eight bytes a step,
//! and [`Key`] in a [`KeyMap`] uses it with a multiply-rotate hash.
//!
//! The hash is not keyed: use it for keys the filter trusts (a verified peer
//! identity, a configured name), not for text a client chooses freely, where
//! a flood of colliding keys could slow a map down.
//!
//! ```
//! use lacewing_sdk::keys::{Key, KeyMap};
//!
//! let mut hits: KeyMap<u64> = KeyMap::default();
//! *hits.entry(Key::from("spiffe://mesh.local/ns/shop/sa/web")).or_default() += 1;
//! let probe = Key::from("spiffe://mesh.local/ns/shop/sa/web");
//! assert_eq!(hits.get(&probe), Some(&1));
//! assert!(lacewing_sdk::keys::bytes_eq(b"orders", b"orders"));
//! ```

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hash, Hasher};

/// Whether `a` and `b` hold the same bytes, compared eight at a time.
pub fn bytes_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let (mut words_a, mut words_b) = (a.chunks_exact(8), b.chunks_exact(8));
    (&mut words_a)
        .zip(&mut words_b)
        .all(|(x, y)| word(x) == word(y))
        && words_a
            .remainder()
            .iter()
            .zip(words_b.remainder())
            .all(|(x, y)| x == y)
}

/// Eight bytes as a little-endian word (0 unless `bytes` is eight long).
/// Inline: `text::from_utf8` is inlined into filter crates, and this with it.
#[inline]
pub(crate) fn word(bytes: &[u8]) -> u64 {
    u64::from_le_bytes(bytes.try_into().unwrap_or_default())
}

/// A multiply-rotate hasher over eight bytes a step; see the module doc for
/// when it fits.
#[derive(Debug, Default, Clone, Copy)]
pub struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            self.0 = (self.0.rotate_left(5) ^ word(chunk)).wrapping_mul(K);
        }
        let mut tail = [0u8; 8];
        tail[..chunks.remainder().len()].copy_from_slice(chunks.remainder());
        self.0 =
            (self.0.rotate_left(5) ^ u64::from_le_bytes(tail) ^ bytes.len() as u64).wrapping_mul(K);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

/// A text key compared with [`bytes_eq`] and hashed with [`KeyHasher`].
///
/// A lookup needs a `Key`, not a `&str`: keep one as scratch, refill its
/// text ([`Key::text_mut`]) for each request, and look up with it; it is only
/// cloned when a new entry goes in.
#[derive(Debug, Default, Clone)]
pub struct Key(String);

impl Key {
    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key's text, to refill in place.
    pub fn text_mut(&mut self) -> &mut String {
        &mut self.0
    }
}

impl From<String> for Key {
    fn from(text: String) -> Self {
        Key(text)
    }
}

impl From<&str> for Key {
    fn from(text: &str) -> Self {
        Key(text.to_owned())
    }
}

impl PartialEq for Key {
    fn eq(&self, other: &Self) -> bool {
        bytes_eq(self.0.as_bytes(), other.0.as_bytes())
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(self.0.as_bytes());
    }
}

/// A map from [`Key`]s, hashed with [`KeyHasher`].
pub type KeyMap<V> = HashMap<Key, V, BuildHasherDefault<KeyHasher>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_are_equal_exactly_when_they_are() {
        let texts: [&[u8]; 8] = [
            b"",
            b"a",
            b"abcdefgh",
            b"abcdefgi",
            b"spiffe://mesh.local/ns/default/sa/frontend",
            b"spiffe://mesh.local/ns/default/sa/frontenD",
            b"spiffe://mesh.local/ns/default/sa/fronten",
            b"Spiffe://mesh.local/ns/default/sa/frontend",
        ];
        for a in texts {
            for b in texts {
                assert_eq!(bytes_eq(a, b), a == b, "{a:?} {b:?}");
            }
        }
    }

    #[test]
    fn hashes_follow_content_and_length() {
        let hash = |s: &str| {
            let mut h = KeyHasher::default();
            Key::from(s).hash(&mut h);
            h.finish()
        };
        assert_eq!(hash("web\0orders\0all"), hash("web\0orders\0all"));
        assert_ne!(hash("web\0orders\0all"), hash("web\0orders\0alm"));
        assert_ne!(hash("abc"), hash("abc\0"));
        assert_ne!(hash(""), hash("\0"));
    }

    #[test]
    fn a_scratch_key_finds_entries() {
        let mut map: KeyMap<u32> = KeyMap::default();
        map.insert(Key::from("orders"), 1);
        map.insert(Key::from("payments"), 2);
        let mut scratch = Key::default();
        scratch.text_mut().push_str("payments");
        assert_eq!(map.get(&scratch), Some(&2));
        scratch.text_mut().clear();
        scratch.text_mut().push_str("nobody");
        assert_eq!(map.get(&scratch), None);
    }
}
