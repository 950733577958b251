//! The control plane's API listener: every accepted connection completes a
//! TLS 1.3 handshake, presenting a server certificate the mesh CA issued for
//! the names the control plane is reached at, before tonic serves it.
//! Handshakes run concurrently (a stalled one holds no other), each cut off
//! after a timeout, at most [`MAX_PENDING_HANDSHAKES`] at once, and each is
//! counted by outcome in `lacewing_control_tls_handshakes_total`.
//!
//! A client may present a certificate; one is verified against the mesh
//! trust bundle (as it stands when the connection is accepted), and its
//! SPIFFE ID travels with every call on the connection ([`ApiConnectInfo`]):
//! a joined sidecar authenticates with it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use lacewing_tls::{MeshCa, SpiffeId, TlsError};

use crate::roots::Roots;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_stream::wrappers::ReceiverStream;

use crate::metrics::ControlMetrics;

/// How long the API's certificate is valid; it is issued again at two
/// thirds of that (on the next connection after), and at every start.
pub const API_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// The default time a client has to complete its TLS handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress beyond which new connections are closed at once.
pub const MAX_PENDING_HANDSHAKES: usize = 1024;

/// The names in the API's certificate for a control plane listening on
/// `listen`: `localhost`, `127.0.0.1`, `::1`, the listen address when it is
/// a specific one, and `extra` (the operator's `--server-name`s).
pub fn server_names(listen: SocketAddr, extra: &[String]) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if !listen.ip().is_unspecified() {
        names.push(listen.ip().to_string());
    }
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    names
}

/// The API's server certificate, issued again when two thirds of its
/// lifetime passed or another root signs.
pub(crate) struct ApiCertificate {
    roots: Arc<Roots>,
    /// The CA it was issued by.
    ca: Arc<MeshCa>,
    names: Vec<String>,
    lifetime: Duration,
    /// The server identity, and the configuration made from it with the
    /// trust bundle clients are verified against.
    identity: lacewing_tls::Identity,
    bundle: String,
    config: Arc<ServerConfig>,
    renew_at: SystemTime,
}

impl ApiCertificate {
    pub(crate) fn issue(
        roots: Arc<Roots>,
        names: Vec<String>,
        lifetime: Duration,
    ) -> Result<Self, TlsError> {
        let ca = roots.ca();
        let (identity, _) = ca.issue_server(&names, lifetime)?;
        let bundle = roots.bundle_pem();
        let config = Self::config(&identity, &bundle)?;
        Ok(Self {
            roots,
            ca,
            names,
            lifetime,
            identity,
            bundle,
            config,
            renew_at: SystemTime::now() + lifetime * 2 / 3,
        })
    }

    fn config(
        identity: &lacewing_tls::Identity,
        bundle: &str,
    ) -> Result<Arc<ServerConfig>, TlsError> {
        let clients = lacewing_tls::TrustBundle::from_pem(bundle)?;
        lacewing_tls::api::api_server_config_with_clients(identity, &clients)
    }

    /// The configuration to accept with, renewed first when it is due (a
    /// failure keeps the current one and is logged).
    fn current(&mut self) -> Arc<ServerConfig> {
        let rotated = !Arc::ptr_eq(&self.ca, &self.roots.ca())
            && crate::roots::signer_of(&self.ca) != self.roots.signing_root_sha256();
        if rotated || SystemTime::now() >= self.renew_at {
            match Self::issue(self.roots.clone(), self.names.clone(), self.lifetime) {
                Ok(renewed) => {
                    tracing::info!(names = ?self.names, "control plane API certificate renewed");
                    *self = renewed;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot renew the control plane API certificate")
                }
            }
        }
        let bundle = self.roots.bundle_pem();
        if bundle != self.bundle {
            match Self::config(&self.identity, &bundle) {
                Ok(config) => {
                    self.config = config;
                    self.bundle = bundle;
                }
                Err(error) => {
                    tracing::error!(%error, "cannot verify clients with the new trust bundle")
                }
            }
        }
        self.config.clone()
    }
}

/// A TLS connection to the API, as tonic serves it, with the SPIFFE ID of
/// the client certificate it presented.
pub struct ApiStream(tokio_rustls::server::TlsStream<TcpStream>, Option<SpiffeId>);

/// What every call on a connection knows of it (a request extension).
#[derive(Debug, Clone)]
pub struct ApiConnectInfo {
    pub tcp: tonic::transport::server::TcpConnectInfo,
    /// The SPIFFE ID of the verified client certificate, if one was
    /// presented (and names one).
    pub peer: Option<SpiffeId>,
}

impl tonic::transport::server::Connected for ApiStream {
    type ConnectInfo = ApiConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        ApiConnectInfo {
            tcp: self.0.get_ref().0.connect_info(),
            peer: self.1.clone(),
        }
    }
}

