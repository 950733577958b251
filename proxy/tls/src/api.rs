//! TLS for the control plane's own API (the `Operator` and `Discovery`
//! services): the server presents a certificate from the mesh CA naming the
//! addresses it is reached at; clients (`lacewing apply`, sidecars) verify
//! it against the mesh root they were given (`ca.pem`). A client
//! authenticates with a bearer token, or (a sidecar that joined the mesh)
//! with its workload certificate: the server asks for one, optionally, and
//! verifies it against the mesh trust bundle.

use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::ServerName;
use rustls::server::WebPkiClientVerifier;
use rustls::{CertificateError, ClientConfig, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::{ALPN_H2, ALPN_HTTP11, Identity, TlsError, TrustBundle};

/// A server configuration for the control plane's API: TLS 1.3, ALPN `h2`
/// (gRPC) and `http/1.1` (`/metrics`), no client certificate.
pub fn api_server_config(identity: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(crate::config::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// [`api_server_config`], also asking clients for a certificate: one that
/// is presented must chain to `clients` (the mesh trust bundle), and a
/// client that presents none is served too (it authenticates otherwise).
pub fn api_server_config_with_clients(
    identity: &Identity,
    clients: &TrustBundle,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = crate::config::provider();
    let verifier =
        WebPkiClientVerifier::builder_with_provider(clients.roots().clone(), provider.clone())
            .allow_unauthenticated()
            .build()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())?;
    config.alpn_protocols = vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()];
    Ok(Arc::new(config))
}

/// Why a client could not open a TLS connection to the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ApiConnectError {
    #[error("`{0}` is not HOST:PORT")]
    Address(String),
    #[error("cannot connect to {address}: {source}")]
    Tcp {
        address: String,
        source: std::io::Error,
    },
    #[error(
        "the control plane at {address} presented a certificate not signed by the CA in {ca} \
         (is it this control plane's ca.pem? --ca-file names another)"
    )]
    UnknownCa { address: String, ca: String },
    #[error(
        "the control plane's certificate does not name `{host}` (reach it by a name it was \
         started with, e.g. 127.0.0.1 or localhost, or add one with `lacewing control --server-name`)"
    )]
    WrongName { host: String },
    #[error("TLS handshake with the control plane at {address} failed: {reason}")]
    Handshake { address: String, reason: String },
}

/// What a client trusts the control plane by: the mesh root, from `ca.pem`
/// (or the file `--ca-file` names), and where it came from for messages.
#[derive(Clone)]
pub struct ApiTrust {
    config: Arc<ClientConfig>,
    roots: Arc<rustls::RootCertStore>,
    source: Arc<str>,
}

