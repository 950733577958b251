//! HTTP and gRPC callouts in continuation style: build the call, `send` it
//! with the code to run when the answer comes, and return
//! [`crate::Action::Pause`] from the callback. The continuation gets the filter
//! back and returns the [`crate::Action`] for the paused stream: `Continue`
//! resumes it (a local reply sent in the continuation ends it instead).
//!
//! ```no_run
//! use lacewing_sdk::{Action, Filter, callout::HttpCall, http::{Headers, send_response}};
//!
//! struct Check;
//! impl Filter for Check {
//!     fn on_request_headers(&mut self, _h: &Headers, _eos: bool) -> Action {
//!         let sent = HttpCall::new("auth-service")
//!             .path("/check")
//!             .send(|_f: &mut Check, reply| match reply {
//!                 Ok(r) if r.status == 200 => Action::Continue,
//!                 _ => {
//!                     let _ = send_response(403, &[], b"denied\n", "auth_check_failed");
//!                     Action::Pause
//!                 }
//!             });
//!         if sent.is_ok() { Action::Pause } else { Action::Continue }
//!     }
//! }
//! ```

use std::any::Any;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use lacewing_abi::{BufferType, MapType};

use crate::error::Result;
use crate::{Action, hostcalls};

/// The answer to an HTTP callout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpReply {
    /// The `:status` of the response (0 if the upstream sent none).
    pub status: u16,
    /// Response headers, `:status` included.
    pub headers: Vec<(String, String)>,
    /// The response body.
    pub body: Vec<u8>,
}

impl HttpReply {
    /// A header of the reply.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Why a callout has no answer: the host reported a failure (connection
/// refused, timeout, reset).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CalloutFailed;

impl core::fmt::Display for CalloutFailed {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("callout failed: no response from the upstream")
    }
}

impl std::error::Error for CalloutFailed {}

/// The answer to a unary gRPC callout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcReply {
    /// The gRPC status code (0 is OK).
    pub status: u32,
    /// The response message (serialized protobuf), if one came.
    pub message: Vec<u8>,
}

/// An HTTP callout being built. Defaults: `GET /`, authority = cluster name, 5 s timeout.
#[derive(Debug, Clone)]
pub struct HttpCall {
    cluster: String,
    method: String,
    path: String,
    authority: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout_ms: u32,
}

impl HttpCall {
    /// A call to `cluster`.
    pub fn new(cluster: &str) -> Self {
        Self {
            cluster: cluster.into(),
            method: "GET".into(),
            path: "/".into(),
            authority: cluster.into(),
            headers: Vec::new(),
            body: Vec::new(),
            timeout_ms: 5000,
        }
    }
    /// The request method.
    pub fn method(mut self, method: &str) -> Self {
        self.method = method.into();
        self
    }
    /// The request path (and query).
    pub fn path(mut self, path: &str) -> Self {
        self.path = path.into();
        self
    }
    /// The `:authority` sent.
    pub fn authority(mut self, authority: &str) -> Self {
        self.authority = authority.into();
        self
    }
    /// Adds a request header.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
    /// The request body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
    /// How long to wait for the response, in milliseconds.
    pub fn timeout_ms(mut self, ms: u32) -> Self {
        self.timeout_ms = ms;
        self
    }

    /// Sends the call; `then` runs with the filter and the reply when it comes.
    /// An `Err` means the host refused the call (unknown cluster, ...), and
    /// `then` will not run.
    pub fn send<F: 'static>(
        self,
        then: impl FnOnce(&mut F, core::result::Result<HttpReply, CalloutFailed>) -> Action + 'static,
    ) -> Result<u32> {
        let mut headers: Vec<(&str, &str)> = vec![
            (":method", &self.method),
            (":path", &self.path),
            (":authority", &self.authority),
            (":scheme", "http"),
        ];
        headers.extend(self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let token =
            hostcalls::http_call(&self.cluster, &headers, &self.body, &[], self.timeout_ms)?;
        let k: HttpContinuation<F> = Box::new(then);
        pending_insert(token, Pending::Http(Box::new(k)));
        Ok(token)
    }
}

/// A unary gRPC callout being built (5 s timeout by default).
#[derive(Debug, Clone)]
pub struct GrpcCall {
    cluster: String,
    service: String,
    method: String,
    metadata: Vec<(String, String)>,
    message: Vec<u8>,
    timeout_ms: u32,
}

