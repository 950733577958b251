//! Downstream mutual TLS: a connection completes a TLS 1.3 handshake (the
//! client's chain checked against the mesh trust bundle, ALPN `h2` or
//! `http/1.1`) before it is served by [`serve_io`] like any other stream
//! (or, on a `tcp` listener, spliced by [`crate::tcp`]: [`accept`] is shared).
//! In PERMISSIVE mode a connection whose first bytes are not a TLS
//! handshake record is served as plaintext; in STRICT mode it is closed.
//! Every handshake is counted by outcome. The certificate presented is the
//! one the proxy's [`LiveIdentity`] holds when the client connects, so a
//! rotation never touches established connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lacewing_config::ListenerTlsMode;
use lacewing_core::drain::DrainWatch;
use lacewing_core::metrics::Metrics;
use lacewing_core::stream::TlsFacts;
use lacewing_tls::{ConnectionTls, LiveIdentity, ServerTlsStream};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::server::serve_io;
use crate::snapshot::HttpSlot;

/// One listener's TLS: the proxy's live identity, the mode, and its counters.
pub struct DownstreamTls {
    identity: Arc<LiveIdentity>,
    mode: ListenerTlsMode,
    handshake_timeout: Duration,
    listener: Arc<str>,
    metrics: Metrics,
}

impl std::fmt::Debug for DownstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DownstreamTls")
            .field("mode", &self.mode)
            .field("listener", &self.listener)
            .finish_non_exhaustive()
    }
}

impl DownstreamTls {
    /// TLS for `listener` presenting whatever identity `identity` holds when
    /// a client connects (a rotation applies to the next handshake).
    pub fn new(
        listener: &str,
        identity: Arc<LiveIdentity>,
        mode: ListenerTlsMode,
        handshake_timeout: Duration,
        metrics: &Metrics,
    ) -> Self {
        Self {
            identity,
            mode,
            handshake_timeout,
            listener: listener.into(),
            metrics: metrics.clone(),
        }
    }

    pub fn mode(&self) -> ListenerTlsMode {
        self.mode
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .downstream_tls_handshakes
            .with_label_values(&[&self.listener, outcome])
            .inc();
    }

    fn transport(&self, transport: &str) {
        self.metrics
            .downstream_connections_by_transport
            .with_label_values(&[&self.listener, transport])
            .inc();
    }
}

/// A connection past [`accept`]: plaintext (PERMISSIVE), or TLS with the
/// facts its handshake established.
pub(crate) enum Accepted {
    Plain(TcpStream),
    Tls(Box<ServerTlsStream>, Arc<TlsFacts>),
}

/// Detects TLS on an accepted connection and completes the handshake, each
/// outcome counted; `None` when the connection is refused or closed.
/// Shared by HTTP and TCP listeners.
pub(crate) async fn accept(
    stream: TcpStream,
    tls: &DownstreamTls,
    remote: SocketAddr,
) -> Option<Accepted> {
    let _ = stream.set_nodelay(true);
    let looks_like_tls =
        match tokio::time::timeout(tls.handshake_timeout, starts_with_tls(&stream)).await {
            Ok(Ok(Some(is_tls))) => is_tls,
            // Closed before sending anything, or a read error: nothing to serve.
            Ok(Ok(None) | Err(_)) => return None,
            Err(_) => {
                tls.count("timeout");
                return None;
            }
        };
    if !looks_like_tls {
        if tls.mode == ListenerTlsMode::Strict {
            tls.count("plaintext_refused");
            tracing::debug!(%remote, listener = %tls.listener, "plaintext refused (STRICT)");
            return None;
        }
        tls.transport("plaintext");
        return Some(Accepted::Plain(stream));
    }
    let Some(material) = tls.identity.current() else {
        tls.count("no_identity");
        tracing::debug!(%remote, listener = %tls.listener, "TLS refused: no workload certificate yet");
        return None;
    };
    let acceptor = TlsAcceptor::from(material.server_config().clone());
    let accepted = tokio::time::timeout(tls.handshake_timeout, acceptor.accept(stream)).await;
    let stream = match accepted {
        Ok(Ok(stream)) => stream,
        Ok(Err(error)) => {
            let reason = lacewing_tls::failure_reason(&error);
            tls.count(reason);
            tracing::debug!(%remote, listener = %tls.listener, %error, reason, "TLS handshake failed");
            return None;
        }
        Err(_) => {
            tls.count("timeout");
            return None;
        }
    };
    tls.count("ok");
    tls.transport("tls");
    let (_, conn) = stream.get_ref();
    let info = ConnectionTls::from_state(conn, conn.server_name(), Some(material.identity.leaf()));
    tracing::debug!(
        %remote,
        listener = %tls.listener,
        peer = ?info.peer.as_ref().map(|p| &p.uri_sans),
        alpn = ?info.alpn,
        "TLS connection established"
    );
    Some(Accepted::Tls(
        Box::new(ServerTlsStream::from_server(stream)),
        Arc::new(facts(info)),
    ))
}

