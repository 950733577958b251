//! The token bucket: pure arithmetic over (tokens, last refill), stored in
//! shared data as 16 bytes (milli-tokens and nanoseconds, little-endian).

/// A bucket's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// Tokens in thousandths.
    pub milli_tokens: u64,
    /// When tokens were last added, nanoseconds since the Unix epoch.
    pub refilled_at: u64,
}

/// Capacity and refill rate: `refill_tokens` every `interval_secs`, added smoothly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub capacity: u64,
    pub refill_tokens: u64,
    pub interval_secs: u64,
}

/// What taking a token gave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Allowed; the bucket after.
    Allowed(Bucket),
    /// Refused; seconds until a token is back (at least 1).
    Limited { retry_after_secs: u64 },
}

const NANOS: u128 = 1_000_000_000;

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(limits: Limits, now: u64) -> Self {
        Self {
            milli_tokens: limits.capacity.saturating_mul(1000),
            refilled_at: now,
        }
    }

    /// Decodes the stored form; `None` if it is not 16 bytes.
    pub fn decode(bytes: &[u8]) -> Option<Self> {
        if bytes.len() != 16 {
            return None;
        }
        Some(Self {
            milli_tokens: u64::from_le_bytes(bytes[0..8].try_into().ok()?),
            refilled_at: u64::from_le_bytes(bytes[8..16].try_into().ok()?),
        })
    }

    /// The stored form.
    pub fn encode(&self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.milli_tokens.to_le_bytes());
        out[8..].copy_from_slice(&self.refilled_at.to_le_bytes());
        out
    }

    /// Refills for the time since `refilled_at`, then takes one token.
    /// `limits` must have non-zero `refill_tokens` and `interval_secs`.
    pub fn take(self, limits: Limits, now: u64) -> Take {
        let per = u128::from(limits.interval_secs.max(1)) * NANOS; // ns per refill
        let rate = u128::from(limits.refill_tokens.max(1)) * 1000; // milli-tokens per refill
        let elapsed = u128::from(now.saturating_sub(self.refilled_at));
        let gained = elapsed * rate / per;
        let cap = u128::from(limits.capacity) * 1000;
        let tokens = (u128::from(self.milli_tokens) + gained).min(cap);
        // Advance the clock only by the time that produced the milli-tokens gained.
        let refilled_at = if tokens == cap {
            now
        } else {
            let used = gained * per / rate;
            self.refilled_at
                .saturating_add(u64::try_from(used).unwrap_or(u64::MAX))
        };
        if tokens >= 1000 {
            return Take::Allowed(Bucket {
                milli_tokens: u64::try_from(tokens - 1000).unwrap_or(0),
                refilled_at,
            });
        }
        let wait_ns = (1000 - tokens) * per / rate;
        Take::Limited {
            retry_after_secs: u64::try_from(wait_ns.div_ceil(NANOS).max(1)).unwrap_or(u64::MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn drains_then_refills() {
        let l = Limits {
            capacity: 2,
            refill_tokens: 1,
            interval_secs: 1,
        };
        let b = Bucket::full(l, 10 * S);
        let Take::Allowed(b) = b.take(l, 10 * S) else {
            panic!()
        };
        let Take::Allowed(b) = b.take(l, 10 * S) else {
            panic!()
        };
        assert_eq!(
            b.take(l, 10 * S),
            Take::Limited {
                retry_after_secs: 1
            }
        );
        assert!(matches!(b.take(l, 11 * S), Take::Allowed(_)));
        assert_eq!(Bucket::decode(&b.encode()), Some(b));
    }

    #[test]
    fn slow_refill_reports_a_long_retry() {
        let l = Limits {
            capacity: 1,
            refill_tokens: 1,
            interval_secs: 60,
        };
        let Take::Allowed(b) = Bucket::full(l, 0).take(l, 0) else {
            panic!()
        };
        assert_eq!(
            b.take(l, 0),
            Take::Limited {
                retry_after_secs: 60
            }
        );
        assert_eq!(
            b.take(l, 30 * S),
            Take::Limited {
                retry_after_secs: 30
            }
        );
        assert!(matches!(b.take(l, 60 * S), Take::Allowed(_)));
    }
}
