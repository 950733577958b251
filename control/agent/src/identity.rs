//! The sidecar's workload identity: it generates a key (which never leaves
//! the process), asks the control plane to certify it with a CSR on the
//! stream, installs the certificate it gets back into the [`LiveIdentity`]
//! the proxy's handshakes read, and asks again at two thirds of the
//! certificate's lifetime. A rotation only changes what new handshakes use.
//! The key and certificate are kept in the sidecar's state directory (0600),
//! so a restarted sidecar serves with them while the control plane is away.
//!
//! While the mesh root rotates, snapshots carry a new trust bundle (installed
//! with the same certificate, before the snapshot is ACKed) and then name a
//! new signing root: a certificate another root signed is replaced at once.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lacewing_control_api as api;

use crate::cache::Cache;
use lacewing_tls::{LiveIdentity, SpiffeId, TrustBundle, WorkloadKey};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{Gauge, Opts};

/// Why a certificate from the control plane was not installed.
#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("a certificate arrived but no request is outstanding")]
    Unrequested,
    #[error("the certificate does not fit: {0}")]
    Material(#[from] lacewing_tls::TlsError),
}

/// The identity side of one sidecar's agent.
#[derive(Debug)]
pub struct WorkloadIdentity {
    live: Arc<LiveIdentity>,
    /// Learned from the control plane's snapshots.
    trust_domain: Option<String>,
    /// The key of the CSR in flight.
    pending: Option<WorkloadKey>,
    /// The chain installed last (PEM), to tell a new certificate.
    installed: String,
    rotate_at: Option<Instant>,
    /// The key and certificate installed last (the certificate with the
    /// bundle in use), to install a new bundle with them.
    current: Option<(WorkloadKey, api::WorkloadCertificate)>,
    /// The root new certificates come from, as the last snapshot named it.
    signing_root: String,
}

impl WorkloadIdentity {
    /// Until a snapshot names the mesh's trust domain, the default one is
    /// assumed (a request in another domain is refused, and asked again).
    pub fn new(live: Arc<LiveIdentity>) -> Self {
        Self {
            live,
            trust_domain: Some(lacewing_tls::DEFAULT_TRUST_DOMAIN.to_string()),
            pending: None,
            installed: String::new(),
            rotate_at: None,
            current: None,
            signing_root: String::new(),
        }
    }

    /// The sha256 of the root that signed the certificate in use (empty: none).
    pub fn certificate_root(&self) -> &str {
        self.current
            .as_ref()
            .map_or("", |(_, cert)| cert.root_sha256.as_str())
    }

    /// When the certificate in use expires (Unix ms; 0: none).
    pub fn certificate_not_after_ms(&self) -> u64 {
        self.current
            .as_ref()
            .map_or(0, |(_, cert)| cert.not_after_ms)
    }

    /// The trust bundle in use, PEM (empty: none yet).
    pub fn trust_bundle_pem(&self) -> &str {
        self.current
            .as_ref()
            .map_or("", |(_, cert)| cert.trust_bundle_pem.as_str())
    }

    /// Whether the certificate in use comes from a root other than the one
    /// the control plane signs with now.
    fn signed_by_another_root(&self) -> bool {
        !self.signing_root.is_empty()
            && self.current.is_some()
            && self.certificate_root() != self.signing_root
    }

    pub fn live(&self) -> &Arc<LiveIdentity> {
        &self.live
    }

    /// A new key and its CSR for `namespace/service`, once the trust domain
    /// is known; the key waits for the certificate.
    pub fn request(
        &mut self,
        namespace: &str,
        service: &str,
    ) -> Result<Option<api::CertificateRequest>, lacewing_tls::TlsError> {
        let Some(domain) = &self.trust_domain else {
            return Ok(None);
        };
        let id = SpiffeId::new(domain, namespace, service)?;
        let key = WorkloadKey::generate()?;
        let csr_pem = key.csr_pem(&id)?;
        self.pending = Some(key);
        // Until the answer comes, no second request.
        self.rotate_at = None;
        Ok(Some(api::CertificateRequest { csr_pem }))
    }

    /// Whether a request should be sent now: none was answered on this
    /// stream yet, or the certificate reached two thirds of its lifetime.
    pub fn wants_certificate(&self) -> bool {
        self.trust_domain.is_some()
            && self.pending.is_none()
            && (self.live.current().is_none()
                || self.signed_by_another_root()
                || self.rotate_at.is_some_and(|at| Instant::now() >= at))
    }

    /// When the next rotation is due.
    pub fn rotate_at(&self) -> Option<Instant> {
        self.rotate_at
    }

