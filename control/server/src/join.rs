//! Who may open a sidecar stream. A sidecar proves itself with one of:
//!
//! - its workload certificate, presented as the TLS client certificate on
//!   the API port: it registers only as the service its SPIFFE ID names;
//! - a join token (`lwjoin_…`, made by `lacewing token create`): one use,
//!   for one service, before it expires. The control plane keeps only its
//!   sha256; the first hello that names the token's service uses it up, and
//!   any later use is a replay;
//! - the shared bootstrap token (`STATE_DIR/bootstrap.token`): any service,
//!   any number of times, unless the control plane runs without it.
//!
//! [`DiscoveryAuth`] sorts a call by what it carries (the interceptor sees
//! no hello); [`Admission::admit`] checks the hello against it. Every
//! refusal is `Unauthenticated`, logged, and counted in
//! `lacewing_control_token_refusals_total{role, reason}`.

use std::sync::Arc;
use std::time::Duration;

use lacewing_control_api as api;
use lacewing_tls::SpiffeId;
use rand::RngCore;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::api_tls::ApiConnectInfo;
use crate::store::{JoinRecord, Redeemed, Store, StoreError};

/// How long a join token is good for when its maker names no time.
pub const DEFAULT_JOIN_TTL: Duration = Duration::from_secs(3600);
/// The longest a join token may be good for.
pub const MAX_JOIN_TTL: Duration = Duration::from_secs(30 * 24 * 3600);

/// A new join token: the prefix and 32 random bytes, hex.
pub fn new_token() -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{}{}", api::JOIN_TOKEN_PREFIX, crate::operator::hex(&bytes))
}

/// The key a join token is kept under: the sha256 of the token, hex.
pub fn token_sha256(token: &str) -> String {
    crate::operator::hex(&Sha256::digest(token.as_bytes()))
}

/// What a `Discovery` call authenticated with, as [`DiscoveryAuth`] found
/// it (a request extension).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A verified workload certificate's SPIFFE ID.
    Workload(SpiffeId),
    /// A join token, by its sha256; checked against the hello.
    Join(String),
    /// The shared bootstrap token.
    Shared,
}

/// Counts and logs a refusal: `Unauthenticated` with `message`.
fn refuse(
    refusals: &prometheus::IntCounterVec,
    role: &'static str,
    reason: &'static str,
    message: String,
) -> Status {
    refusals.with_label_values(&[role, reason]).inc();
    tracing::warn!(role, reason, %message, "sidecar refused");
    Status::unauthenticated(message)
}

/// The `Discovery` service's interceptor: a verified client certificate
/// (whatever else the call carries), else a join token, else the shared
/// bootstrap token when allowed; records which as a [`Credential`].
#[derive(Clone)]
pub struct DiscoveryAuth {
    shared: Arc<str>,
    /// Whether the shared bootstrap token admits a sidecar.
    allow_shared: bool,
    refusals: prometheus::IntCounterVec,
}

impl std::fmt::Debug for DiscoveryAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiscoveryAuth")
            .field("allow_shared", &self.allow_shared)
            .finish_non_exhaustive()
    }
}

impl DiscoveryAuth {
    /// `shared` is the bootstrap token; `allow_shared` whether it admits
    /// sidecars (refused as `disabled` otherwise).
    pub fn new(shared: &str, allow_shared: bool, refusals: prometheus::IntCounterVec) -> Self {
        Self {
            shared: shared.into(),
            allow_shared,
            refusals,
        }
    }

    fn credential<T>(&self, request: &Request<T>) -> Result<Credential, Status> {
        if let Some(id) = request
            .extensions()
            .get::<ApiConnectInfo>()
            .and_then(|info| info.peer.clone())
        {
            return Ok(Credential::Workload(id));
        }
        let given = request
            .metadata()
            .get(api::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let refuse = |role, reason, message: &str| {
            Err(refuse(&self.refusals, role, reason, message.to_string()))
        };
        let Some(token) = given else {
            return refuse(
                "bootstrap",
                "missing",
                "missing sidecar credential: a join token or the bootstrap token \
                 (authorization: Bearer ...), or a workload certificate",
            );
        };
        if token.starts_with(api::JOIN_TOKEN_PREFIX) {
            return Ok(Credential::Join(token_sha256(token)));
        }
        match (
            crate::token::same(token.as_bytes(), self.shared.as_bytes()),
            self.allow_shared,
        ) {
            (true, true) => Ok(Credential::Shared),
            (true, false) => refuse(
                "bootstrap",
                "disabled",
                "this control plane accepts no shared bootstrap token: join with a token \
                 from `lacewing token create`",
            ),
            (false, _) => refuse("bootstrap", "wrong", "wrong bootstrap token"),
        }
    }
}

impl tonic::service::Interceptor for DiscoveryAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let credential = self.credential(&request)?;
        request.extensions_mut().insert(credential);
        Ok(request)
    }
}

/// Checks a sidecar's hello against its [`Credential`].
pub(crate) struct Admission {
    pub store: Arc<dyn Store>,
    pub trust_domain: String,
    pub refusals: prometheus::IntCounterVec,
    /// Streams opened, by credential (`certificate`, `join`, `shared`).
    pub registrations: prometheus::IntCounterVec,
}

