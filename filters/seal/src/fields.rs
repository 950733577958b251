//! JSON body fields by dotted path (`card.number`): seal or open them in place.

use serde_json::Value;

use crate::keyring::{Keyring, OpenError};

/// What went wrong with one field.
#[derive(Debug, PartialEq, Eq)]
pub enum FieldError {
    /// A field that must arrive sealed arrived in plaintext.
    Plaintext(String),
    /// A sealed field did not open.
    Open(String, OpenError),
    /// Sealing failed.
    Seal(String, String),
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FieldError::Plaintext(field) => write!(f, "field `{field}` must arrive sealed"),
            FieldError::Open(field, e) => write!(f, "field `{field}`: {e}"),
            FieldError::Seal(field, e) => write!(f, "field `{field}`: {e}"),
        }
    }
}

fn lookup<'a>(root: &'a mut Value, path: &str) -> Option<&'a mut Value> {
    path.split('.')
        .try_fold(root, |v, segment| v.as_object_mut()?.get_mut(segment))
}

/// Seals each present field: its JSON text becomes a sealed string.
pub fn seal(keys: &Keyring, doc: &mut Value, paths: &[String]) -> Result<(), FieldError> {
    for path in paths {
        if let Some(v) = lookup(doc, path) {
            if v.as_str().is_some_and(Keyring::is_sealed) {
                continue;
            }
            let text = v.to_string();
            let sealed = keys
                .seal(path, text.as_bytes())
                .map_err(|e| FieldError::Seal(path.clone(), e))?;
            *v = Value::String(sealed);
        }
    }
    Ok(())
}

/// Opens each present sealed field back into its JSON value. A plaintext
/// field is an error when `require_sealed`, else left as it is.
pub fn open(
    keys: &Keyring,
    doc: &mut Value,
    paths: &[String],
    require_sealed: bool,
) -> Result<(), FieldError> {
    for path in paths {
        let Some(v) = lookup(doc, path) else { continue };
        match v.as_str() {
            Some(s) if Keyring::is_sealed(s) => {
                let plain = keys
                    .open(path, s)
                    .map_err(|e| FieldError::Open(path.clone(), e))?;
                *v = serde_json::from_slice(&plain)
                    .map_err(|_| FieldError::Open(path.clone(), OpenError::Corrupt))?;
            }
            _ if require_sealed => return Err(FieldError::Plaintext(path.clone())),
            _ => {}
        }
    }
    Ok(())
}