    /// Learns the trust domain a snapshot names; a request made in another
    /// domain will not be answered, so it is forgotten.
    pub fn learn(&mut self, snapshot: &api::Snapshot) {
        if !snapshot.trust_domain.is_empty()
            && self.trust_domain.as_deref() != Some(snapshot.trust_domain.as_str())
        {
            self.trust_domain = Some(snapshot.trust_domain.clone());
            self.pending = None;
        }
    }

    /// Takes what a snapshot says about identity: the trust domain, and a
    /// certificate not installed yet, which is also kept in `cache`. Returns
    /// whether one was installed.
    pub fn take(&mut self, snapshot: &api::Snapshot, cache: &Cache) -> Result<bool, IdentityError> {
        self.learn(snapshot);
        if !snapshot.signing_root_sha256.is_empty() {
            self.signing_root = snapshot.signing_root_sha256.clone();
        }
        let new_certificate = snapshot
            .certificate
            .as_ref()
            .filter(|cert| cert.chain_pem != self.installed);
        let (key, mut cert) = match new_certificate {
            Some(cert) => {
                let key = self.pending.take().ok_or(IdentityError::Unrequested)?;
                (key, cert.clone())
            }
            // The same certificate, perhaps with a new bundle.
            None => match &self.current {
                Some((key, cert))
                    if !snapshot.trust_bundle_pem.is_empty()
                        && snapshot.trust_bundle_pem != cert.trust_bundle_pem =>
                {
                    (WorkloadKey::from_pem(&key.to_pem())?, cert.clone())
                }
                _ => return Ok(false),
            },
        };
        // The snapshot's bundle is the newest.
        if !snapshot.trust_bundle_pem.is_empty() {
            cert.trust_bundle_pem = snapshot.trust_bundle_pem.clone();
        }
        self.install(&key, &cert)?;
        if let Err(error) = cache.save_identity(&key.to_pem(), &cert) {
            tracing::warn!(%error, "cannot keep the workload certificate on disk");
        }
        self.current = Some((key, cert));
        Ok(new_certificate.is_some())
    }

    /// Installs the certificate kept in `cache`, unless it expired.
    pub fn restore(&mut self, cache: &Cache) {
        let Some((key_pem, cert)) = cache.load_identity() else {
            return;
        };
        if UNIX_EPOCH + Duration::from_millis(cert.not_after_ms) <= SystemTime::now() {
            return;
        }
        let restored = WorkloadKey::from_pem(&key_pem)
            .map_err(IdentityError::from)
            .and_then(|key| self.install(&key, &cert).map(|()| key));
        match restored {
            Ok(key) => self.current = Some((key, cert)),
            Err(error) => tracing::warn!(%error, "the kept workload certificate is not usable"),
        }
    }

    fn install(
        &mut self,
        key: &WorkloadKey,
        cert: &api::WorkloadCertificate,
    ) -> Result<(), IdentityError> {
        let identity = key.identity(&cert.chain_pem)?;
        let trust = TrustBundle::from_pem(&cert.trust_bundle_pem)?;
        let not_after = UNIX_EPOCH + Duration::from_millis(cert.not_after_ms);
        let material = self.live.install(identity, trust, not_after)?;
        self.installed = cert.chain_pem.clone();
        let lifetime = cert.not_after_ms.saturating_sub(cert.not_before_ms);
        let left = not_after
            .duration_since(SystemTime::now())
            .unwrap_or_default();
        // Two thirds into the lifetime, measured from now on this clock.
        let until_rotation = left.saturating_sub(Duration::from_millis(lifetime / 3));
        self.rotate_at = Some(Instant::now() + until_rotation);
        tracing::info!(
            id = %material.id,
            serial = material.serial,
            rotate_in = ?until_rotation,
            "workload certificate installed"
        );
        Ok(())
    }
}

/// `sidecar_certificate_expiry_seconds`: seconds until the workload
/// certificate in use expires, computed when scraped (absent before the first).
#[derive(Debug)]
pub struct ExpiryCollector {
    live: Arc<LiveIdentity>,
    desc: Vec<Desc>,
    gauge: Gauge,
}

impl ExpiryCollector {
    pub fn new(live: Arc<LiveIdentity>) -> Result<Self, prometheus::Error> {
        let gauge = Gauge::with_opts(Opts::new(
            "sidecar_certificate_expiry_seconds",
            "Seconds until the workload certificate in use expires.",
        ))?;
        let desc = gauge.desc().into_iter().cloned().collect();
        Ok(Self { live, desc, gauge })
    }
}