impl std::fmt::Debug for ApiTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiTrust")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl ApiTrust {
    /// Trusts the root certificate(s) in `pem`; `source` names them in errors.
    pub fn from_pem(pem: &str, source: &str) -> Result<Self, TlsError> {
        let trust = TrustBundle::from_pem(pem)?;
        Self::build(trust.roots().clone(), source.into(), None)
    }

    /// The same trust, presenting `identity` (a workload certificate) to
    /// the control plane when it asks for a client certificate.
    pub fn presenting(&self, identity: &Identity) -> Result<Self, TlsError> {
        Self::build(self.roots.clone(), self.source.clone(), Some(identity))
    }

    fn build(
        roots: Arc<rustls::RootCertStore>,
        source: Arc<str>,
        identity: Option<&Identity>,
    ) -> Result<Self, TlsError> {
        let provider = crate::config::provider();
        let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_webpki_verifier(verifier);
        let mut config = match identity {
            Some(identity) => {
                builder.with_client_auth_cert(identity.chain.clone(), identity.key.clone_key())?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self {
            config: Arc::new(config),
            roots,
            source,
        })
    }

    /// Trusts the root certificate(s) in the PEM file `path`.
    pub fn from_file(path: &Path) -> Result<Self, TlsError> {
        let pem = std::fs::read_to_string(path).map_err(|e| TlsError::Pem {
            what: "CA file",
            reason: format!("{}: {e}", path.display()),
        })?;
        Self::from_pem(&pem, &path.display().to_string())
    }

    /// Opens a TLS connection to `address` (`HOST:PORT`), verifying that the
    /// server's certificate chains to the trusted root and names `HOST`.
    pub async fn connect(&self, address: &str) -> Result<TlsStream<TcpStream>, ApiConnectError> {
        let host = host_of(address).ok_or_else(|| ApiConnectError::Address(address.into()))?;
        let name = match host.parse::<IpAddr>() {
            Ok(ip) => ServerName::IpAddress(ip.into()),
            Err(_) => ServerName::try_from(host.to_string())
                .map_err(|_| ApiConnectError::Address(address.into()))?,
        };
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|source| ApiConnectError::Tcp {
                address: address.into(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        tokio_rustls::TlsConnector::from(self.config.clone())
            .connect(name, tcp)
            .await
            .map_err(|e| self.describe(address, host, &e))
    }

    fn describe(&self, address: &str, host: &str, error: &std::io::Error) -> ApiConnectError {
        let tls = error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::InvalidCertificate(
                CertificateError::UnknownIssuer | CertificateError::BadSignature,
            )) => ApiConnectError::UnknownCa {
                address: address.into(),
                ca: self.source.to_string(),
            },
            Some(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => ApiConnectError::WrongName { host: host.into() },
            Some(rustls::Error::InvalidMessage(_)) => ApiConnectError::Handshake {
                address: address.into(),
                reason: format!("{error} (is it a Lacewing control plane?)"),
            },
            _ => ApiConnectError::Handshake {
                address: address.into(),
                reason: error.to_string(),
            },
        }
    }

    /// A connector for a tonic `Endpoint` (`connect_with_connector`): every
    /// connection the channel opens goes through [`ApiTrust::connect`]. The
    /// endpoint's URI must be `http://HOST:PORT` (the TLS is this one's).
    pub fn connector(&self) -> ApiConnector {
        ApiConnector {
            trust: self.clone(),
        }
    }
}

/// `HOST` of `HOST:PORT` (`[::1]:PORT` gives `::1`).
fn host_of(address: &str) -> Option<&str> {
    let (host, port) = address.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    (!host.is_empty()).then_some(host)
}

/// The control plane's address in the forms clients accept, as `HOST:PORT`:
/// `HOST:PORT` or `https://HOST:PORT[/]`. A plaintext `http://` address is
/// refused: the API is served over TLS only.
pub fn api_address(address: &str) -> Result<String, String> {
    if address.starts_with("http://") {
        return Err(format!(
            "`{address}`: the control plane's API is served over TLS only; give HOST:PORT or https://HOST:PORT"
        ));
    }
    let bare = address.strip_prefix("https://").unwrap_or(address);
    let bare = bare.strip_suffix('/').unwrap_or(bare);
    if host_of(bare).is_none() || bare.contains('/') {
        return Err(format!("`{address}` is not HOST:PORT or https://HOST:PORT"));
    }
    Ok(bare.to_string())
}

/// See [`ApiTrust::connector`].
#[derive(Debug, Clone)]
pub struct ApiConnector {
    trust: ApiTrust,
}

type Connecting = Pin<
    Box<
        dyn Future<Output = Result<hyper_util::rt::TokioIo<TlsStream<TcpStream>>, ApiConnectError>>
            + Send,
    >,
>;

impl tower_service::Service<http::Uri> for ApiConnector {
    type Response = hyper_util::rt::TokioIo<TlsStream<TcpStream>>;
    type Error = ApiConnectError;
    type Future = Connecting;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let trust = self.trust.clone();
        Box::pin(async move {
            let address = uri
                .authority()
                .map(|a| a.as_str().to_string())
                .ok_or_else(|| ApiConnectError::Address(uri.to_string()))?;
            Ok(hyper_util::rt::TokioIo::new(trust.connect(&address).await?))
        })
    }
}

