//! A small gRPC echo service, `lacewing.test.Echo`, written by hand on tonic:
//! its messages, the server side behind [`crate::servers::grpc_echo`] and a client.
//!
//! - `Echo(EchoRequest) -> EchoReply`: the message back; [`NOT_FOUND_MESSAGE`] answers `NOT_FOUND`.
//! - `Repeat(EchoRequest) -> stream EchoReply`: `count` replies, `index` 0..count.

use std::net::SocketAddr;

use http::uri::PathAndQuery;
use hyper::body::Incoming;
use tonic::Status;
use tonic::server::{ServerStreamingService, UnaryService};
use tonic::transport::Channel;
use tonic_prost::ProstCodec;

/// Path of the unary method.
pub const ECHO_PATH: &str = "/lacewing.test.Echo/Echo";
/// Path of the server-streaming method.
pub const REPEAT_PATH: &str = "/lacewing.test.Echo/Repeat";
/// An `Echo` message that the server answers with `NOT_FOUND`.
pub const NOT_FOUND_MESSAGE: &str = "not-found";
/// Most replies one `Repeat` call produces.
pub const MAX_REPEAT: u32 = 10_000;

/// The request of both methods.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    /// How many replies `Repeat` sends.
    #[prost(uint32, tag = "2")]
    pub count: u32,
}

/// One reply.
#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    /// Position in a `Repeat` stream; 0 for `Echo`.
    #[prost(uint32, tag = "2")]
    pub index: u32,
}

/// Answers one gRPC request on the server side.
pub(crate) async fn serve(req: http::Request<Incoming>) -> http::Response<tonic::body::Body> {
    match req.uri().path() {
        ECHO_PATH => {
            tonic::server::Grpc::new(ProstCodec::default())
                .unary(EchoMethod, req)
                .await
        }
        REPEAT_PATH => {
            tonic::server::Grpc::new(ProstCodec::default())
                .server_streaming(RepeatMethod, req)
                .await
        }
        other => Status::unimplemented(format!("no method {other}")).into_http(),
    }
}

struct EchoMethod;

impl UnaryService<EchoRequest> for EchoMethod {
    type Response = EchoReply;
    type Future = std::future::Ready<Result<tonic::Response<EchoReply>, Status>>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        let request = request.into_inner();
        std::future::ready(if request.message == NOT_FOUND_MESSAGE {
            Err(Status::not_found(format!(
                "nothing called `{}`",
                request.message
            )))
        } else {
            Ok(tonic::Response::new(EchoReply {
                message: request.message,
                index: 0,
            }))
        })
    }
}

struct RepeatMethod;

type ReplyStream = futures_util::stream::Iter<std::vec::IntoIter<Result<EchoReply, Status>>>;

impl ServerStreamingService<EchoRequest> for RepeatMethod {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = std::future::Ready<Result<tonic::Response<ReplyStream>, Status>>;

    fn call(&mut self, request: tonic::Request<EchoRequest>) -> Self::Future {
        let request = request.into_inner();
        if request.count > MAX_REPEAT {
            return std::future::ready(Err(Status::invalid_argument(format!(
                "count above {MAX_REPEAT}"
            ))));
        }
        let replies: Vec<_> = (0..request.count)
            .map(|index| {
                Ok(EchoReply {
                    message: request.message.clone(),
                    index,
                })
            })
            .collect();
        std::future::ready(Ok(tonic::Response::new(futures_util::stream::iter(
            replies,
        ))))
    }
}

/// A client of `lacewing.test.Echo`.
#[derive(Debug, Clone)]
pub struct EchoClient {
    inner: tonic::client::Grpc<Channel>,
}

impl EchoClient {
    /// Connects (HTTP/2 prior knowledge) to `addr`, a proxy listener or the server itself.
    pub async fn connect(addr: SocketAddr) -> Result<Self, tonic::transport::Error> {
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("a socket address makes a valid URI")
            .connect()
            .await?;
        Ok(Self {
            inner: tonic::client::Grpc::new(channel),
        })
    }

    /// Calls `Echo`.
    pub async fn echo(&mut self, message: &str) -> Result<tonic::Response<EchoReply>, Status> {
        self.ready().await?;
        let request = tonic::Request::new(EchoRequest {
            message: message.to_string(),
            count: 0,
        });
        self.inner
            .unary(
                request,
                PathAndQuery::from_static(ECHO_PATH),
                ProstCodec::default(),
            )
            .await
    }

    /// Calls `Repeat`.
    pub async fn repeat(
        &mut self,
        message: &str,
        count: u32,
    ) -> Result<tonic::Response<tonic::Streaming<EchoReply>>, Status> {
        self.ready().await?;
        let request = tonic::Request::new(EchoRequest {
            message: message.to_string(),
            count,
        });
        self.inner
            .server_streaming(
                request,
                PathAndQuery::from_static(REPEAT_PATH),
                ProstCodec::default(),
            )
            .await
    }

    async fn ready(&mut self) -> Result<(), Status> {
        self.inner
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("channel not ready: {e}")))
    }
}
