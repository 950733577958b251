//! Property paths: segments joined by NUL (`request\0headers\0x-foo`).

use alloc::vec::Vec;

/// Splits a wire property path into its segments. A trailing NUL is ignored.
pub fn split_path(path: &[u8]) -> Vec<&[u8]> {
    let path = path.strip_suffix(&[0]).unwrap_or(path);
    if path.is_empty() {
        return Vec::new();
    }
    path.split(|b| *b == 0).collect()
}

/// Joins segments into a wire property path.
pub fn join_path<S: AsRef<[u8]>>(segments: &[S]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, s) in segments.iter().enumerate() {
        if i > 0 {
            out.push(0);
        }
        out.extend_from_slice(s.as_ref());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_and_join() {
        assert_eq!(
            split_path(b"request\0headers\0x-foo"),
            [&b"request"[..], b"headers", b"x-foo"]
        );
        assert_eq!(split_path(b"plugin_name\0"), [&b"plugin_name"[..]]);
        assert!(split_path(b"").is_empty());
        assert_eq!(join_path(&["source", "address"]), b"source\0address");
        assert_eq!(
            split_path(&join_path(&["a", "", "b"])),
            [&b"a"[..], b"", b"b"]
        );
    }
}
