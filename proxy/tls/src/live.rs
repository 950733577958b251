//! A workload's current identity, swappable while it serves: the certificate
//! the mesh CA issued last, its key, and the trust bundle. Installing a new
//! one (rotation) changes what new handshakes present and verify against;
//! established connections keep the identity they were made with.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use arc_swap::ArcSwapOption;
use rustls::{ClientConfig, ServerConfig};

use crate::{Identity, SpiffeId, TlsError, TrustBundle};

/// One installed identity with the configurations made from it.
#[derive(Debug)]
pub struct Material {
    pub identity: Identity,
    pub trust: TrustBundle,
    /// The SPIFFE ID of the leaf.
    pub id: SpiffeId,
    pub not_after: SystemTime,
    /// Counts installs: 1 for the first identity.
    pub serial: u64,
    server: Arc<ServerConfig>,
}

impl Material {
    /// Checks `identity` (its leaf must carry a SPIFFE ID) and makes the
    /// server configuration presenting it, verifying clients against `trust`.
    /// Not installed yet: see [`LiveIdentity::store`].
    pub fn build(
        identity: Identity,
        trust: TrustBundle,
        not_after: SystemTime,
    ) -> Result<Self, TlsError> {
        let uris = crate::uri_sans(identity.leaf())?;
        let id: SpiffeId = uris
            .first()
            .and_then(|u| u.parse().ok())
            .ok_or_else(|| TlsError::Certificate("the leaf has no SPIFFE ID".to_string()))?;
        let server = crate::server_config(&identity, &trust)?;
        Ok(Self {
            identity,
            trust,
            id,
            not_after,
            serial: 0,
            server,
        })
    }

    /// The server configuration presenting this identity.
    pub fn server_config(&self) -> &Arc<ServerConfig> {
        &self.server
    }
}

/// The identity a sidecar serves with now; `None` until the first install.
#[derive(Debug, Default)]
pub struct LiveIdentity {
    current: ArcSwapOption<Material>,
    serial: Mutex<u64>,
}

impl LiveIdentity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Makes `identity` (verified against `trust`) the one new handshakes use.
    pub fn install(
        &self,
        identity: Identity,
        trust: TrustBundle,
        not_after: SystemTime,
    ) -> Result<Arc<Material>, TlsError> {
        Ok(self.store(Material::build(identity, trust, not_after)?))
    }

    /// Makes a built `material` the one new handshakes use; it gets the next serial.
    pub fn store(&self, mut material: Material) -> Arc<Material> {
        let mut serial = self.serial.lock().unwrap_or_else(PoisonError::into_inner);
        *serial += 1;
        material.serial = *serial;
        let material = Arc::new(material);
        self.current.store(Some(material.clone()));
        material
    }

    /// The identity in use, if one was installed.
    pub fn current(&self) -> Option<Arc<Material>> {
        self.current.load_full()
    }
}

/// A client configuration and the identity it presents.
pub type BuiltClientConfig = (Arc<ClientConfig>, Arc<Material>);

/// A client configuration for one destination that follows the live
/// identity: rebuilt when a new identity was installed since the last use.
#[derive(Debug)]
pub struct LiveClientConfig {
    live: Arc<LiveIdentity>,
    expect: SpiffeId,
    alpn: Vec<Vec<u8>>,
    built: Mutex<Option<(u64, Arc<ClientConfig>)>>,
}

impl LiveClientConfig {
    /// Expects the server to be `expect`, offering `alpn` (one protocol: the
    /// one the cluster speaks).
    pub fn new(live: Arc<LiveIdentity>, expect: SpiffeId, alpn: Vec<Vec<u8>>) -> Self {
        Self {
            live,
            expect,
            alpn,
            built: Mutex::new(None),
        }
    }

    pub fn expect(&self) -> &SpiffeId {
        &self.expect
    }

    /// The configuration for the identity in use; `None` before any install.
    pub fn get(&self) -> Option<Result<Arc<ClientConfig>, TlsError>> {
        self.get_with_material()
            .map(|built| built.map(|(config, _)| config))
    }

    /// [`LiveClientConfig::get`], with the identity the configuration presents.
    pub fn get_with_material(&self) -> Option<Result<BuiltClientConfig, TlsError>> {
        let material = self.live.current()?;
        let mut built = self.built.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((serial, config)) = &*built
            && *serial == material.serial
        {
            return Some(Ok((config.clone(), material)));
        }
        let config = match crate::client_config(&material.identity, &material.trust, &self.expect) {
            Ok(config) => config,
            Err(e) => return Some(Err(e)),
        };
        let mut config = (*config).clone();
        config.alpn_protocols = self.alpn.clone();
        let config = Arc::new(config);
        *built = Some((material.serial, config.clone()));
        Some(Ok((config, material)))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{MeshCa, WorkloadKey};

    fn issue(ca: &MeshCa, service: &str) -> (Identity, SystemTime) {
        let id = SpiffeId::new("mesh.local", "default", service).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        (key.identity(&issued.cert_pem).unwrap(), issued.not_after)
    }

    #[test]
    fn a_new_install_replaces_the_identity_and_rebuilds_client_configs() {
        let (mut ca, _) = MeshCa::generate("mesh.local").unwrap();
        ca.set_lifetime(Duration::from_secs(120)).unwrap();
        let trust = TrustBundle::from_pem(ca.root_pem()).unwrap();
        let live = LiveIdentity::new();
        let orders = SpiffeId::new("mesh.local", "default", "orders").unwrap();
        let client = LiveClientConfig::new(live.clone(), orders, vec![b"h2".to_vec()]);
        assert!(live.current().is_none());
        assert!(client.get().is_none());

        let (first, not_after) = issue(&ca, "frontend");
        let installed = live.install(first, trust.clone(), not_after).unwrap();
        assert_eq!(installed.serial, 1);
        assert_eq!(installed.id.service(), "frontend");
        let a = client.get().unwrap().unwrap();
        let again = client.get().unwrap().unwrap();
        assert!(Arc::ptr_eq(&a, &again));
        assert_eq!(a.alpn_protocols, vec![b"h2".to_vec()]);

        let (second, not_after) = issue(&ca, "frontend");
        let leaf = second.leaf().clone();
        live.install(second, trust, not_after).unwrap();
        assert_eq!(live.current().unwrap().identity.leaf(), &leaf);
        let b = client.get().unwrap().unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
    }
}