/// Serves one accepted TCP connection through `tls`.
pub async fn serve_tcp(
    stream: TcpStream,
    tls: Arc<DownstreamTls>,
    remote: SocketAddr,
    local: SocketAddr,
    id: u64,
    slot: HttpSlot,
    drain: DrainWatch,
) {
    match accept(stream, &tls, remote).await {
        None => {}
        Some(Accepted::Plain(stream)) => {
            serve_io(stream, remote, local, id, slot, drain, None).await;
        }
        Some(Accepted::Tls(stream, facts)) => {
            serve_io(*stream, remote, local, id, slot, drain, Some(facts)).await;
        }
    }
}

/// The facts plugins read, from what the handshake established.
fn facts(info: ConnectionTls) -> TlsFacts {
    let peer = info.peer.unwrap_or_else(|| lacewing_tls::PeerCertificate {
        uri_sans: Vec::new(),
        subject: String::new(),
        sha256_digest: String::new(),
        spiffe: None,
    });
    TlsFacts {
        version: info.version,
        requested_server_name: info.requested_server_name.unwrap_or_default(),
        mtls: !peer.sha256_digest.is_empty(),
        peer_uri_sans: peer.uri_sans,
        peer_subject: peer.subject,
        peer_sha256: peer.sha256_digest,
        local_uri_sans: info.local_uri_sans,
    }
}

