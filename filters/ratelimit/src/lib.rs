//! ratelimit: a token bucket per key (the caller's principal, a request
//! header, or the path), kept in the host's shared data and updated with
//! compare-and-swap, so every worker's VM draws from the same bucket. A
//! request finding it empty gets 429 with `Retry-After`. Schema in README.md.

mod bucket;

use std::rc::Rc;

use lacewing_sdk::http::{Headers, send_response};
use lacewing_sdk::metrics::Counter;
use lacewing_sdk::{Action, Filter, HostError, Plugin, Status, hostcalls};
use serde::Deserialize;

pub use bucket::{Bucket, Limits, Take};

/// What requests are counted by.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Key {
    /// The caller's `source.principal`.
    Principal,
    /// The request path without query.
    Path,
    /// A request header's value.
    Header(String),
}

/// The plugin configuration.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// What a bucket is kept per.
    pub key: Key,
    /// Bucket size (burst), ≥ 1.
    pub capacity: u64,
    /// Tokens added per interval, ≥ 1.
    pub refill_tokens: u64,
    /// The interval in seconds, ≥ 1.
    pub interval_seconds: u64,
}

/// The plugin.
pub struct RateLimit {
    key: Key,
    limits: Limits,
    prefix: String,
    allowed: Option<Counter>,
    limited: Option<Counter>,
}

impl Plugin for RateLimit {
    type Config = Config;
    type Filter = RateLimitFilter;

    fn configure(c: Config) -> Result<Self, String> {
        if c.capacity == 0 || c.refill_tokens == 0 || c.interval_seconds == 0 {
            return Err("capacity, refill_tokens and interval_seconds must be at least 1".into());
        }
        if let Key::Header(h) = &c.key
            && h.is_empty()
        {
            return Err("key.header: must name a header".into());
        }
        let plugin = lacewing_sdk::property("plugin_name")
            .ok()
            .flatten()
            .unwrap_or_else(|| "ratelimit".into());
        Ok(RateLimit {
            key: c.key,
            limits: Limits {
                capacity: c.capacity,
                refill_tokens: c.refill_tokens,
                interval_secs: c.interval_seconds,
            },
            prefix: format!("ratelimit/{plugin}/"),
            allowed: Counter::define("ratelimit_allowed").ok(),
            limited: Counter::define("ratelimit_limited").ok(),
        })
    }

    fn new_filter(self: &Rc<Self>) -> RateLimitFilter {
        RateLimitFilter(self.clone())
    }
}

/// Most compare-and-swap attempts before the request is let through.
const MAX_ATTEMPTS: usize = 8;

impl RateLimit {
    /// Takes a token from `key`'s bucket: `Ok(None)` if allowed, `Ok(Some(secs))` if limited.
    fn take(&self, key: &str) -> Result<Option<u64>, HostError> {
        let shared_key = format!("{}{key}", self.prefix);
        for _ in 0..MAX_ATTEMPTS {
            let now = hostcalls::now_nanos()?;
            let (bucket, cas) = match hostcalls::shared_data(&shared_key)? {
                Some((bytes, cas)) => (
                    Bucket::decode(&bytes).unwrap_or(Bucket::full(self.limits, now)),
                    cas,
                ),
                None => (Bucket::full(self.limits, now), 0),
            };
            let (next, verdict) = match bucket.take(self.limits, now) {
                Take::Allowed(next) => (next, None),
                Take::Limited { retry_after_secs } => return Ok(Some(retry_after_secs)),
            };
            match hostcalls::set_shared_data(&shared_key, &next.encode(), cas) {
                Ok(()) => return Ok(verdict),
                Err(HostError {
                    status: Status::CasMismatch,
                    ..
                }) => continue,
                Err(e) => return Err(e),
            }
        }
        lacewing_sdk::warn!("ratelimit: {shared_key}: contended, request let through");
        Ok(None)
    }
}

/// The per-request check.
pub struct RateLimitFilter(Rc<RateLimit>);

impl Filter for RateLimitFilter {
    fn on_request_headers(&mut self, headers: &Headers, _end_of_stream: bool) -> Action {
        let p = &self.0;
        let key = match &p.key {
            Key::Principal => lacewing_sdk::property("source.principal").ok().flatten(),
            Key::Path => headers
                .get(":path")
                .ok()
                .flatten()
                .map(|v| v.split('?').next().unwrap_or_default().to_string()),
            Key::Header(h) => headers.get(h).ok().flatten(),
        }
        .unwrap_or_else(|| "-".into());
        match p.take(&key) {
            Ok(None) => {
                if let Some(c) = p.allowed {
                    let _ = c.inc();
                }
                Action::Continue
            }
            Ok(Some(secs)) => {
                if let Some(c) = p.limited {
                    let _ = c.inc();
                }
                let retry = secs.to_string();
                if let Err(e) = send_response(
                    429,
                    &[("retry-after", &retry), ("content-type", "text/plain")],
                    b"429 Too Many Requests\n",
                    "rate_limited",
                ) {
                    lacewing_sdk::error!("ratelimit: cannot send the 429: {e}");
                }
                Action::Pause
            }
            Err(e) => {
                // The host's store failed: fail open, and say so.
                lacewing_sdk::error!("ratelimit: {e}; request let through");
                Action::Continue
            }
        }
    }
}

lacewing_sdk::register!(RateLimit);
