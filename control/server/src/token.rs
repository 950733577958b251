//! Bearer tokens: written once to the state directory (0600), checked on
//! every call. `operator.token` guards the Operator service;
//! `bootstrap.token` is the shared token sidecars may use on the Discovery
//! service (see [`crate::join`] for what else admits a sidecar).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use rand::RngCore;
use tonic::{Request, Status};

/// The token in `path`, created with 32 random bytes (hex) if the file does not exist.
pub fn load_or_create(path: &Path) -> std::io::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let token = text.trim().to_string();
            if token.is_empty() {
                return Err(std::io::Error::other(format!(
                    "{} is empty",
                    path.display()
                )));
            }
            Ok(token)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut bytes = [0u8; 32];
            rand::rng().fill_bytes(&mut bytes);
            let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            write_new(path, format!("{token}\n").as_bytes(), 0o600)?;
            Ok(token)
        }
        Err(e) => Err(e),
    }
}

/// Writes `contents` to `path` with permissions `mode`, through a temporary
/// file renamed into place (a crash leaves the old file or the new one).
pub fn write_new(path: &Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Reads a token file (as written by [`load_or_create`]).
pub fn read(path: &Path) -> std::io::Result<String> {
    let token = std::fs::read_to_string(path)?.trim().to_string();
    if token.is_empty() {
        return Err(std::io::Error::other(format!(
            "{} is empty",
            path.display()
        )));
    }
    Ok(token)
}

/// Equal in constant time for equal lengths.
pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A tonic interceptor admitting calls that carry `authorization: Bearer <token>`.
#[derive(Clone)]
pub struct RequireToken {
    token: std::sync::Arc<str>,
    role: &'static str,
    refused: Option<prometheus::IntCounterVec>,
}

impl std::fmt::Debug for RequireToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequireToken")
            .field("role", &self.role)
            .finish()
    }
}

impl RequireToken {
    pub fn new(token: &str, role: &'static str) -> Self {
        Self {
            token: token.into(),
            role,
            refused: None,
        }
    }

    /// Counts refusals in `refused` (labels: role, reason).
    pub fn counted(mut self, refused: prometheus::IntCounterVec) -> Self {
        self.refused = Some(refused);
        self
    }

    fn refuse(&self, reason: &'static str, message: String) -> Status {
        if let Some(refused) = &self.refused {
            refused.with_label_values(&[self.role, reason]).inc();
        }
        tracing::warn!(role = self.role, reason, "call refused for its token");
        Status::unauthenticated(message)
    }
}

impl tonic::service::Interceptor for RequireToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let given = request
            .metadata()
            .get(lacewing_control_api::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            Some(token) if same(token.as_bytes(), self.token.as_bytes()) => Ok(request),
            Some(_) => Err(self.refuse("wrong", format!("wrong {} token", self.role))),
            None => Err(self.refuse(
                "missing",
                format!("missing {} token (authorization: Bearer ...)", self.role),
            )),
        }
    }
}

/// Adds `authorization: Bearer <token>` to a request (clients).
pub fn authorize<T>(request: &mut Request<T>, token: &str) -> Result<(), Status> {
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| Status::invalid_argument("token is not valid metadata"))?;
    request
        .metadata_mut()
        .insert(lacewing_control_api::AUTHORIZATION, value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn created_once_with_owner_only_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("operator.token");
        let first = load_or_create(&path).unwrap();
        assert_eq!(first.len(), 64);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(load_or_create(&path).unwrap(), first);
    }

    #[test]
    fn interceptor_refuses_missing_and_wrong_tokens() {
        use tonic::service::Interceptor;
        let mut check = RequireToken::new("secret", "operator");
        assert!(check.call(Request::new(())).is_err());
        let mut wrong = Request::new(());
        authorize(&mut wrong, "guess").unwrap();
        assert_eq!(
            check.call(wrong).unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        let mut right = Request::new(());
        authorize(&mut right, "secret").unwrap();
        assert!(check.call(right).is_ok());
    }
}
