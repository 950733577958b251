//! The process-wide key/value store behind `proxy_get_shared_data` and
//! `proxy_set_shared_data`, shared by every VM on every worker thread.
//!
//! Each key carries a compare-and-swap token: it is 1 when the key is first
//! written and grows by one on every later write. A write with token 0 is
//! unconditional; any other token must equal the key's current one. As in
//! Envoy, a conditional write to a key that does not exist yet simply creates
//! it. Keys are never removed. Sizes of keys and values, the number of keys
//! and the total bytes held are bounded so a module cannot exhaust memory.

use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use dashmap::DashMap;
use dashmap::mapref::entry::Entry;

/// Largest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 4 * 1024;
/// Largest value accepted, in bytes.
pub const MAX_VALUE_BYTES: usize = 1024 * 1024;
/// Most keys the store holds.
pub const MAX_KEYS: usize = 64 * 1024;
/// Most bytes (keys plus values) the store holds.
pub const MAX_TOTAL_BYTES: usize = 64 * 1024 * 1024;

/// Bounds of one store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SharedDataLimits {
    /// Largest key accepted, in bytes.
    pub max_key_bytes: usize,
    /// Largest value accepted, in bytes.
    pub max_value_bytes: usize,
    /// Most keys held.
    pub max_keys: usize,
    /// Most bytes (keys plus values) held.
    pub max_total_bytes: usize,
}

impl Default for SharedDataLimits {
    fn default() -> Self {
        Self {
            max_key_bytes: MAX_KEY_BYTES,
            max_value_bytes: MAX_VALUE_BYTES,
            max_keys: MAX_KEYS,
            max_total_bytes: MAX_TOTAL_BYTES,
        }
    }
}

/// Why a write was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharedDataError {
    /// The token given is not the key's current one (another writer won).
    #[error("compare-and-swap token {given} does not match current token {current}")]
    CasMismatch { given: u32, current: u32 },
    /// The key or the value exceeds its size limit.
    #[error("{what} of {size} bytes exceeds the {limit} byte limit")]
    TooLarge {
        what: &'static str,
        size: usize,
        limit: usize,
    },
    /// The store holds as many keys or bytes as it may.
    #[error("shared data is full ({0})")]
    Full(&'static str),
}

#[derive(Debug, Clone)]
struct Slot {
    value: Bytes,
    cas: u32,
}

/// The key/value store shared by all VMs and workers of one proxy.
#[derive(Debug)]
pub struct SharedData {
    entries: DashMap<Box<[u8]>, Slot>,
    limits: SharedDataLimits,
    /// Keys currently held (kept apart from the map so the bound is exact
    /// without locking every shard).
    key_count: AtomicUsize,
    /// Bytes of keys and values currently held.
    total_bytes: AtomicUsize,
}

impl Default for SharedData {
    fn default() -> Self {
        Self::new()
    }
}

/// The token after `cas`, skipping 0 (which means "unconditional").
fn next_cas(cas: u32) -> u32 {
    match cas.wrapping_add(1) {
        0 => 1,
        next => next,
    }
}

impl SharedData {
    /// An empty store with the default limits.
    pub fn new() -> Self {
        Self::with_limits(SharedDataLimits::default())
    }

    /// An empty store with the given limits.
    pub fn with_limits(limits: SharedDataLimits) -> Self {
        Self {
            entries: DashMap::new(),
            limits,
            key_count: AtomicUsize::new(0),
            total_bytes: AtomicUsize::new(0),
        }
    }

    /// The value of `key` and its compare-and-swap token, if the key exists.
    pub fn get(&self, key: &[u8]) -> Option<(Bytes, u32)> {
        self.entries
            .get(key)
            .map(|slot| (slot.value.clone(), slot.cas))
    }

