//! The header-map pairs codec.
//!
//! Little-endian: `u32 count`, then `count × (u32 key_len, u32 value_len)`, then for
//! each pair the key bytes, a NUL, the value bytes and a NUL (lengths exclude the
//! NULs). An empty map is zero bytes, a single NUL, or a count of 0. Decoding
//! checks every length against the buffer and the caps below and never panics.

use alloc::vec::Vec;

/// Largest serialized pairs buffer accepted.
pub const MAX_PAIRS_BYTES: usize = 1024 * 1024;
/// Most pairs accepted in one buffer.
pub const MAX_PAIRS_COUNT: usize = 1024;

/// Why a pairs buffer did not decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairsError {
    /// The buffer is larger than [`MAX_PAIRS_BYTES`].
    TooLarge(usize),
    /// The buffer announces more than [`MAX_PAIRS_COUNT`] pairs.
    TooManyPairs(u32),
    /// A length points past the end of the buffer.
    Truncated,
    /// A key or value is not followed by its NUL terminator.
    MissingNul,
    /// Bytes are left over after the last pair.
    TrailingBytes,
}

impl core::fmt::Display for PairsError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Self::TooLarge(n) => write!(f, "pairs buffer of {n} bytes exceeds {MAX_PAIRS_BYTES}"),
            Self::TooManyPairs(n) => write!(f, "{n} pairs exceed the limit of {MAX_PAIRS_COUNT}"),
            Self::Truncated => f.write_str("pairs buffer is truncated"),
            Self::MissingNul => f.write_str("pairs buffer lacks a NUL terminator"),
            Self::TrailingBytes => f.write_str("pairs buffer has trailing bytes"),
        }
    }
}

impl core::error::Error for PairsError {}

/// The serialized size of `pairs`.
pub fn encoded_len<'a, K, V>(pairs: impl IntoIterator<Item = (&'a K, &'a V)>) -> usize
where
    K: AsRef<[u8]> + ?Sized + 'a,
    V: AsRef<[u8]> + ?Sized + 'a,
{
    let mut len = 4;
    for (k, v) in pairs {
        len += 8 + k.as_ref().len() + v.as_ref().len() + 2;
    }
    len
}

/// Serializes `pairs`; an empty map becomes a count of 0 (4 bytes).
pub fn encode<'a, K, V>(pairs: impl IntoIterator<Item = (&'a K, &'a V)> + Clone) -> Vec<u8>
where
    K: AsRef<[u8]> + ?Sized + 'a,
    V: AsRef<[u8]> + ?Sized + 'a,
{
    let mut out = Vec::with_capacity(encoded_len(pairs.clone()));
    encode_into(pairs, &mut out);
    out
}

