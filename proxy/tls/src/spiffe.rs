//! SPIFFE IDs of mesh workloads: `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`.

use std::fmt;
use std::str::FromStr;

use crate::TlsError;

/// The identity of one mesh service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service: String,
}

impl SpiffeId {
    /// The ID of `service` in `namespace` of `trust_domain`, validated as the
    /// SPIFFE specification asks (a trust domain of lowercase letters, digits,
    /// `.`, `-`, `_`; path segments of letters, digits, `.`, `-`, `_`).
    pub fn new(trust_domain: &str, namespace: &str, service: &str) -> Result<Self, TlsError> {
        let id = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service}");
        let invalid = |reason| TlsError::Spiffe {
            id: id.clone(),
            reason,
        };
        if trust_domain.is_empty() || trust_domain.len() > 255 {
            return Err(invalid("the trust domain must have 1 to 255 characters"));
        }
        if !trust_domain
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-._".contains(&b))
        {
            return Err(invalid(
                "the trust domain may hold only lowercase letters, digits, '.', '-' and '_'",
            ));
        }
        for segment in [namespace, service] {
            if segment.is_empty() || segment == "." || segment == ".." {
                return Err(invalid("a path segment is empty, '.' or '..'"));
            }
            if !segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b))
            {
                return Err(invalid(
                    "a path segment may hold only letters, digits, '.', '-' and '_'",
                ));
            }
        }
        if id.len() > 2048 {
            return Err(invalid("longer than 2048 bytes"));
        }
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service: service.to_string(),
        })
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// The URI form, as carried in a certificate's URI SAN.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service
        )
    }
}

impl FromStr for SpiffeId {
    type Err = TlsError;

    /// Parses the mesh's workload form only (`/ns/<namespace>/sa/<service>`).
    fn from_str(s: &str) -> Result<Self, TlsError> {
        let invalid = |reason| TlsError::Spiffe {
            id: s.to_string(),
            reason,
        };
        let rest = s
            .strip_prefix("spiffe://")
            .ok_or_else(|| invalid("does not start with spiffe://"))?;
        let (trust_domain, path) = rest.split_once('/').ok_or_else(|| invalid("has no path"))?;
        let parts: Vec<&str> = path.split('/').collect();
        match parts.as_slice() {
            ["ns", namespace, "sa", service] => Self::new(trust_domain, namespace, service),
            _ => Err(invalid("the path is not /ns/<namespace>/sa/<service>")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses_the_workload_form() {
        let id = SpiffeId::new("mesh.local", "default", "orders").unwrap();
        assert_eq!(id.uri(), "spiffe://mesh.local/ns/default/sa/orders");
        assert_eq!(id.uri().parse::<SpiffeId>().unwrap(), id);
    }

    #[test]
    fn refuses_malformed_ids() {
        for bad in [
            "http://mesh.local/ns/default/sa/orders",
            "spiffe://mesh.local",
            "spiffe://Mesh.Local/ns/default/sa/orders",
            "spiffe://mesh.local/ns/default/sa/",
            "spiffe://mesh.local/ns/../sa/orders",
            "spiffe://mesh.local/ns/default/sa/orders/extra",
            "spiffe://mesh.local/ns/default/sa/or ders",
            "spiffe:///ns/default/sa/orders",
        ] {
            let error = bad.parse::<SpiffeId>().unwrap_err();
            assert!(matches!(error, TlsError::Spiffe { .. }), "{bad}: {error}");
        }
    }
}
