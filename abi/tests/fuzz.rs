//! Fuzz targets for the ABI codecs: any bytes a guest hands the host decode
//! to a value or an error, never a panic, and what the host encodes decodes
//! back to the same pairs and paths. Each runs for about a second under
//! `cargo test`; `BOLERO_RANDOM_TEST_TIME_MS` runs it longer (docs/security.md).

use lacewing_abi::pairs::{self, PairsError};
use lacewing_abi::property::{join_path, split_path};

#[test]
fn fuzz_pairs_decode_takes_any_bytes() {
    bolero::check!().for_each(|bytes: &[u8]| {
        match pairs::decode(bytes) {
            // What decodes encodes back to bytes that decode to the same pairs.
            Ok(decoded) => {
                let encoded = pairs::encode(decoded.iter().map(|(k, v)| (*k, *v)));
                assert_eq!(pairs::decode(&encoded).unwrap(), decoded);
            }
            Err(
                PairsError::TooLarge(_)
                | PairsError::TooManyPairs(_)
                | PairsError::Truncated
                | PairsError::TrailingBytes
                | PairsError::MissingNul,
            ) => {}
        }
    });
}

#[test]
fn fuzz_pairs_round_trip() {
    bolero::check!()
        .with_type::<Vec<(Vec<u8>, Vec<u8>)>>()
        .for_each(|map| {
            let encoded = pairs::encode(map.iter().map(|(k, v)| (k, v)));
            assert_eq!(
                encoded.len(),
                pairs::encoded_len(map.iter().map(|(k, v)| (k, v)))
            );
            let decoded = pairs::decode(&encoded).unwrap();
            let expected: Vec<(&[u8], &[u8])> = map
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            assert_eq!(decoded, expected);
        });
}

#[test]
fn fuzz_property_paths_round_trip() {
    bolero::check!()
        .with_type::<Vec<Vec<u8>>>()
        .for_each(|segments| {
            // Segments cannot hold NUL, and a trailing NUL is ignored on the
            // wire, so a path's last segment is never empty.
            if segments.last().is_some_and(Vec::is_empty) || segments.iter().any(|s| s.contains(&0))
            {
                return;
            }
            let joined = join_path(segments);
            assert_eq!(split_path(&joined), *segments);
            // The same path with its optional trailing NUL.
            let mut terminated = joined.clone();
            terminated.push(0);
            assert_eq!(split_path(&terminated), *segments);
        });
}