impl Admission {
    /// Whether `hello` may register under `credential`; a join token is
    /// used up when it may.
    pub(crate) async fn admit(
        &self,
        credential: Option<&Credential>,
        hello: &api::Hello,
    ) -> Result<(), Status> {
        let refuse =
            |role, reason, message: String| Err(refuse(&self.refusals, role, reason, message));
        let claimed = format!("{}/{}", hello.namespace, hello.service);
        let kind = match credential {
            // Not through the interceptor: nothing vouches for the call.
            None => return refuse("bootstrap", "missing", "missing sidecar credential".into()),
            Some(Credential::Shared) => "shared",
            Some(Credential::Workload(id)) => {
                if id.trust_domain() != self.trust_domain
                    || id.namespace() != hello.namespace
                    || id.service() != hello.service
                {
                    return refuse(
                        "workload",
                        "wrong_service",
                        format!(
                            "the workload certificate is {id}: it cannot register as {claimed}"
                        ),
                    );
                }
                "certificate"
            }
            Some(Credential::Join(sha256)) => {
                let (store, sha256) = (self.store.clone(), sha256.clone());
                let (namespace, service, node) = (
                    hello.namespace.clone(),
                    hello.service.clone(),
                    hello.node_id.clone(),
                );
                let redeemed = tokio::task::spawn_blocking(move || {
                    store.redeem_join_token(
                        &sha256,
                        &namespace,
                        &service,
                        &node,
                        crate::state::now_ms(),
                    )
                })
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e: StoreError| Status::internal(e.to_string()))?;
                let token_for = |r: &JoinRecord| format!("{}/{}", r.namespace, r.service);
                match redeemed {
                    Redeemed::Joined(record) => {
                        tracing::info!(node = %record.used_by, service = %claimed, "join token used");
                    }
                    Redeemed::Unknown => {
                        return refuse("join", "unknown", "unknown join token".into());
                    }
                    Redeemed::Expired(record) => {
                        return refuse(
                            "join",
                            "expired",
                            format!("the join token for {} expired", token_for(&record)),
                        );
                    }
                    Redeemed::Replayed(record) => {
                        return refuse(
                            "join",
                            "replayed",
                            format!(
                                "the join token for {} was used already (by {}); a join \
                                 token registers one sidecar once",
                                token_for(&record),
                                record.used_by
                            ),
                        );
                    }
                    Redeemed::WrongService(record) => {
                        return refuse(
                            "join",
                            "wrong_service",
                            format!(
                                "the join token is for {}: it cannot register as {claimed}",
                                token_for(&record)
                            ),
                        );
                    }
                }
                "join"
            }
        };
        self.registrations.with_label_values(&[kind]).inc();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::service::Interceptor;

    fn bearer(token: &str) -> Request<()> {
        let mut request = Request::new(());
        crate::token::authorize(&mut request, token).unwrap();
        request
    }

    #[test]
    fn tokens_are_recognizable_and_kept_as_hashes() {
        let token = new_token();
        assert!(token.starts_with(api::JOIN_TOKEN_PREFIX));
        assert_eq!(token.len(), api::JOIN_TOKEN_PREFIX.len() + 64);
        assert_ne!(token, new_token());
        let sha = token_sha256(&token);
        assert_eq!(sha.len(), 64);
        assert!(!sha.contains(&token[api::JOIN_TOKEN_PREFIX.len()..]));
    }

    #[test]
    fn calls_are_sorted_by_what_they_carry() {
        let refusals = crate::metrics::ControlMetrics::new().token_refusals;
        let shared = "a".repeat(64);
        let mut auth = DiscoveryAuth::new(&shared, true, refusals.clone());
        let credential = |auth: &mut DiscoveryAuth, request| {
            auth.call(request)
                .map(|r| r.extensions().get::<Credential>().cloned().unwrap())
        };
        assert_eq!(
            credential(&mut auth, bearer(&shared)).unwrap(),
            Credential::Shared
        );
        let token = new_token();
        assert_eq!(
            credential(&mut auth, bearer(&token)).unwrap(),
            Credential::Join(token_sha256(&token))
        );
        let id = SpiffeId::new("lacewing.local", "default", "orders").unwrap();
        let mut with_certificate = bearer("anything");
        with_certificate.extensions_mut().insert(ApiConnectInfo {
            tcp: tonic::transport::server::TcpConnectInfo {
                local_addr: None,
                remote_addr: None,
            },
            peer: Some(id.clone()),
        });
        assert_eq!(
            credential(&mut auth, with_certificate).unwrap(),
            Credential::Workload(id)
        );
        let wrong = credential(&mut auth, bearer("guess")).unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(credential(&mut auth, Request::new(())).is_err());

        let mut without_shared = DiscoveryAuth::new(&shared, false, refusals.clone());
        let refused = credential(&mut without_shared, bearer(&shared)).unwrap_err();
        assert!(
            refused.message().contains("no shared bootstrap token"),
            "{refused:?}"
        );
        assert!(credential(&mut without_shared, bearer("guess")).is_err());
        for (reason, count) in [("wrong", 2), ("missing", 1), ("disabled", 1)] {
            assert_eq!(
                refusals.with_label_values(&["bootstrap", reason]).get(),
                count,
                "{reason}"
            );
        }
    }
}
