//! The filter chain runner: walks a stream's or a connection's filters phase
//! by phase, pausing where a filter stops and going on when it resumes.
//!
//! It knows the filter traits of `lacewing_core::filter` and nothing of any
//! filter implementation (wasm plugins are one kind). An empty chain costs
//! nothing: no stream state, no task, no body wrapping.

mod body;
pub mod http;
pub mod network;

#[cfg(test)]
mod tests;

pub use http::{ChainLimits, HttpChain, Stop};
pub use network::NetworkChain;

/// Which way a phase walks the chain: requests in configured order,
/// responses in reverse (the filter nearest the upstream sees it first), as in Envoy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Request,
    Response,
}

impl Direction {
    /// The filter index of the `step`-th filter of `count` in this direction.
    fn index(self, step: usize, count: usize) -> usize {
        match self {
            Self::Request => step,
            Self::Response => count - 1 - step,
        }
    }
}
