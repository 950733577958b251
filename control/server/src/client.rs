//! The operator's client: what `lacewing apply`, `delete`, `get`, `status`,
//! `root` and `token create` do, callable from code (tests, the demo) as well as from the command line.
//! It reaches the control plane over TLS, verifying it with the mesh root
//! (`ca.pem` beside the token file, see [`trust_beside`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use lacewing_control_api as api;
use lacewing_control_api::operator_client::OperatorClient;
use lacewing_mesh::{Document, MeshError, MeshIssue, ParsedDocument, Spec};
use lacewing_tls::api::ApiTrust;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::operator::hex;

/// Why an operator command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Mesh(#[from] MeshError),
    #[error("cannot reach the control plane at {address}: {reason}")]
    Connect { address: String, reason: String },
    #[error(
        "no CA certificate at {path}: {reason} (the control plane writes ca.pem beside its \
         tokens; --ca-file names another)"
    )]
    Trust { path: PathBuf, reason: String },
    /// The control plane answered with an error (its message is shown).
    #[error("control plane: {}", .0.message())]
    Status(Status),
    #[error("{path}: cannot read module: {source}")]
    Module {
        path: String,
        source: std::io::Error,
    },
}

impl From<Status> for ClientError {
    fn from(status: Status) -> Self {
        ClientError::Status(status)
    }
}

/// What an apply did.
#[derive(Debug, Clone)]
pub struct Applied {
    pub version: u64,
    pub changed: Vec<String>,
    pub unchanged: Vec<String>,
    /// Modules uploaded (sha256), the others were already there.
    pub uploaded: Vec<String>,
}

/// A connected operator client.
#[derive(Debug, Clone)]
pub struct Client {
    inner: OperatorClient<Channel>,
    token: String,
}

/// The CA that authenticates the control plane to a client holding
/// `token_file`: `ca_file` when given, else `ca.pem` in the same directory.
pub fn trust_beside(token_file: &Path, ca_file: Option<&Path>) -> Result<ApiTrust, ClientError> {
    let path = match ca_file {
        Some(path) => path.to_path_buf(),
        None => token_file
            .parent()
            .unwrap_or(Path::new("."))
            .join(crate::CA_CERT),
    };
    ApiTrust::from_file(&path).map_err(|e| ClientError::Trust {
        reason: match &e {
            lacewing_tls::TlsError::Pem { reason, .. } => reason
                .strip_prefix(&format!("{}: ", path.display()))
                .unwrap_or(reason)
                .to_string(),
            other => other.to_string(),
        },
        path,
    })
}

/// A channel to the control plane's API at `address` (`HOST:PORT` or
/// `https://HOST:PORT`) over TLS, the server verified by `trust`.
pub async fn channel(address: &str, trust: &ApiTrust) -> Result<Channel, ClientError> {
    let connect_error = |reason: String| ClientError::Connect {
        address: address.to_string(),
        reason,
    };
    let bare = lacewing_tls::api::api_address(address).map_err(connect_error)?;
    // The URI only names the authority: the connector does the TLS.
    Endpoint::from_shared(format!("http://{bare}"))
        .map_err(|e| connect_error(e.to_string()))?
        .connect_timeout(Duration::from_secs(3))
        .connect_with_connector(trust.connector())
        .await
        .map_err(|e| connect_error(lacewing_tls::api::describe_connect_error(&e)))
}

impl Client {
    /// Connects to `address` (`HOST:PORT` or `https://HOST:PORT`) with the
    /// operator token, verifying the control plane by `trust`.
    pub async fn connect(
        address: &str,
        token: &str,
        trust: &ApiTrust,
    ) -> Result<Self, ClientError> {
        let channel = channel(address, trust).await?;
        Ok(Self {
            inner: OperatorClient::new(channel).max_decoding_message_size(64 * 1024 * 1024),
            token: token.to_string(),
        })
    }

    fn request<T>(&self, message: T) -> Result<Request<T>, Status> {
        let mut request = Request::new(message);
        crate::token::authorize(&mut request, &self.token)?;
        Ok(request)
    }

    /// Uploads the modules `docs` name by file path (relative to `base`),
    /// turns those references into `sha256:`, then applies the documents
    /// atomically. Problems come back located in their files.
    pub async fn apply(
        &mut self,
        mut docs: Vec<ParsedDocument>,
        base: &Path,
    ) -> Result<Applied, ClientError> {
        let uploaded = self.upload_modules(&mut docs, base).await?;
        let request = api::ApplyRequest {
            documents: docs.iter().map(|d| d.document.to_json()).collect(),
            deletes: Vec::new(),
        };
        let reply = self.inner.apply(self.request(request)?).await?.into_inner();
        into_applied(reply, &docs, uploaded)
    }

    /// Deletes the documents in `docs` (by kind, namespace and name), atomically.
    pub async fn delete(&mut self, docs: &[ParsedDocument]) -> Result<Applied, ClientError> {
        let request = api::ApplyRequest {
            documents: Vec::new(),
            deletes: docs.iter().map(|d| d.document.key()).collect(),
        };
        let reply = self.inner.apply(self.request(request)?).await?.into_inner();
        into_applied(reply, docs, Vec::new())
    }

