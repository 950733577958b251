//! The mesh certificate authority: a root (generated or supplied) that signs
//! workload CSRs into short-lived certificates whose only URI SAN is the
//! SPIFFE ID the caller is entitled to. Persisting the root is the control
//! plane's business; this type only holds it.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use crate::{Identity, SpiffeId, TlsError};

/// The default lifetime of a workload certificate.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The shortest lifetime accepted (tests use minutes).
pub const MIN_LIFETIME: Duration = Duration::from_secs(60);
/// How long a root generated here is valid.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Tolerated clock skew between the CA and its workloads.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why a CSR was refused.
#[derive(Debug, thiserror::Error)]
pub enum CsrError {
    #[error("CSR does not parse or its signature is invalid: {0}")]
    Malformed(String),
    #[error("CSR asks for {found}, but the caller is {expected}")]
    WrongIdentity { expected: String, found: String },
    #[error("CSR asks to be a CA")]
    AsksForCa,
    #[error("signing: {0}")]
    Signing(String),
}

/// A certificate the CA issued.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The leaf, PEM.
    pub cert_pem: String,
    pub not_after: SystemTime,
}

/// The mesh CA.
pub struct MeshCa {
    issuer: Issuer<'static, KeyPair>,
    root_pem: String,
    lifetime: Duration,
}

impl std::fmt::Debug for MeshCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshCa")
            .field("lifetime", &self.lifetime)
            .finish_non_exhaustive()
    }
}

impl MeshCa {
    /// A new root for `trust_domain`. Returns the CA and the root key (PEM),
    /// which the caller stores.
    pub fn generate(trust_domain: &str) -> Result<(Self, String), TlsError> {
        let key = KeyPair::generate().map_err(|e| TlsError::Key(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, trust_domain);
        name.push(DnType::CommonName, "Lacewing mesh root");
        params.distinguished_name = name;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + ROOT_LIFETIME).into();
        let root = params
            .self_signed(&key)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let key_pem = key.serialize_pem();
        let ca = Self {
            issuer: Issuer::new(params, key),
            root_pem: root.pem(),
            lifetime: DEFAULT_LIFETIME,
        };
        Ok((ca, key_pem))
    }

    /// A root the operator supplies (or one stored earlier): its certificate
    /// and key, PEM. The certificate must be a CA for that key.
    pub fn from_pem(root_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        let key = KeyPair::from_pem(key_pem).map_err(|e| TlsError::Key(e.to_string()))?;
        let root = crate::identity::certificates_from_pem(root_pem, "CA certificate")?;
        let (_, parsed) = x509_parser::parse_x509_certificate(root[0].as_ref())
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        if !parsed.is_ca() {
            return Err(TlsError::Certificate(
                "the CA certificate is not a CA (basicConstraints cA is not set)".to_string(),
            ));
        }
        if parsed.public_key().raw != rcgen::PublicKeyData::subject_public_key_info(&key) {
            return Err(TlsError::Certificate(
                "the CA key does not match the CA certificate".to_string(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&root[0], key)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        Ok(Self {
            issuer,
            root_pem: root_pem.to_string(),
            lifetime: DEFAULT_LIFETIME,
        })
    }

    /// Sets the lifetime of the certificates issued from now on.
    pub fn set_lifetime(&mut self, lifetime: Duration) -> Result<(), TlsError> {
        if lifetime < MIN_LIFETIME {
            return Err(TlsError::Certificate(format!(
                "certificate lifetime {lifetime:?} is shorter than {MIN_LIFETIME:?}"
            )));
        }
        self.lifetime = lifetime;
        Ok(())
    }

    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }

    /// The root certificate, PEM: the trust bundle workloads verify against.
    pub fn root_pem(&self) -> &str {
        &self.root_pem
    }

    /// A server certificate and its new key for the control plane's own API,
    /// naming `names` (IP addresses become IP SANs, the others DNS SANs),
    /// valid for `lifetime`. Its only extended key usage is server auth, so
    /// it cannot pass for a workload.
    pub fn issue_server(
        &self,
        names: &[String],
        lifetime: Duration,
    ) -> Result<(Identity, SystemTime), TlsError> {
        let key = KeyPair::generate().map_err(|e| TlsError::Key(e.to_string()))?;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, "Lacewing control plane");
        params.distinguished_name = name;
        for name in names {
            let san = match name.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(name.as_str().try_into().map_err(|_| {
                    TlsError::Certificate(format!("`{name}` is not a DNS name or an IP address"))
                })?),
            };
            params.subject_alt_names.push(san);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        let not_after = now + lifetime;
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(SerialNumber::from_slice(&rand_serial()));
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| TlsError::Certificate(e.to_string()))?;
        let identity = Identity::from_pem(&cert.pem(), &key.serialize_pem())?;
        Ok((identity, not_after))
    }

    /// Signs `csr_pem` for `caller`, the identity the control plane knows
    /// the requester by. The CSR must ask for exactly that SPIFFE ID (and no
    /// other name); everything else in the certificate is the CA's choice
    /// (validity, key usages, no CA bit), only the public key is taken.
    pub fn sign(&self, csr_pem: &str, caller: &SpiffeId) -> Result<Issued, CsrError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CsrError::Malformed(e.to_string()))?;
        let expected = caller.uri();
        let requested: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                SanType::URI(uri) => uri.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if requested.len() != 1 || requested[0] != expected {
            let found = if requested.is_empty() {
                "no name".to_string()
            } else {
                requested.join(",")
            };
            return Err(CsrError::WrongIdentity { expected, found });
        }
        if matches!(csr.params.is_ca, IsCa::Ca(_)) {
            return Err(CsrError::AsksForCa);
        }
        let now = SystemTime::now();
        let not_after = now + self.lifetime;
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::OrganizationName, caller.trust_domain());
        name.push(DnType::CommonName, caller.service());
        params.distinguished_name = name;
        params.subject_alt_names = csr.params.subject_alt_names.clone();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.not_before = (now - BACKDATE).into();
        params.not_after = not_after.into();
        params.serial_number = Some(SerialNumber::from_slice(&rand_serial()));
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let cert = csr
            .signed_by(&self.issuer)
            .map_err(|e| CsrError::Signing(e.to_string()))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            not_after,
        })
    }
}