/// Whether the first byte is that of a TLS handshake record (content type
/// 22: no HTTP/1 method and not the h2c preface starts with it); `None`
/// when the peer closed first.
async fn starts_with_tls(stream: &TcpStream) -> std::io::Result<Option<bool>> {
    let mut head = [0u8; 1];
    let n = stream.peek(&mut head).await?;
    Ok((n > 0).then_some(head[0] == 0x16))
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::TokioIo;
    use lacewing_config::ListenerTlsMode as TlsMode;
    use lacewing_tls::{Identity, MeshCa, SpiffeId, TrustBundle, WorkloadKey};
    use tokio::net::TcpListener;

    use super::*;
    use crate::http::server::tests::{listener_state, upstream};

    fn id(service: &str) -> SpiffeId {
        SpiffeId::new("mesh.local", "default", service).unwrap()
    }

    fn issue(ca: &MeshCa, service: &str) -> Identity {
        let key = WorkloadKey::generate().unwrap();
        let issued = ca
            .sign(&key.csr_pem(&id(service)).unwrap(), &id(service))
            .unwrap();
        key.identity(&issued.cert_pem).unwrap()
    }

    struct Proxy {
        addr: SocketAddr,
        metrics: Metrics,
        trust: TrustBundle,
        ca: MeshCa,
        _drain: lacewing_core::drain::DrainTrigger,
    }

    /// Listener `main` of service `orders` on 127.0.0.1:0, served through TLS in `mode`.
    async fn proxy(mode: TlsMode) -> Proxy {
        let (ca, _) = MeshCa::generate("mesh.local").unwrap();
        let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
        let metrics = Metrics::new();
        let slot = HttpSlot::fixed(listener_state(upstream().await, &metrics));
        let identity = LiveIdentity::new();
        identity
            .install(
                issue(&ca, "orders"),
                trust.clone(),
                std::time::SystemTime::now() + ca.lifetime(),
            )
            .unwrap();
        let tls = Arc::new(DownstreamTls::new(
            "main",
            identity,
            mode,
            Duration::from_secs(10),
            &metrics,
        ));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (trigger, drain) = lacewing_core::drain::channel();
        tokio::task::spawn_local(async move {
            let mut id = 0;
            while let Ok((stream, remote)) = listener.accept().await {
                id += 1;
                tokio::task::spawn_local(serve_tcp(
                    stream,
                    tls.clone(),
                    remote,
                    addr,
                    id,
                    slot.clone(),
                    drain.clone(),
                ));
            }
        });
        Proxy {
            addr,
            metrics,
            trust,
            ca,
            _drain: trigger,
        }
    }

    /// GET `path` over HTTP/1.1 on `io`: the status and body, or the error.
    async fn get<I>(io: I, path: &str) -> Result<(u16, String), String>
    where
        I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| e.to_string())?;
        tokio::task::spawn_local(connection);
        let request = hyper::Request::get(path)
            .header("host", "orders")
            .body(Empty::<Bytes>::new())
            .unwrap();
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| e.to_string())?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.unwrap().to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }

    async fn get_tls(
        addr: SocketAddr,
        client: &Identity,
        trust: &TrustBundle,
        path: &str,
    ) -> Result<(u16, String), String> {
        let config = lacewing_tls::client_config(client, trust, &id("orders")).unwrap();
        let mut config = (*config).clone();
        config.alpn_protocols = vec![lacewing_tls::ALPN_HTTP11.to_vec()];
        let tcp = TcpStream::connect(addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(lacewing_tls::server_name_for(&id("orders")), tcp)
            .await
            .map_err(|e| e.to_string())?;
        get(stream, path).await
    }

    async fn get_plain(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
        get(TcpStream::connect(addr).await.unwrap(), path).await
    }

    fn handshakes(metrics: &Metrics, outcome: &str) -> u64 {
        metrics
            .downstream_tls_handshakes
            .with_label_values(&["main", outcome])
            .get()
    }

    fn transport(metrics: &Metrics, transport: &str) -> u64 {
        metrics
            .downstream_connections_by_transport
            .with_label_values(&["main", transport])
            .get()
    }

    /// Waits (yielding) until the server side has counted `outcome`: the
    /// client may see the refusal before the server's task records it.
    async fn counted(metrics: &Metrics, outcome: &str) -> u64 {
        for _ in 0..1000 {
            let n = handshakes(metrics, outcome);
            if n > 0 {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        0
    }

    fn run(test: impl std::future::Future<Output = ()>) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        tokio::task::LocalSet::new().block_on(&runtime, test);
    }

    #[test]
    fn strict_serves_mutual_tls_and_refuses_plaintext() {
        run(async {
            let proxy = proxy(TlsMode::Strict).await;
            let frontend = issue(&proxy.ca, "frontend");
            let answer = get_tls(proxy.addr, &frontend, &proxy.trust, "/over-tls").await;
            assert_eq!(answer.unwrap(), (200, "upstream saw /over-tls".to_string()));
            assert!(get_plain(proxy.addr, "/plain").await.is_err());
            assert_eq!(handshakes(&proxy.metrics, "ok"), 1);
            assert_eq!(counted(&proxy.metrics, "plaintext_refused").await, 1);
            assert_eq!(transport(&proxy.metrics, "plaintext"), 0);
        });
    }

    #[test]
    fn permissive_serves_tls_and_plaintext() {
        run(async {
            let proxy = proxy(TlsMode::Permissive).await;
            let frontend = issue(&proxy.ca, "frontend");
            let answer = get_tls(proxy.addr, &frontend, &proxy.trust, "/over-tls").await;
            assert_eq!(answer.unwrap(), (200, "upstream saw /over-tls".to_string()));
            let answer = get_plain(proxy.addr, "/plain").await;
            assert_eq!(answer.unwrap(), (200, "upstream saw /plain".to_string()));
            assert_eq!(transport(&proxy.metrics, "tls"), 1);
            assert_eq!(transport(&proxy.metrics, "plaintext"), 1);
        });
    }

    #[test]
    fn a_client_certified_by_another_ca_is_refused_and_counted() {
        run(async {
            let proxy = proxy(TlsMode::Permissive).await;
            let (foreign, _) = MeshCa::generate("mesh.local").unwrap();
            let stranger = issue(&foreign, "frontend");
            assert!(
                get_tls(proxy.addr, &stranger, &proxy.trust, "/")
                    .await
                    .is_err()
            );
            assert_eq!(counted(&proxy.metrics, "untrusted_certificate").await, 1);
            assert_eq!(transport(&proxy.metrics, "tls"), 0);
        });
    }

    #[test]
    fn garbage_after_a_handshake_byte_is_a_counted_protocol_failure() {
        run(async {
            use tokio::io::AsyncWriteExt;
            let proxy = proxy(TlsMode::Strict).await;
            let mut tcp = TcpStream::connect(proxy.addr).await.unwrap();
            tcp.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 0xde, 0xad, 0xbe, 0xef, 0x00])
                .await
                .unwrap();
            assert_eq!(counted(&proxy.metrics, "protocol").await, 1);
        });
    }
}
