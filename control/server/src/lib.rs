//! The Lacewing control plane: keeps the mesh documents and modules in a
//! [`store`], validates every apply, and streams to each sidecar the
//! [`snapshot`] that concerns it, recording its ACK or NACK.
//!
//! The [`ca`] (root kept in the state directory) signs workload CSRs; the
//! [`roots`] rotate it, both roots trusted during the overlap.
//!
//! A sidecar is admitted ([`join`]) with a one-time join token for its
//! service, then with its workload certificate; or with the shared
//! bootstrap token unless that is turned off.
//!
//! One listener serves the `Operator` and `Discovery` gRPC services and
//! `/metrics` (HTTP/1.1), over TLS only ([`api_tls`]): its certificate is
//! issued by the mesh CA, whose root clients find in `STATE_DIR/ca.pem`.

pub mod api_tls;
pub mod ca;
pub mod client;
pub mod discovery;
pub mod first_party;
pub mod join;
pub mod mesh_tls;
pub mod metrics;
pub mod operator;
pub mod push;
pub mod roots;
pub mod snapshot;
pub mod state;
pub mod store;
pub mod token;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lacewing_control_api as api;
use tokio::net::TcpListener;

use crate::metrics::ControlMetrics;
use crate::state::Shared;
use crate::store::{RedbStore, Store};
use crate::token::RequireToken;

/// Why the control plane could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("state directory {path}: {source}")]
    StateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error("mesh CA: {0}")]
    Ca(#[from] ca::CaError),
    #[error("listen on {address}: {source}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
}

/// The state directory's files.
pub const OPERATOR_TOKEN: &str = "operator.token";
pub const BOOTSTRAP_TOKEN: &str = "bootstrap.token";
pub const STORE_FILE: &str = "mesh.redb";
pub use ca::{CA_CERT, CA_KEY};

/// A bound control plane, ready to serve.
pub struct ControlPlane {
    listener: TcpListener,
    shared: Arc<Shared>,
    operator_token: String,
    bootstrap_token: String,
    roots: Arc<roots::Roots>,
    tls: mesh_tls::MeshTlsSettings,
    api_certificate: api_tls::ApiCertificate,
    handshake_timeout: std::time::Duration,
    shared_bootstrap: bool,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Opens the state directory (creating it 0700, and its tokens 0600, on
    /// first start) and binds `listen`, with the mesh CA's defaults.
    pub async fn bind(listen: SocketAddr, state_dir: &Path) -> Result<Self, StartError> {
        Self::bind_with(listen, state_dir, &ca::CaOptions::default()).await
    }

    /// As [`bind`](Self::bind), with the mesh CA set up as `ca_options` say
    /// (its root generated into the state directory on first start).
    pub async fn bind_with(
        listen: SocketAddr,
        state_dir: &Path,
        ca_options: &ca::CaOptions,
    ) -> Result<Self, StartError> {
        let dir_error = |source| StartError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(state_dir)
                .map_err(dir_error)?;
        }
        let operator_token =
            token::load_or_create(&state_dir.join(OPERATOR_TOKEN)).map_err(dir_error)?;
        let bootstrap_token =
            token::load_or_create(&state_dir.join(BOOTSTRAP_TOKEN)).map_err(dir_error)?;
        let roots = Arc::new(roots::Roots::open(state_dir, ca_options)?);
        let path = state_dir.join(STORE_FILE);
        let store: Arc<dyn Store> =
            Arc::new(tokio::task::block_in_place(|| RedbStore::open(&path))?);
        let first_party = tokio::task::block_in_place(|| {
            first_party::FirstParty::install(&*store, &ca_options.trust_domain)
        })?;
        let shared = Shared::new(store, ControlMetrics::new(), first_party)?;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartError::Listen {
                address: listen,
                source,
            })?;
        let bound = listener.local_addr().map_err(|source| StartError::Listen {
            address: listen,
            source,
        })?;
        let api_certificate = api_tls::ApiCertificate::issue(
            roots.clone(),
            api_tls::server_names(bound, &ca_options.server_names),
            api_tls::API_CERT_LIFETIME,
        )
        .map_err(ca::CaError::Options)?;
        Ok(Self {
            listener,
            shared,
            operator_token,
            bootstrap_token,
            roots,
            tls: mesh_tls::MeshTlsSettings {
                trust_domain: ca_options.trust_domain.clone(),
                default_mode: ca_options.default_mode,
            },
            api_certificate,
            handshake_timeout: ca_options.handshake_timeout,
            shared_bootstrap: true,
        })
    }

    /// Whether sidecars may authenticate with the shared bootstrap token
    /// (yes by default); without it, only join tokens and workload
    /// certificates admit a sidecar.
    pub fn with_shared_bootstrap(mut self, allowed: bool) -> Self {
        self.shared_bootstrap = allowed;
        self
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The mesh CA signing now (its `root_pem` is the trust bundle
    /// sidecars verify against).
    pub fn ca(&self) -> Arc<lacewing_tls::MeshCa> {
        self.roots.ca()
    }

    /// The mesh roots and their rotation.
    pub fn roots(&self) -> &Arc<roots::Roots> {
        &self.roots
    }

    /// The store version at start.
    pub fn version(&self) -> u64 {
        self.shared.mesh().version
    }

    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> Result<(), tonic::transport::Error> {
        let operator = api::operator_server::OperatorServer::with_interceptor(
            operator::Operator::new(
                self.shared.clone(),
                self.roots.clone(),
                &self.tls.trust_domain,
            ),
            RequireToken::new(&self.operator_token, "operator")
                .counted(self.shared.metrics.token_refusals.clone()),
        );
        let discovery = tonic::service::interceptor::InterceptedService::new(
            push::DiscoveryService::new(discovery::Discovery::new(
                self.shared.clone(),
                self.roots.clone(),
                self.tls.clone(),
            )),
            join::DiscoveryAuth::new(
                &self.bootstrap_token,
                self.shared_bootstrap,
                self.shared.metrics.token_refusals.clone(),
            ),
        );
        tokio::spawn(roots::drive(self.roots.clone(), self.shared.clone()));
        let metrics = self.shared.metrics.clone();
        let shared = self.shared.clone();
        let shutdown = async move {
            shutdown.await;
            // Open sidecar streams would hold the graceful shutdown forever.
            shared.closing.send_replace(true);
        };
        let routes = tonic::service::Routes::new(operator)
            .add_service(discovery)
            .into_axum_router()
            .route(
                "/metrics",
                axum::routing::get(move || {
                    let metrics = metrics.clone();
                    async move { metrics.render() }
                }),
            );
        tonic::transport::Server::builder()
            .accept_http1(true)
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(10)))
            .add_routes(routes.into())
            .serve_with_incoming_shutdown(
                api_tls::incoming(
                    self.listener,
                    self.api_certificate,
                    self.handshake_timeout,
                    self.shared.metrics.clone(),
                ),
                shutdown,
            )
            .await
    }
}
