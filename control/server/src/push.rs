//! Snapshots go out encoded once: every stream whose sidecar gets the same
//! snapshot sends the same bytes ([`Encoded`]), with only its own revision
//! and its sidecar's certificate appended. The `Discovery` service as mounted ([`DiscoveryService`]) serves
//! its `Stream` method with them and every other method as generated.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, BufMut, Bytes};
use lacewing_control_api as api;
use lacewing_control_api::discovery_server::DiscoveryServer;
use prost::Message;
use prost::encoding::{DecodeContext, WireType};
use tonic::codegen::Service;
use tonic::server::NamedService;
use tonic::{Request, Response, Status, Streaming};

use crate::discovery::{self, Discovery};

/// The `Snapshot.revision` field's tag (see the .proto).
const REVISION_TAG: u32 = 2;
/// The `Snapshot.certificate` field's tag (see the .proto).
const CERTIFICATE_TAG: u32 = 20;

/// A snapshot (revision 0, so the field is absent) encoded once.
#[derive(Debug, PartialEq)]
pub struct Built {
    pub snapshot: api::Snapshot,
    pub bytes: Bytes,
}

impl Built {
    pub fn new(snapshot: api::Snapshot) -> Self {
        debug_assert_eq!(snapshot.revision, 0);
        let bytes = Bytes::from(snapshot.encode_to_vec());
        Self { snapshot, bytes }
    }
}

/// One stream's copy of a [`Built`] snapshot: the shared bytes, then its
/// revision and its sidecar's certificate as more fields. Protobuf fields may come in any order, so a
/// sidecar decodes exactly the `Snapshot` it would have been sent field by
/// field.
#[derive(Debug, Clone, Default)]
pub struct Encoded {
    bytes: Bytes,
    revision: u64,
    certificate: Option<api::WorkloadCertificate>,
}

impl Encoded {
    pub fn new(
        built: &Built,
        revision: u64,
        certificate: Option<&api::WorkloadCertificate>,
    ) -> Self {
        debug_assert!(built.snapshot.certificate.is_none());
        Self {
            bytes: built.bytes.clone(),
            revision,
            certificate: certificate.cloned(),
        }
    }
}

impl Message for Encoded {
    fn encode_raw(&self, buf: &mut impl BufMut) {
        buf.put_slice(&self.bytes);
        if self.revision != 0 {
            prost::encoding::uint64::encode(REVISION_TAG, &self.revision, buf);
        }
        if let Some(certificate) = &self.certificate {
            prost::encoding::message::encode(CERTIFICATE_TAG, certificate, buf);
        }
    }

    /// Only ever sent; decoding skips every field.
    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: WireType,
        buf: &mut impl Buf,
        ctx: DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.bytes.len()
            + if self.revision != 0 {
                prost::encoding::uint64::encoded_len(REVISION_TAG, &self.revision)
            } else {
                0
            }
            + self.certificate.as_ref().map_or(0, |certificate| {
                prost::encoding::message::encoded_len(CERTIFICATE_TAG, certificate)
            })
    }

    fn clear(&mut self) {
        *self = Self::default();
    }
}

/// The `Discovery` service: `Stream` sends [`Encoded`] snapshots, the other
/// methods go to the generated server.
#[derive(Debug, Clone)]
pub struct DiscoveryService {
    discovery: Arc<Discovery>,
    generated: DiscoveryServer<Discovery>,
}

impl DiscoveryService {
    pub fn new(discovery: Discovery) -> Self {
        let discovery = Arc::new(discovery);
        Self {
            generated: DiscoveryServer::from_arc(discovery.clone()),
            discovery,
        }
    }
}

impl NamedService for DiscoveryService {
    const NAME: &'static str = <DiscoveryServer<Discovery> as NamedService>::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<B> Service<http::Request<B>> for DiscoveryService
where
    B: http_body::Body + Send + 'static,
    B::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != STREAM_PATH {
            return Box::pin(self.generated.call(request));
        }
        let method = StreamMethod(self.discovery.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<Encoded, api::SidecarMessage>::default();
            Ok(tonic::server::Grpc::new(codec)
                .streaming(method, request)
                .await)
        })
    }
}

const STREAM_PATH: &str = "/lacewing.control.v1.Discovery/Stream";

struct StreamMethod(Arc<Discovery>);

impl Service<Request<Streaming<api::SidecarMessage>>> for StreamMethod {
    type Response = Response<discovery::BoxStream<Encoded>>;
    type Error = Status;
    type Future = BoxFuture<Result<Self::Response, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Streaming<api::SidecarMessage>>) -> Self::Future {
        let discovery = self.0.clone();
        Box::pin(async move { discovery.open(request, Encoded::new).await })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_bytes_revision_and_certificate_decode_as_the_snapshot() {
        let snapshot = api::Snapshot {
            version: 9,
            services: vec![api::Service {
                name: "orders".into(),
                endpoints: vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let built = Built::new(snapshot.clone());
        let certificate = api::WorkloadCertificate {
            chain_pem: "chain".into(),
            spiffe_id: "spiffe://mesh.local/ns/default/sa/orders".into(),
            not_after_ms: 7,
            ..Default::default()
        };
        for revision in [0, 1, 300, u64::MAX] {
            for certificate in [None, Some(&certificate)] {
                let encoded = Encoded::new(&built, revision, certificate);
                let bytes = encoded.encode_to_vec();
                assert_eq!(bytes.len(), encoded.encoded_len());
                let decoded = api::Snapshot::decode(bytes.as_slice()).unwrap();
                assert_eq!(
                    decoded,
                    api::Snapshot {
                        revision,
                        certificate: certificate.cloned(),
                        ..snapshot.clone()
                    }
                );
            }
        }
    }
}