/// The first [`ApiConnectError`] in `error`'s source chain, as text; else
/// the whole chain joined with `: ` (what a tonic transport error hides).
pub fn describe_connect_error(error: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = Vec::new();
    let mut next = Some(error);
    while let Some(e) = next {
        if let Some(ours) = e.downcast_ref::<ApiConnectError>() {
            return ours.to_string();
        }
        chain.push(e.to_string());
        next = e.source();
    }
    chain.dedup();
    chain.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MeshCa;

    /// A TLS server on 127.0.0.1:0 with a certificate from `ca` naming
    /// `names`, completing one handshake per connection.
    async fn server(ca: &MeshCa, names: &[&str]) -> String {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let (identity, _) = ca
            .issue_server(&names, std::time::Duration::from_secs(600))
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(api_server_config(&identity).unwrap());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let _ = acceptor.accept(tcp).await;
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn a_client_verifies_the_ca_and_the_name_it_dialed() {
        let (ca, _) = MeshCa::generate("mesh.local").unwrap();
        let trust = ApiTrust::from_pem(ca.root_pem(), "ca.pem").unwrap();
        let addr = server(&ca, &["localhost", "127.0.0.1"]).await;
        let stream = trust.connect(&addr).await.unwrap();
        assert_eq!(stream.get_ref().1.alpn_protocol(), Some(ALPN_H2));

        let (other, _) = MeshCa::generate("mesh.local").unwrap();
        let wrong = ApiTrust::from_pem(other.root_pem(), "other.pem").unwrap();
        let error = wrong.connect(&addr).await.unwrap_err();
        assert_eq!(
            error.to_string(),
            format!(
                "the control plane at {addr} presented a certificate not signed by the CA in \
                 other.pem (is it this control plane's ca.pem? --ca-file names another)"
            )
        );

        let only_localhost = server(&ca, &["localhost"]).await;
        let error = trust.connect(&only_localhost).await.unwrap_err();
        assert!(
            matches!(&error, ApiConnectError::WrongName { host } if host == "127.0.0.1"),
            "{error}"
        );
        let port = only_localhost.rsplit_once(':').unwrap().1;
        trust.connect(&format!("localhost:{port}")).await.unwrap();
    }

    #[tokio::test]
    async fn a_client_may_present_a_workload_certificate_the_server_verifies() {
        let (ca, _) = MeshCa::generate("mesh.local").unwrap();
        let (names, lifetime) = (
            ["127.0.0.1".to_string()],
            std::time::Duration::from_secs(600),
        );
        let (server_identity, _) = ca.issue_server(&names, lifetime).unwrap();
        let bundle = TrustBundle::from_pem(ca.root_pem()).unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(
            api_server_config_with_clients(&server_identity, &bundle).unwrap(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let (tx, mut peers) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let peer = match acceptor.accept(tcp).await {
                    Ok(tls) => Ok(tls
                        .get_ref()
                        .1
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| crate::uri_sans(leaf).unwrap())),
                    Err(e) => Err(e.to_string()),
                };
                let _ = tx.send(peer);
            }
        });
        let trust = ApiTrust::from_pem(ca.root_pem(), "ca.pem").unwrap();
        // No certificate: served all the same.
        trust.connect(&addr).await.unwrap();
        assert_eq!(peers.recv().await.unwrap(), Ok(None));

        let id = crate::SpiffeId::new("mesh.local", "default", "orders").unwrap();
        let key = crate::WorkloadKey::generate().unwrap();
        let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        let workload = key.identity(&issued.cert_pem).unwrap();
        let mut tls = trust
            .presenting(&workload)
            .unwrap()
            .connect(&addr)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::flush(&mut tls).await.unwrap();
        assert_eq!(peers.recv().await.unwrap(), Ok(Some(vec![id.uri()])));

        // A certificate from another CA is refused.
        let (other, _) = MeshCa::generate("mesh.local").unwrap();
        let key = crate::WorkloadKey::generate().unwrap();
        let issued = other.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        let stranger = key.identity(&issued.cert_pem).unwrap();
        let _ = trust.presenting(&stranger).unwrap().connect(&addr).await;
        assert!(peers.recv().await.unwrap().is_err());
    }

    #[test]
    fn a_server_certificate_is_for_servers_only() {
        let (ca, _) = MeshCa::generate("mesh.local").unwrap();
        let names = ["localhost".to_string(), "10.0.0.1".to_string()];
        let (identity, _) = ca
            .issue_server(&names, std::time::Duration::from_secs(600))
            .unwrap();
        let (_, cert) = x509_parser::parse_x509_certificate(identity.leaf().as_ref()).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && !eku.client_auth);
        assert!(!cert.is_ca());
        assert!(
            ca.issue_server(
                &["caf\u{e9}.example".to_string()],
                std::time::Duration::from_secs(60)
            )
            .is_err()
        );
    }

    #[test]
    fn addresses_are_host_and_port_over_tls_only() {
        assert_eq!(api_address("127.0.0.1:15010").unwrap(), "127.0.0.1:15010");
        assert_eq!(
            api_address("https://localhost:15010/").unwrap(),
            "localhost:15010"
        );
        assert_eq!(api_address("[::1]:15010").unwrap(), "[::1]:15010");
        assert!(
            api_address("http://127.0.0.1:15010")
                .unwrap_err()
                .contains("TLS only")
        );
        assert!(api_address("127.0.0.1").is_err());
        assert!(api_address("https://h:1/x").is_err());
        assert_eq!(host_of("[::1]:1"), Some("::1"));
    }
}