/// 16 random bytes with the top bit clear (a positive serial).
fn rand_serial() -> [u8; 16] {
    let mut serial: [u8; 16] = rand::random();
    serial[0] &= 0x7f;
    serial
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::{FromDer, X509Certificate};

    use super::*;
    use crate::{PeerCertificate, WorkloadKey};

    fn orders() -> SpiffeId {
        SpiffeId::new("mesh.local", "default", "orders").unwrap()
    }

    fn der(pem: &str) -> rustls::pki_types::CertificateDer<'static> {
        crate::identity::certificates_from_pem(pem, "test").unwrap()[0].clone()
    }

    #[test]
    fn signs_a_csr_into_a_short_lived_workload_certificate() {
        let (mut ca, _key) = MeshCa::generate("mesh.local").unwrap();
        assert_eq!(ca.lifetime(), DEFAULT_LIFETIME);
        ca.set_lifetime(Duration::from_secs(300)).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let issued = ca
            .sign(&key.csr_pem(&orders()).unwrap(), &orders())
            .unwrap();

        let leaf = der(&issued.cert_pem);
        let (_, cert) = X509Certificate::from_der(leaf.as_ref()).unwrap();
        let lifetime =
            cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp();
        // Five minutes plus the minute it is backdated by.
        assert_eq!(lifetime, 360);
        assert!(!cert.is_ca());
        let peer = PeerCertificate::parse(&leaf).unwrap();
        assert_eq!(
            peer.uri_sans,
            vec!["spiffe://mesh.local/ns/default/sa/orders".to_string()]
        );
        assert_eq!(peer.spiffe, Some(orders()));
        assert_eq!(peer.subject, "O=mesh.local, CN=orders");
        // The issued certificate carries the sidecar's own public key.
        assert!(key.identity(&issued.cert_pem).is_ok());
        let other = WorkloadKey::generate().unwrap();
        assert!(other.identity(&issued.cert_pem).is_err());
    }

    #[test]
    fn refuses_a_csr_for_another_services_identity() {
        let (ca, _) = MeshCa::generate("mesh.local").unwrap();
        let key = WorkloadKey::generate().unwrap();
        let payments = SpiffeId::new("mesh.local", "default", "payments").unwrap();
        let error = ca
            .sign(&key.csr_pem(&payments).unwrap(), &orders())
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "CSR asks for spiffe://mesh.local/ns/default/sa/payments, \
             but the caller is spiffe://mesh.local/ns/default/sa/orders"
        );
    }

    #[test]
    fn refuses_a_csr_with_extra_names_or_a_bad_signature() {
        let (ca, _) = MeshCa::generate("mesh.local").unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(vec!["orders.example".to_string()]).unwrap();
        params
            .subject_alt_names
            .push(SanType::URI(orders().uri().try_into().unwrap()));
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        assert!(matches!(
            ca.sign(&csr, &orders()),
            Err(CsrError::WrongIdentity { .. })
        ));

        let good = WorkloadKey::generate().unwrap().csr_pem(&orders()).unwrap();
        // Flip one byte in the middle of the base64 body: the signature no longer holds.
        let mut tampered = good.into_bytes();
        let at = tampered.len() / 2;
        tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(tampered).unwrap();
        assert!(matches!(
            ca.sign(&tampered, &orders()),
            Err(CsrError::Malformed(_))
        ));
        assert!(matches!(
            ca.sign("not a csr", &orders()),
            Err(CsrError::Malformed(_))
        ));
    }

    #[test]
    fn refuses_a_lifetime_under_a_minute() {
        let (mut ca, _) = MeshCa::generate("mesh.local").unwrap();
        assert!(ca.set_lifetime(Duration::from_secs(59)).is_err());
        assert!(ca.set_lifetime(MIN_LIFETIME).is_ok());
    }

    #[test]
    fn a_stored_or_supplied_root_signs_like_the_original() {
        let (ca, key_pem) = MeshCa::generate("mesh.local").unwrap();
        let reloaded = MeshCa::from_pem(ca.root_pem(), &key_pem).unwrap();
        assert_eq!(reloaded.root_pem(), ca.root_pem());
        let workload = WorkloadKey::generate().unwrap();
        let issued = reloaded
            .sign(&workload.csr_pem(&orders()).unwrap(), &orders())
            .unwrap();
        // Chains to the original root.
        let leaf_der = der(&issued.cert_pem);
        let (_, leaf) = X509Certificate::from_der(leaf_der.as_ref()).unwrap();
        let root_der = der(ca.root_pem());
        let (_, root) = X509Certificate::from_der(root_der.as_ref()).unwrap();
        leaf.verify_signature(Some(root.public_key())).unwrap();

        // A key that is not the root's, and a leaf that is not a CA, are refused.
        let (other, other_key) = MeshCa::generate("mesh.local").unwrap();
        let error = MeshCa::from_pem(ca.root_pem(), &other_key).unwrap_err();
        assert_eq!(
            error.to_string(),
            "certificate: the CA key does not match the CA certificate"
        );
        let error = MeshCa::from_pem(&issued.cert_pem, &key_pem).unwrap_err();
        assert!(error.to_string().contains("is not a CA"), "{error}");
        drop(other);
    }
}