/// The SPIFFE ID in the leaf the client presented (rustls verified the
/// chain against the trust bundle).
fn peer_id(stream: &tokio_rustls::server::TlsStream<TcpStream>) -> Option<SpiffeId> {
    let leaf = stream.get_ref().1.peer_certificates()?.first()?;
    let uris = lacewing_tls::uri_sans(leaf).ok()?;
    uris.first()?.parse().ok()
}

impl AsyncRead for ApiStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for ApiStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// Accepts on `listener` until the returned stream is dropped; yields the
/// connections whose handshake completed within `timeout`.
pub(crate) fn incoming(
    listener: TcpListener,
    mut certificate: ApiCertificate,
    timeout: Duration,
    metrics: ControlMetrics,
) -> ReceiverStream<std::io::Result<ApiStream>> {
    let (tx, rx) = mpsc::channel(64);
    let pending = Arc::new(Semaphore::new(MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                () = tx.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors, most likely: let some close.
                    tracing::warn!(%error, "control plane accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let count = {
                let metrics = metrics.clone();
                move |outcome: &str| metrics.tls_handshakes.with_label_values(&[outcome]).inc()
            };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                count("overloaded");
                tracing::warn!(%remote, "too many TLS handshakes in progress; connection closed");
                continue;
            };
            let config = certificate.current();
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = handshake(tcp, config, timeout).await;
                drop(permit);
                match result {
                    Ok(stream) => {
                        count("ok");
                        let peer = peer_id(&stream);
                        let _ = tx.send(Ok(ApiStream(stream, peer))).await;
                    }
                    Err(outcome) => {
                        count(outcome);
                        tracing::warn!(%remote, outcome, "control plane TLS handshake refused");
                    }
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// The handshake, or its failure as a metric label: `plaintext_refused`
/// (the first byte is not a TLS handshake record), `closed`, `timeout`, or
/// a [`lacewing_tls::failure_reason`].
async fn handshake(
    tcp: TcpStream,
    config: Arc<ServerConfig>,
    timeout: Duration,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, &'static str> {
    let _ = tcp.set_nodelay(true);
    let handshake = async {
        let mut first = [0u8; 1];
        match tcp.peek(&mut first).await {
            Ok(0) => return Err("closed"),
            Err(_) => return Err("io"),
            Ok(_) if first[0] != 0x16 => return Err("plaintext_refused"),
            Ok(_) => {}
        }
        TlsAcceptor::from(config)
            .accept(tcp)
            .await
            .map_err(|e| lacewing_tls::failure_reason(&e))
    };
    tokio::time::timeout(timeout, handshake)
        .await
        .unwrap_or(Err("timeout"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_cover_loopback_and_a_specific_listen_address() {
        let any = server_names("0.0.0.0:15010".parse().unwrap(), &[]);
        assert_eq!(any, ["localhost", "127.0.0.1", "::1"]);
        let specific = server_names(
            "10.1.2.3:15010".parse().unwrap(),
            &["control.mesh".to_string(), "localhost".to_string()],
        );
        assert_eq!(
            specific,
            ["localhost", "127.0.0.1", "::1", "10.1.2.3", "control.mesh"]
        );
    }

    #[test]
    fn clients_are_verified_against_the_bundle_as_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let roots = Arc::new(Roots::open(dir.path(), &crate::ca::CaOptions::default()).unwrap());
        let mut certificate =
            ApiCertificate::issue(roots.clone(), vec!["localhost".into()], API_CERT_LIFETIME)
                .unwrap();
        let steady = certificate.current();
        assert!(Arc::ptr_eq(&steady, &certificate.current()));
        // A rotation starts: the new root joins the bundle, and clients
        // holding its certificates are verified from the next connection on.
        roots.start(None, Duration::from_secs(60)).unwrap();
        let trusting = certificate.current();
        assert!(!Arc::ptr_eq(&steady, &trusting));
        assert_eq!(certificate.bundle, roots.bundle_pem());
        assert!(Arc::ptr_eq(&trusting, &certificate.current()));
    }

    #[test]
    fn the_certificate_is_issued_again_when_due() {
        let dir = tempfile::tempdir().unwrap();
        let roots = Arc::new(Roots::open(dir.path(), &crate::ca::CaOptions::default()).unwrap());
        let mut certificate =
            ApiCertificate::issue(roots, vec!["localhost".into()], Duration::ZERO).unwrap();
        let first = certificate.current();
        let second = certificate.current();
        assert!(!Arc::ptr_eq(&first, &second));
        certificate.lifetime = API_CERT_LIFETIME;
        certificate.renew_at = SystemTime::now() + API_CERT_LIFETIME;
        let third = certificate.current();
        assert!(Arc::ptr_eq(&third, &certificate.current()));
    }
}
