//! Keys and the sealed-value format: `lws1:<key id>:<base64url(nonce ‖ ciphertext ‖ tag)>`,
//! AES-256-GCM with a random 96-bit nonce and the field's name as associated
//! data (a sealed value moved to another field does not open).

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde::Deserialize;

/// Marks a sealed value.
pub const PREFIX: &str = "lws1:";

/// A key as configured.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyConfig {
    /// Its id, written into every value it seals.
    pub id: String,
    /// 32 bytes, standard base64.
    pub key: String,
}

/// The configured keys; seals with the active one, opens with any.
pub struct Keyring {
    keys: Vec<(String, Aes256Gcm)>,
    active: usize,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ids: Vec<&str> = self.keys.iter().map(|(id, _)| id.as_str()).collect();
        f.debug_struct("Keyring")
            .field("ids", &ids)
            .field("active", &ids[self.active])
            .finish()
    }
}

/// Why a value did not open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// Sealed under a key id not configured.
    UnknownKey(String),
    /// Not valid base64, too short, tampered, or sealed for another field.
    Corrupt,
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::UnknownKey(id) => write!(f, "sealed under unknown key `{id}`"),
            OpenError::Corrupt => {
                f.write_str("sealed value is corrupt or belongs to another field")
            }
        }
    }
}

impl Keyring {
    /// Validates and loads the keys; `active` must be one of them.
    pub fn new(keys: &[KeyConfig], active: &str) -> Result<Self, String> {
        if keys.is_empty() {
            return Err("keys: at least one key is needed".into());
        }
        let mut loaded: Vec<(String, Aes256Gcm)> = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            if k.id.is_empty() || k.id.contains(':') {
                return Err(format!("keys[{i}].id: must be non-empty and without `:`"));
            }
            if loaded.iter().any(|(id, _)| *id == k.id) {
                return Err(format!("keys[{i}].id: `{}` appears twice", k.id));
            }
            let bytes = STANDARD
                .decode(k.key.trim())
                .map_err(|e| format!("keys[{i}].key: not base64: {e}"))?;
            let cipher = Aes256Gcm::new_from_slice(&bytes)
                .map_err(|_| format!("keys[{i}].key: must be 32 bytes, got {}", bytes.len()))?;
            loaded.push((k.id.clone(), cipher));
        }
        let active = loaded
            .iter()
            .position(|(id, _)| id == active)
            .ok_or_else(|| format!("active_key: `{active}` is not among keys"))?;
        Ok(Keyring {
            keys: loaded,
            active,
        })
    }

    /// Seals `plaintext` for `field` with the active key.
    pub fn seal(&self, field: &str, plaintext: &[u8]) -> Result<String, String> {
        let (id, cipher) = &self.keys[self.active];
        let mut nonce = [0u8; 12];
        getrandom::fill(&mut nonce).map_err(|e| format!("no randomness for a nonce: {e}"))?;
        let sealed = cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: plaintext,
                    aad: field.as_bytes(),
                },
            )
            .map_err(|_| "encryption failed".to_string())?;
        let mut blob = nonce.to_vec();
        blob.extend_from_slice(&sealed);
        Ok(format!("{PREFIX}{id}:{}", URL_SAFE_NO_PAD.encode(blob)))
    }

    /// Whether `value` looks sealed.
    pub fn is_sealed(value: &str) -> bool {
        value.starts_with(PREFIX)
    }

    /// Opens a sealed value of `field` with whichever key sealed it.
    pub fn open(&self, field: &str, value: &str) -> Result<Vec<u8>, OpenError> {
        let rest = value.strip_prefix(PREFIX).ok_or(OpenError::Corrupt)?;
        let (id, data) = rest.split_once(':').ok_or(OpenError::Corrupt)?;
        let (_, cipher) = self
            .keys
            .iter()
            .find(|(k, _)| k == id)
            .ok_or_else(|| OpenError::UnknownKey(id.to_string()))?;
        let blob = URL_SAFE_NO_PAD
            .decode(data)
            .map_err(|_| OpenError::Corrupt)?;
        if blob.len() < 12 + 16 {
            return Err(OpenError::Corrupt);
        }
        let (nonce, sealed) = blob.split_at(12);
        cipher
            .decrypt(
                Nonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: field.as_bytes(),
                },
            )
            .map_err(|_| OpenError::Corrupt)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str, byte: u8) -> KeyConfig {
        KeyConfig {
            id: id.into(),
            key: STANDARD.encode([byte; 32]),
        }
    }

    #[test]
    fn seal_open_round_trip_and_rotation() {
        let old = Keyring::new(&[key("k1", 1)], "k1").unwrap();
        let sealed_old = old.seal("x-card", b"4111").unwrap();
        let rotated = Keyring::new(&[key("k2", 2), key("k1", 1)], "k2").unwrap();
        assert_eq!(rotated.open("x-card", &sealed_old).unwrap(), b"4111");
        let sealed_new = rotated.seal("x-card", b"4111").unwrap();
        assert!(sealed_new.starts_with("lws1:k2:"));
        assert_ne!(
            sealed_new,
            rotated.seal("x-card", b"4111").unwrap(),
            "fresh nonce each time"
        );
        assert_eq!(
            old.open("x-card", &sealed_new),
            Err(OpenError::UnknownKey("k2".into()))
        );
        assert_eq!(
            rotated.open("x-other", &sealed_new),
            Err(OpenError::Corrupt)
        );
        let mut tampered = sealed_new.clone();
        tampered.pop();
        tampered.push(if sealed_new.ends_with('A') { 'B' } else { 'A' });
        assert_eq!(rotated.open("x-card", &tampered), Err(OpenError::Corrupt));
    }

    #[test]
    fn bad_keys_are_refused() {
        let short = KeyConfig {
            id: "k".into(),
            key: STANDARD.encode([0u8; 16]),
        };
        assert!(
            Keyring::new(&[short], "k")
                .unwrap_err()
                .contains("32 bytes")
        );
        assert!(
            Keyring::new(&[key("k", 1)], "x")
                .unwrap_err()
                .contains("active_key")
        );
        assert!(
            Keyring::new(&[key("k", 1), key("k", 2)], "k")
                .unwrap_err()
                .contains("twice")
        );
        let bad = KeyConfig {
            id: "k".into(),
            key: "%%%".into(),
        };
        assert!(
            Keyring::new(&[bad], "k")
                .unwrap_err()
                .contains("not base64")
        );
        assert!(Keyring::new(&[], "k").is_err());
    }
}