    /// Number of keys held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes `value` under `key`. With `cas` 0 the write is unconditional;
    /// otherwise it succeeds only if `cas` is the key's current token.
    pub fn set(&self, key: &[u8], value: Bytes, cas: u32) -> Result<(), SharedDataError> {
        let limits = &self.limits;
        if key.len() > limits.max_key_bytes {
            return Err(SharedDataError::TooLarge {
                what: "key",
                size: key.len(),
                limit: limits.max_key_bytes,
            });
        }
        if value.len() > limits.max_value_bytes {
            return Err(SharedDataError::TooLarge {
                what: "value",
                size: value.len(),
                limit: limits.max_value_bytes,
            });
        }
        match self.entries.entry(Box::from(key)) {
            Entry::Occupied(mut occupied) => {
                let slot = occupied.get_mut();
                if cas != 0 && cas != slot.cas {
                    return Err(SharedDataError::CasMismatch {
                        given: cas,
                        current: slot.cas,
                    });
                }
                self.reserve(slot.value.len(), value.len())?;
                slot.value = value;
                slot.cas = next_cas(slot.cas);
                Ok(())
            }
            Entry::Vacant(vacant) => {
                let max_keys = limits.max_keys;
                self.key_count
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |count| {
                        (count < max_keys).then_some(count + 1)
                    })
                    .map_err(|_| SharedDataError::Full("key count limit reached"))?;
                if let Err(full) = self.reserve(0, key.len() + value.len()) {
                    self.key_count.fetch_sub(1, Ordering::AcqRel);
                    return Err(full);
                }
                vacant.insert(Slot { value, cas: 1 });
                Ok(())
            }
        }
    }

    /// Accounts for replacing `old` bytes with `new` bytes, refusing growth
    /// past the total byte limit.
    fn reserve(&self, old: usize, new: usize) -> Result<(), SharedDataError> {
        let limit = self.limits.max_total_bytes;
        self.total_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |total| {
                let next = total.saturating_sub(old).checked_add(new)?;
                (new <= old || next <= limit).then_some(next)
            })
            .map(|_| ())
            .map_err(|_| SharedDataError::Full("total byte limit reached"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn missing_key_reads_none() {
        let data = SharedData::new();
        assert_eq!(data.get(b"nope"), None);
        assert!(data.is_empty());
    }

    #[test]
    fn first_write_has_token_one_and_each_write_bumps_it() {
        let data = SharedData::new();
        data.set(b"k", Bytes::from_static(b"a"), 0).unwrap();
        assert_eq!(data.get(b"k"), Some((Bytes::from_static(b"a"), 1)));
        data.set(b"k", Bytes::from_static(b"b"), 0).unwrap();
        assert_eq!(data.get(b"k"), Some((Bytes::from_static(b"b"), 2)));
        data.set(b"k", Bytes::from_static(b"c"), 2).unwrap();
        assert_eq!(data.get(b"k"), Some((Bytes::from_static(b"c"), 3)));
        assert_eq!(data.len(), 1);
    }

    #[test]
    fn stale_token_is_a_cas_mismatch_and_leaves_the_value() {
        let data = SharedData::new();
        data.set(b"k", Bytes::from_static(b"a"), 0).unwrap();
        data.set(b"k", Bytes::from_static(b"b"), 0).unwrap();
        let err = data.set(b"k", Bytes::from_static(b"c"), 1).unwrap_err();
        assert_eq!(
            err,
            SharedDataError::CasMismatch {
                given: 1,
                current: 2
            }
        );
        assert_eq!(data.get(b"k"), Some((Bytes::from_static(b"b"), 2)));
    }

    #[test]
    fn conditional_write_to_a_new_key_creates_it() {
        let data = SharedData::new();
        data.set(b"new", Bytes::from_static(b"v"), 7).unwrap();
        assert_eq!(data.get(b"new"), Some((Bytes::from_static(b"v"), 1)));
    }

    #[test]
    fn token_wraps_past_zero() {
        assert_eq!(next_cas(1), 2);
        assert_eq!(next_cas(u32::MAX), 1);
    }

    #[test]
    fn oversized_key_and_value_are_refused() {
        let data = SharedData::with_limits(SharedDataLimits {
            max_key_bytes: 4,
            max_value_bytes: 8,
            ..SharedDataLimits::default()
        });
        assert!(matches!(
            data.set(b"12345", Bytes::new(), 0),
            Err(SharedDataError::TooLarge { what: "key", .. })
        ));
        assert!(matches!(
            data.set(b"k", Bytes::from(vec![0u8; 9]), 0),
            Err(SharedDataError::TooLarge { what: "value", .. })
        ));
        data.set(b"1234", Bytes::from(vec![0u8; 8]), 0).unwrap();
    }

    #[test]
    fn key_count_limit_refuses_new_keys_but_allows_updates() {
        let data = SharedData::with_limits(SharedDataLimits {
            max_keys: 2,
            ..SharedDataLimits::default()
        });
        data.set(b"a", Bytes::new(), 0).unwrap();
        data.set(b"b", Bytes::new(), 0).unwrap();
        assert!(matches!(
            data.set(b"c", Bytes::new(), 0),
            Err(SharedDataError::Full(_))
        ));
        data.set(b"a", Bytes::from_static(b"x"), 0).unwrap();
        assert_eq!(data.len(), 2);
    }

    #[test]
    fn total_byte_limit_counts_replacements() {
        let data = SharedData::with_limits(SharedDataLimits {
            max_total_bytes: 10,
            ..SharedDataLimits::default()
        });
        data.set(b"k", Bytes::from(vec![0u8; 9]), 0).unwrap();
        assert!(matches!(
            data.set(b"j", Bytes::new(), 0),
            Err(SharedDataError::Full(_))
        ));
        // Shrinking frees room for another key.
        data.set(b"k", Bytes::from(vec![0u8; 2]), 0).unwrap();
        data.set(b"j", Bytes::from(vec![0u8; 5]), 0).unwrap();
        assert!(matches!(
            data.set(b"k", Bytes::from(vec![0u8; 4]), 0),
            Err(SharedDataError::Full(_))
        ));
        assert_eq!(data.get(b"k").map(|(v, _)| v.len()), Some(2));
    }

    #[test]
    fn concurrent_cas_increments_lose_no_update() {
        const THREADS: usize = 4;
        const ROUNDS: u64 = 500;
        let data = Arc::new(SharedData::new());
        data.set(b"n", Bytes::copy_from_slice(&0u64.to_le_bytes()), 0)
            .unwrap();
        let workers: Vec<_> = (0..THREADS)
            .map(|_| {
                let data = Arc::clone(&data);
                std::thread::spawn(move || {
                    let mut mismatches = 0u64;
                    for _ in 0..ROUNDS {
                        loop {
                            let (value, cas) = data.get(b"n").unwrap();
                            let n = u64::from_le_bytes(value[..].try_into().unwrap());
                            let next = Bytes::copy_from_slice(&(n + 1).to_le_bytes());
                            match data.set(b"n", next, cas) {
                                Ok(()) => break,
                                Err(SharedDataError::CasMismatch { .. }) => mismatches += 1,
                                Err(other) => panic!("unexpected {other}"),
                            }
                        }
                    }
                    mismatches
                })
            })
            .collect();
        for worker in workers {
            worker.join().unwrap();
        }
        let (value, cas) = data.get(b"n").unwrap();
        let n = u64::from_le_bytes(value[..].try_into().unwrap());
        assert_eq!(n, THREADS as u64 * ROUNDS);
        assert_eq!(u64::from(cas), 1 + THREADS as u64 * ROUNDS);
    }
}
