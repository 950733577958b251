//! The control plane's gRPC API (`lacewing.control.v1`): the `Operator`
//! service used by `lacewing apply/status/get/delete` and the `Discovery`
//! service sidecars stream snapshots from. Generated from `proto/`.

#[allow(clippy::all, missing_docs)]
mod generated {
    tonic::include_proto!("lacewing.control.v1");
}

pub use generated::*;

/// The metadata key carrying a token: `authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// Bytes per module chunk, upload and download alike.
pub const MODULE_CHUNK: usize = 64 * 1024;

/// How a join token begins (`lacewing token create`), so the sidecar and
/// the control plane tell it from the shared bootstrap token.
pub const JOIN_TOKEN_PREFIX: &str = "lwjoin_";