impl GrpcCall {
    /// A call of `service/method` on `cluster`.
    pub fn new(cluster: &str, service: &str, method: &str) -> Self {
        Self {
            cluster: cluster.into(),
            service: service.into(),
            method: method.into(),
            metadata: Vec::new(),
            message: Vec::new(),
            timeout_ms: 5000,
        }
    }
    /// Adds initial metadata.
    pub fn metadata(mut self, name: &str, value: &str) -> Self {
        self.metadata.push((name.into(), value.into()));
        self
    }
    /// The request message (serialized protobuf).
    pub fn message(mut self, message: impl Into<Vec<u8>>) -> Self {
        self.message = message.into();
        self
    }
    /// How long to wait, in milliseconds.
    pub fn timeout_ms(mut self, ms: u32) -> Self {
        self.timeout_ms = ms;
        self
    }

    /// Sends the call; `then` runs with the filter and the reply once the call closes.
    pub fn send<F: 'static>(
        self,
        then: impl FnOnce(&mut F, GrpcReply) -> Action + 'static,
    ) -> Result<u32> {
        let metadata: Vec<(&str, &str)> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let token = hostcalls::grpc_call(
            &self.cluster,
            &self.service,
            &self.method,
            &metadata,
            &self.message,
            self.timeout_ms,
        )?;
        let k: GrpcContinuation<F> = Box::new(then);
        pending_insert(
            token,
            Pending::Grpc {
                then: Box::new(k),
                message: Vec::new(),
            },
        );
        Ok(token)
    }
}

pub(crate) type HttpContinuation<F> =
    Box<dyn FnOnce(&mut F, core::result::Result<HttpReply, CalloutFailed>) -> Action>;
pub(crate) type GrpcContinuation<F> = Box<dyn FnOnce(&mut F, GrpcReply) -> Action>;

/// A callout waiting for its answer, owned by the context that sent it.
pub(crate) enum Pending {
    Http(Box<dyn Any>),
    Grpc {
        then: Box<dyn Any>,
        message: Vec<u8>,
    },
}

thread_local! {
    /// The context whose callback is running.
    pub(crate) static CURRENT: Cell<u32> = const { Cell::new(0) };
    static PENDING: RefCell<HashMap<u32, (u32, Pending)>> = RefCell::new(HashMap::new());
}

fn pending_insert(token: u32, p: Pending) {
    let ctx = CURRENT.with(Cell::get);
    PENDING.with(|m| m.borrow_mut().insert(token, (ctx, p)));
}

pub(crate) fn pending_take(token: u32) -> Option<(u32, Pending)> {
    PENDING.with(|m| m.borrow_mut().remove(&token))
}

pub(crate) fn pending_put_back(token: u32, entry: (u32, Pending)) {
    PENDING.with(|m| m.borrow_mut().insert(token, entry));
}

/// Drops the callouts of a finished context.
pub(crate) fn forget_context(ctx: u32) {
    PENDING.with(|m| m.borrow_mut().retain(|_, (c, _)| *c != ctx));
}

/// Reads the reply of an HTTP callout during `proxy_on_http_call_response`.
pub(crate) fn read_http_reply(
    num_headers: usize,
    body_size: usize,
) -> core::result::Result<HttpReply, CalloutFailed> {
    if num_headers == 0 {
        return Err(CalloutFailed);
    }
    let headers =
        hostcalls::header_pairs(MapType::HttpCallResponseHeaders).map_err(|_| CalloutFailed)?;
    let status = headers
        .iter()
        .find(|(k, _)| k == ":status")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let body = if body_size == 0 {
        Vec::new()
    } else {
        hostcalls::buffer(BufferType::HttpCallResponseBody, 0, body_size)
            .map_err(|_| CalloutFailed)?
            .unwrap_or_default()
    };
    Ok(HttpReply {
        status,
        headers,
        body,
    })
}

/// Reads a gRPC message during `proxy_on_grpc_receive`.
pub(crate) fn read_grpc_message(size: usize) -> Vec<u8> {
    hostcalls::buffer(BufferType::GrpcReceiveBuffer, 0, size)
        .ok()
        .flatten()
        .unwrap_or_default()
}