/// Serializes `pairs` at the end of `out`.
pub fn encode_into<'a, K, V>(
    pairs: impl IntoIterator<Item = (&'a K, &'a V)> + Clone,
    out: &mut Vec<u8>,
) where
    K: AsRef<[u8]> + ?Sized + 'a,
    V: AsRef<[u8]> + ?Sized + 'a,
{
    let count = pairs.clone().into_iter().count();
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for (k, v) in pairs.clone() {
        out.extend_from_slice(&(k.as_ref().len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.as_ref().len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend_from_slice(k.as_ref());
        out.push(0);
        out.extend_from_slice(v.as_ref());
        out.push(0);
    }
}

fn read_u32(bytes: &[u8], at: usize) -> Result<u32, PairsError> {
    let end = at.checked_add(4).ok_or(PairsError::Truncated)?;
    let chunk = bytes.get(at..end).ok_or(PairsError::Truncated)?;
    let mut word = [0u8; 4];
    word.copy_from_slice(chunk);
    Ok(u32::from_le_bytes(word))
}

/// Decoded pairs borrowing from the buffer.
pub type Pairs<'a> = Vec<(&'a [u8], &'a [u8])>;

/// Decodes a pairs buffer into borrowed key/value slices.
pub fn decode(bytes: &[u8]) -> Result<Pairs<'_>, PairsError> {
    if bytes.len() > MAX_PAIRS_BYTES {
        return Err(PairsError::TooLarge(bytes.len()));
    }
    if bytes.is_empty() || bytes == [0] {
        return Ok(Vec::new());
    }
    let count = read_u32(bytes, 0)?;
    if count as usize > MAX_PAIRS_COUNT {
        return Err(PairsError::TooManyPairs(count));
    }
    let count = count as usize;
    let header_end = 4 + count * 8;
    if header_end > bytes.len() {
        return Err(PairsError::Truncated);
    }
    let mut pairs = Vec::with_capacity(count);
    let mut data = header_end;
    for i in 0..count {
        let key_len = read_u32(bytes, 4 + i * 8)? as usize;
        let value_len = read_u32(bytes, 8 + i * 8)? as usize;
        let key = take_terminated(bytes, &mut data, key_len)?;
        let value = take_terminated(bytes, &mut data, value_len)?;
        pairs.push((key, value));
    }
    if data != bytes.len() {
        return Err(PairsError::TrailingBytes);
    }
    Ok(pairs)
}

fn take_terminated<'a>(
    bytes: &'a [u8],
    at: &mut usize,
    len: usize,
) -> Result<&'a [u8], PairsError> {
    let end = at.checked_add(len).ok_or(PairsError::Truncated)?;
    let slice = bytes.get(*at..end).ok_or(PairsError::Truncated)?;
    match bytes.get(end) {
        Some(0) => {}
        Some(_) => return Err(PairsError::MissingNul),
        None => return Err(PairsError::Truncated),
    }
    *at = end + 1;
    Ok(slice)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn round_trip() {
        let pairs: Vec<(&[u8], &[u8])> =
            vec![(b":path", b"/a"), (b"x-empty", b""), (b"k", b"v\x00w")];
        let bytes = encode(pairs.iter().map(|(k, v)| (*k, *v)));
        assert_eq!(
            bytes.len(),
            encoded_len(pairs.iter().map(|(k, v)| (*k, *v)))
        );
        assert_eq!(decode(&bytes).unwrap(), pairs);
    }

    #[test]
    fn known_bytes() {
        let bytes = encode([("1", "2")].iter().map(|(k, v)| (*k, *v)));
        assert_eq!(
            bytes,
            [1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, b'1', 0, b'2', 0]
        );
    }

    #[test]
    fn empty_forms() {
        let none: [(&str, &str); 0] = [];
        assert_eq!(encode(none.iter().map(|(k, v)| (*k, *v))), [0, 0, 0, 0]);
        assert!(decode(&[]).unwrap().is_empty());
        assert!(decode(&[0]).unwrap().is_empty());
        assert!(decode(&[0, 0, 0, 0]).unwrap().is_empty());
    }

    #[test]
    fn malformed_inputs_are_errors() {
        let good = encode([("key", "value")].iter().map(|(k, v)| (*k, *v)));
        // Every truncation fails cleanly.
        for cut in 1..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        // Length pointing past the end.
        let mut long = good.clone();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(decode(&long), Err(PairsError::Truncated));
        // Missing NUL.
        let mut nul = good.clone();
        nul[12 + 3] = b'!';
        assert_eq!(decode(&nul), Err(PairsError::MissingNul));
        // Trailing garbage.
        let mut trailing = good.clone();
        trailing.push(7);
        assert_eq!(decode(&trailing), Err(PairsError::TrailingBytes));
        // Count larger than the buffer, and larger than the cap.
        assert_eq!(decode(&[2, 0, 0, 0, 0, 0]), Err(PairsError::Truncated));
        assert_eq!(
            decode(&u32::MAX.to_le_bytes()),
            Err(PairsError::TooManyPairs(u32::MAX))
        );
        assert_eq!(
            decode(&1025u32.to_le_bytes()),
            Err(PairsError::TooManyPairs(1025))
        );
        // Oversized buffer.
        let huge = vec![0u8; MAX_PAIRS_BYTES + 1];
        assert_eq!(
            decode(&huge),
            Err(PairsError::TooLarge(MAX_PAIRS_BYTES + 1))
        );
        // Short header.
        assert_eq!(decode(&[1, 0]), Err(PairsError::Truncated));
    }

    #[test]
    fn max_count_accepted() {
        let pairs: Vec<(&str, &str)> = (0..MAX_PAIRS_COUNT).map(|_| ("a", "b")).collect();
        let bytes = encode(pairs.iter().map(|(k, v)| (*k, *v)));
        assert_eq!(decode(&bytes).unwrap().len(), MAX_PAIRS_COUNT);
    }
}