impl Collector for ExpiryCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.desc.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Some(material) = self.live.current() else {
            return Vec::new();
        };
        let left = match material.not_after.duration_since(SystemTime::now()) {
            Ok(d) => d.as_secs_f64(),
            Err(e) => -e.duration().as_secs_f64(),
        };
        self.gauge.set(left);
        self.gauge.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lacewing_tls::MeshCa;

    fn answer(ca: &MeshCa, request: &api::CertificateRequest, service: &str) -> api::Snapshot {
        let id = SpiffeId::new("lacewing.local", "default", service).unwrap();
        let issued = ca.sign(&request.csr_pem, &id).unwrap();
        let ms = |t: SystemTime| t.duration_since(UNIX_EPOCH).unwrap().as_millis() as u64;
        api::Snapshot {
            trust_domain: "lacewing.local".into(),
            certificate: Some(api::WorkloadCertificate {
                chain_pem: issued.cert_pem,
                trust_bundle_pem: ca.root_pem().to_string(),
                not_before_ms: ms(SystemTime::now()),
                not_after_ms: ms(issued.not_after),
                spiffe_id: id.uri(),
                root_sha256: String::new(),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_certificate_is_installed_kept_and_restored() {
        let (ca, _) = MeshCa::generate("lacewing.local").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let mut identity = WorkloadIdentity::new(LiveIdentity::new());
        assert!(identity.wants_certificate());
        let request = identity.request("default", "orders").unwrap().unwrap();
        assert!(!identity.wants_certificate(), "one request at a time");
        let snapshot = answer(&ca, &request, "orders");
        assert!(identity.take(&snapshot, &cache).unwrap());
        // The same certificate again is not a new one.
        assert!(!identity.take(&snapshot, &cache).unwrap());
        let installed = identity.live().current().unwrap();
        assert_eq!(
            installed.id.uri(),
            "spiffe://lacewing.local/ns/default/sa/orders"
        );
        // Rotation is due two thirds into the 24 h lifetime.
        let due = identity.rotate_at().unwrap() - Instant::now();
        assert!(due > Duration::from_secs(15 * 3600) && due <= Duration::from_secs(16 * 3600));

        let mut restarted = WorkloadIdentity::new(LiveIdentity::new());
        restarted.restore(&cache);
        assert_eq!(
            restarted.live().current().unwrap().identity.leaf(),
            installed.identity.leaf()
        );
    }

    #[test]
    fn a_snapshot_naming_another_signing_root_asks_for_a_certificate_at_once() {
        let (ca, _) = MeshCa::generate("lacewing.local").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let mut identity = WorkloadIdentity::new(LiveIdentity::new());
        let request = identity.request("default", "orders").unwrap().unwrap();
        let mut snapshot = answer(&ca, &request, "orders");
        snapshot.signing_root_sha256 = "old".into();
        snapshot.certificate.as_mut().unwrap().root_sha256 = "old".into();
        assert!(identity.take(&snapshot, &cache).unwrap());
        assert!(!identity.wants_certificate(), "not due before two thirds");
        let not_after = snapshot.certificate.as_ref().unwrap().not_after_ms;
        assert_eq!(identity.certificate_not_after_ms(), not_after);
        assert_eq!(identity.certificate_root(), "old");

        // The next snapshot (no certificate in it) names a new signing root.
        let next = api::Snapshot {
            trust_domain: "lacewing.local".into(),
            signing_root_sha256: "new".into(),
            ..Default::default()
        };
        assert!(!identity.take(&next, &cache).unwrap());
        assert!(identity.wants_certificate());
        // A snapshot naming no root (an older control plane) changes nothing.
        let silent = api::Snapshot {
            trust_domain: "lacewing.local".into(),
            ..Default::default()
        };
        identity.take(&silent, &cache).unwrap();
        assert!(identity.wants_certificate());
    }

    #[test]
    fn an_unrequested_certificate_or_one_for_another_key_is_refused() {
        let (ca, _) = MeshCa::generate("lacewing.local").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::open(dir.path()).unwrap();
        let mut other = WorkloadIdentity::new(LiveIdentity::new());
        let request = other.request("default", "orders").unwrap().unwrap();
        let snapshot = answer(&ca, &request, "orders");

        let mut identity = WorkloadIdentity::new(LiveIdentity::new());
        assert!(matches!(
            identity.take(&snapshot, &cache),
            Err(IdentityError::Unrequested)
        ));
        identity.request("default", "orders").unwrap();
        assert!(matches!(
            identity.take(&snapshot, &cache),
            Err(IdentityError::Material(_))
        ));
        assert!(identity.live().current().is_none());
    }
}
