//! Mutual TLS to a cluster's endpoints: the connector presents the proxy's
//! live mesh identity, offers the ALPN protocol the cluster speaks (`h2` or
//! `http/1.1`), and accepts only a server whose SPIFFE ID is the cluster's
//! `tls.peer`. [`Conn`] is what the pool drives: a plain or a TLS stream.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use lacewing_config::{ClusterTls, UpstreamProtocol};
use lacewing_core::metrics::Metrics;
use lacewing_core::stream::{CertificateFacts, UpstreamTls as UpstreamTlsFacts};
use lacewing_tls::rustls::pki_types::{CertificateDer, ServerName};
use lacewing_tls::rustls::{self, CertificateError};
use lacewing_tls::{ClientTlsStream, IdentityMismatch, LiveClientConfig, LiveIdentity, SpiffeId};
use prometheus::IntCounterVec;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::error::UpstreamError;

/// A cluster's TLS: the client configuration following the live identity.
#[derive(Debug)]
pub(crate) struct UpstreamTls {
    /// For HTTP: offers the ALPN of the cluster's protocol.
    client: LiveClientConfig,
    /// For raw TCP (a `tcp` listener's connections): offers no ALPN. Built
    /// on first use.
    raw: LiveClientConfig,
    server_name: ServerName<'static>,
    cluster: String,
    handshakes: IntCounterVec,
}

impl UpstreamTls {
    /// The TLS of cluster `cluster`; `identity` is the proxy's, `None` when it has none.
    pub(crate) fn new(
        cluster: &str,
        protocol: UpstreamProtocol,
        tls: &ClusterTls,
        identity: Option<&Arc<LiveIdentity>>,
        metrics: &Metrics,
    ) -> Result<Self, UpstreamError> {
        let error = |reason: String| UpstreamError::Tls {
            cluster: cluster.to_string(),
            reason,
        };
        let identity = identity.ok_or_else(|| {
            error(
                "the proxy has no identity (it is given by the control plane, or read from the \
                 top-level `tls` files)"
                    .into(),
            )
        })?;
        let peer: SpiffeId = tls.peer.parse().map_err(|e| error(format!("{e}")))?;
        let alpn = match protocol {
            UpstreamProtocol::H2 => lacewing_tls::ALPN_H2,
            UpstreamProtocol::Http1 => lacewing_tls::ALPN_HTTP11,
        };
        Ok(Self {
            server_name: lacewing_tls::server_name_for(&peer),
            client: LiveClientConfig::new(identity.clone(), peer.clone(), vec![alpn.to_vec()]),
            raw: LiveClientConfig::new(identity.clone(), peer, Vec::new()),
            cluster: cluster.to_string(),
            handshakes: metrics.upstream_tls_handshakes.clone(),
        })
    }

    fn count(&self, outcome: &str) {
        self.handshakes
            .with_label_values(&[&self.cluster, outcome])
            .inc();
    }

    /// The TLS handshake over `tcp`, offering the cluster protocol's ALPN
    /// (`raw` false) or none (`raw`, for byte streams): the stream and what
    /// the handshake established, or the reason it failed.
    pub(crate) async fn handshake(
        &self,
        tcp: TcpStream,
        raw: bool,
    ) -> Result<(Conn, ConnTls), String> {
        let client = if raw { &self.raw } else { &self.client };
        let (config, material) = match client.get_with_material() {
            Some(Ok(built)) => built,
            Some(Err(e)) => {
                self.count("config");
                return Err(format!("TLS configuration: {e}"));
            }
            None => {
                self.count("no_identity");
                return Err("no workload certificate yet".to_string());
            }
        };
        match TlsConnector::from(config)
            .connect(self.server_name.clone(), tcp)
            .await
        {
            Ok(stream) => {
                self.count("ok");
                let (_, state) = stream.get_ref();
                let facts = ConnTls {
                    version: match state.protocol_version() {
                        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
                        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
                        _ => "",
                    },
                    local: material.identity.leaf().clone(),
                    peer: state
                        .peer_certificates()
                        .and_then(|chain| chain.first())
                        .map(|leaf| leaf.clone().into_owned()),
                    parsed_local: OnceLock::new(),
                    parsed_peer: OnceLock::new(),
                };
                Ok((
                    Conn::Tls(Box::new(ClientTlsStream::from_client(stream))),
                    facts,
                ))
            }
            Err(e) => {
                self.count(lacewing_tls::failure_reason(&e));
                Err(format!("TLS handshake: {}", describe(&e)))
            }
        }
    }
}

/// What one upstream handshake established, kept as DER: certificates are
/// parsed the first time a plugin reads one of their properties.
#[derive(Debug)]
pub(crate) struct ConnTls {
    version: &'static str,
    local: CertificateDer<'static>,
    peer: Option<CertificateDer<'static>>,
    parsed_local: OnceLock<Option<CertificateFacts>>,
    parsed_peer: OnceLock<Option<CertificateFacts>>,
}

impl UpstreamTlsFacts for ConnTls {
    fn version(&self) -> &str {
        self.version
    }

    fn local_certificate(&self) -> Option<&CertificateFacts> {
        self.parsed_local
            .get_or_init(|| certificate_facts(&self.local))
            .as_ref()
    }

    fn peer_certificate(&self) -> Option<&CertificateFacts> {
        self.parsed_peer
            .get_or_init(|| certificate_facts(self.peer.as_ref()?))
            .as_ref()
    }
}

fn certificate_facts(der: &CertificateDer<'_>) -> Option<CertificateFacts> {
    let parsed = lacewing_tls::PeerCertificate::parse(der).ok()?;
    Some(CertificateFacts {
        subject: parsed.subject,
        uri_sans: parsed.uri_sans,
        dns_sans: lacewing_tls::dns_sans(der).unwrap_or_default(),
        sha256: parsed.sha256_digest,
    })
}

/// A handshake failure in words: the identity found when it was the wrong one.
fn describe(error: &io::Error) -> String {
    let mismatch = error
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        .and_then(|tls| match tls {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.downcast_ref::<IdentityMismatch>()
            }
            _ => None,
        });
    match mismatch {
        Some(mismatch) => mismatch.to_string(),
        None => error.to_string(),
    }
}

/// A connection to an endpoint: plain TCP, or mutual TLS over it.
#[derive(Debug)]
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<ClientTlsStream>),
}

impl AsyncRead for Conn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
