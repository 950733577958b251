//! Mesh identity for Lacewing: [`SpiffeId`]s, a sidecar's [`WorkloadKey`] and
//! the CSR it sends (the private key never leaves the process), the rustls
//! configurations that authenticate mesh peers in both directions
//! ([`server_config`], [`client_config`]), and what a verified peer
//! certificate says ([`PeerCertificate`], [`ConnectionTls`]) for plugins; and
//! the mesh CA ([`MeshCa`]) that signs CSRs into workload certificates; and
//! the [`LiveIdentity`] a sidecar rotates while it serves, or a standalone
//! proxy reads from [`IdentityFiles`]; and the TLS of
//! the control plane's own API ([`api`]); and [`TlsStream`], the stream a
//! mesh connection reads and writes once its handshake is done.
//!
//! Every configuration is TLS 1.3 only, offers ALPN `h2` and `http/1.1`, and
//! uses the `ring` provider explicitly (no process-wide default is installed).

pub mod api;
pub mod ca;
mod config;
mod error;
mod files;
mod identity;
mod key;
mod live;
mod peer;
mod spiffe;
mod stream;

pub use ca::{CsrError, Issued, MeshCa};
pub use config::{ALPN_H2, ALPN_HTTP11, client_config, server_config, server_name_for};
pub use error::{IdentityMismatch, TlsError, failure_reason};
pub use files::{FileIdentity, IdentityFileError, IdentityFiles};
pub use identity::{Identity, TrustBundle};
pub use key::WorkloadKey;
pub use live::{LiveClientConfig, LiveIdentity, Material};
pub use peer::{ConnectionTls, PeerCertificate, dns_sans, uri_sans};
pub use spiffe::SpiffeId;
pub use stream::{ClientTlsStream, ServerTlsStream, TlsStream};

pub use rustls;

/// The trust domain of a mesh that names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "lacewing.local";
