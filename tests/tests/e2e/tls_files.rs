//! Support for tests of standalone proxies with identity files: a CA and
//! leaves made with rcgen in the test and written as PEM files, TLS clients
//! that present them, and a tap that records the bytes between two proxies.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use lacewing_tls::rustls::pki_types::{CertificateDer, ServerName};
use lacewing_tls::{Identity, SpiffeId, TrustBundle};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::client::TlsStream;

pub const TRUST_DOMAIN: &str = "example.org";

/// `spiffe://example.org/ns/default/sa/<service>`.
pub fn spiffe(service: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/ns/default/sa/{service}")
}

/// A certificate authority made in the test.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A leaf certificate and its key, as PEM.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

impl Leaf {
    pub fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem).unwrap()
    }

    /// The leaf's DER, to compare with what a peer presented.
    pub fn der(&self) -> CertificateDer<'static> {
        self.identity().leaf().clone()
    }
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).unwrap();
        Self {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for `service` with its SPIFFE ID as URI SAN, valid for an hour.
    pub fn leaf(&self, service: &str) -> Leaf {
        let now = SystemTime::now();
        self.leaf_valid(
            service,
            now - Duration::from_secs(60),
            now + Duration::from_secs(3600),
        )
    }

    /// A leaf for `service` valid from `not_before` to `not_after`.
    pub fn leaf_valid(&self, service: &str, not_before: SystemTime, not_after: SystemTime) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, TRUST_DOMAIN);
        dn.push(DnType::CommonName, service);
        params.distinguished_name = dn;
        params.subject_alt_names = vec![
            SanType::URI(spiffe(service).try_into().unwrap()),
            SanType::DnsName(format!("{service}.example.org").try_into().unwrap()),
        ];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = not_before.into();
        params.not_after = not_after.into();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    pub fn trust(&self) -> TrustBundle {
        TrustBundle::from_pem(&self.pem).unwrap()
    }
}

/// A directory holding one proxy's `cert.pem`, `key.pem` and `ca.pem`.
pub struct Files {
    dir: tempfile::TempDir,
}

impl Files {
    pub fn new(leaf: &Leaf, ca: &Ca) -> Self {
        let files = Self {
            dir: tempfile::tempdir().unwrap(),
        };
        files.write(leaf);
        std::fs::write(files.path("ca.pem"), &ca.pem).unwrap();
        files
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces the certificate and key (a rotation).
    pub fn write(&self, leaf: &Leaf) {
        std::fs::write(self.path("cert.pem"), &leaf.cert_pem).unwrap();
        std::fs::write(self.path("key.pem"), &leaf.key_pem).unwrap();
    }

    /// The top-level `tls` block naming these files.
    pub fn yaml(&self) -> String {
        format!(
            "tls:\n  cert_file: {}\n  key_file: {}\n  trust_file: {}\n",
            self.path("cert.pem").display(),
            self.path("key.pem").display(),
            self.path("ca.pem").display()
        )
    }
}

/// Opens mutual TLS to `addr` presenting `client`, expecting the server to
/// be `expect` and chain to `trust`, offering `alpn` (none when empty).
pub async fn connect(
    addr: SocketAddr,
    client: &Identity,
    trust: &TrustBundle,
    expect: &str,
    alpn: &[&[u8]],
) -> std::io::Result<TlsStream<TcpStream>> {
    let expect: SpiffeId = expect.parse().unwrap();
    let config = lacewing_tls::client_config(client, trust, &expect).unwrap();
    let mut config = (*config).clone();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("proxy.example.org").unwrap(), tcp)
        .await
}

/// Sends an HTTP/1.1 GET over `stream` and returns the whole answer (empty
/// when the server closed instead of answering).
pub async fn raw_get<S>(stream: &mut S, path: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!("GET {path} HTTP/1.1\r\nhost: test\r\nconnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

/// The bytes a [`tap`] saw: toward the target, and back.
pub type Captured = Arc<Mutex<(Vec<u8>, Vec<u8>)>>;

/// A relay on 127.0.0.1:0 to `target` that records what crosses it.
pub async fn tap(target: SocketAddr) -> (SocketAddr, Captured) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let captured: Captured = Arc::default();
    let record = captured.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = TcpStream::connect(target).await else {
                continue;
            };
            let (client_read, client_write) = client.into_split();
            let (server_read, server_write) = server.into_split();
            tokio::spawn(copy(client_read, server_write, record.clone(), true));
            tokio::spawn(copy(server_read, client_write, record.clone(), false));
        }
    });
    (addr, captured)
}

async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    captured: Captured,
    toward_target: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = from.read(&mut buf).await {
        if n == 0 {
            break;
        }
        {
            let mut both = captured.lock().unwrap_or_else(PoisonError::into_inner);
            let side = if toward_target {
                &mut both.0
            } else {
                &mut both.1
            };
            side.extend_from_slice(&buf[..n]);
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Whether `needle` appears in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