    async fn upload_modules(
        &mut self,
        docs: &mut [ParsedDocument],
        base: &Path,
    ) -> Result<Vec<String>, ClientError> {
        let mut uploaded = Vec::new();
        let mut issues = Vec::new();
        for parsed in docs.iter_mut() {
            let issue = |field: &str, reason: &str| parsed.issue(field, reason);
            let Spec::WasmPlugin(plugin) = &parsed.document.spec else {
                continue;
            };
            if plugin.module.starts_with("sha256:") || plugin.module.starts_with("builtin:") {
                continue;
            }
            let path = base.join(&plugin.module);
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) => {
                    issues.push(issue(
                        "spec.module",
                        &format!("cannot read {}: {e}", path.display()),
                    ));
                    continue;
                }
            };
            let sha = hex(&Sha256::digest(&bytes));
            if let Some(pin) = &plugin.sha256
                && *pin != sha
            {
                issues.push(issue(
                    "spec.sha256",
                    &format!("sha256 mismatch: {} is {sha}", path.display()),
                ));
                continue;
            }
            let missing = self
                .inner
                .missing_modules(self.request(api::MissingModulesRequest {
                    sha256: vec![sha.clone()],
                })?)
                .await?
                .into_inner()
                .sha256;
            if !missing.is_empty() {
                let chunks: Vec<api::ModuleChunk> = bytes
                    .chunks(api::MODULE_CHUNK)
                    .enumerate()
                    .map(|(i, data)| api::ModuleChunk {
                        sha256: if i == 0 { sha.clone() } else { String::new() },
                        data: data.to_vec(),
                    })
                    .collect();
                self.inner
                    .upload_module(self.request(tokio_stream::iter(chunks))?)
                    .await?;
                uploaded.push(sha.clone());
            }
            if let Spec::WasmPlugin(plugin) = &mut parsed.document.spec {
                plugin.module = format!("sha256:{sha}");
                plugin.sha256 = Some(sha);
            }
        }
        if issues.is_empty() {
            Ok(uploaded)
        } else {
            Err(MeshError::Invalid(issues).into())
        }
    }

    /// Stored documents of `kind` (all kinds when `None`), optionally one name.
    pub async fn get(
        &mut self,
        kind: Option<&str>,
        name: Option<&str>,
        namespace: Option<&str>,
    ) -> Result<(u64, Vec<(Document, u64)>), ClientError> {
        let request = api::GetRequest {
            kind: kind.unwrap_or_default().to_string(),
            name: name.unwrap_or_default().to_string(),
            namespace: namespace.unwrap_or_default().to_string(),
        };
        let reply = self.inner.get(self.request(request)?).await?.into_inner();
        let mut docs = Vec::new();
        for stored in reply.documents {
            let doc = Document::from_json(&stored.json)
                .map_err(|reason| Status::data_loss(format!("{}: {reason}", stored.key)))?;
            docs.push((doc, stored.version));
        }
        Ok((reply.version, docs))
    }

    /// Starts or finishes a rotation of the mesh root, or only asks where it stands.
    pub async fn rotate_root(
        &mut self,
        request: api::RotateRootRequest,
    ) -> Result<api::RootRotation, ClientError> {
        Ok(self
            .inner
            .rotate_root(self.request(request)?)
            .await?
            .into_inner())
    }

    /// A one-time join token for a sidecar of `namespace/service`, good for
    /// `ttl` (`None`: the control plane's default, an hour).
    pub async fn create_join_token(
        &mut self,
        service: &str,
        namespace: &str,
        ttl: Option<Duration>,
    ) -> Result<api::JoinToken, ClientError> {
        let request = api::CreateJoinTokenRequest {
            service: service.to_string(),
            namespace: namespace.to_string(),
            ttl_ms: ttl.map_or(0, |ttl| (ttl.as_millis() as u64).max(1)),
        };
        Ok(self
            .inner
            .create_join_token(self.request(request)?)
            .await?
            .into_inner())
    }

    pub async fn status(&mut self) -> Result<api::StatusReply, ClientError> {
        Ok(self
            .inner
            .status(self.request(api::StatusRequest {})?)
            .await?
            .into_inner())
    }

    /// Follows the sidecars connected now until each ACKed or NACKed
    /// `version`, or `timeout` passed; `progress` sees every step.
    pub async fn wait(
        &mut self,
        version: u64,
        timeout: Duration,
        mut progress: impl FnMut(&api::WaitProgress),
    ) -> Result<api::WaitProgress, ClientError> {
        let request = api::WaitVersionRequest {
            version,
            timeout_ms: timeout.as_millis() as u64,
        };
        let mut stream = self
            .inner
            .wait_version(self.request(request)?)
            .await?
            .into_inner();
        let mut last = api::WaitProgress::default();
        while let Some(step) = stream.next().await {
            last = step?;
            progress(&last);
            if last.done {
                break;
            }
        }
        Ok(last)
    }
}

fn into_applied(
    reply: api::ApplyReply,
    docs: &[ParsedDocument],
    uploaded: Vec<String>,
) -> Result<Applied, ClientError> {
    if !reply.issues.is_empty() {
        let issues = reply
            .issues
            .into_iter()
            .map(|i| {
                match docs
                    .iter()
                    .find(|d| !i.key.is_empty() && d.document.key() == i.key)
                {
                    Some(doc) => doc.issue(&i.field, &i.reason),
                    None => MeshIssue::new(i.key, i.field, i.reason),
                }
            })
            .collect();
        return Err(MeshError::Invalid(issues).into());
    }
    Ok(Applied {
        version: reply.version,
        changed: reply.changed,
        unchanged: reply.unchanged,
        uploaded,
    })
}
