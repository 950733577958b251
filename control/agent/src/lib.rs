//! The sidecar's side of the control plane.
//!
//! An [`Agent`] holds one stream to the control plane: it says hello (node,
//! service, addresses), and for each snapshot fetches the modules its disk
//! [`cache`] lacks, [`translate`]s the snapshot into a proxy configuration,
//! hands it to the proxy's publish, and ACKs or NACKs with the reason. The
//! last good snapshot is kept on disk so a restarted sidecar serves while the
//! control plane is away; lost streams are retried with backoff and jitter.
//! The sidecar's workload [`identity`] is certified over the same stream.

pub mod agent;
pub mod cache;
pub mod identity;
pub mod metrics;
pub mod translate;

pub use agent::{Agent, AgentOptions, Publish};
pub use cache::Cache;
pub use translate::{OutboundTcp, SidecarSpec, bootstrap_config, translate};
