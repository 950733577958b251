//! The data of a VM's `Store`: contexts, the running callback, pending
//! callouts and queues, and the memory limiter. Everything hostcalls see.

use std::collections::HashMap;

use rustc_hash::{FxHashMap, FxHashSet};
use std::rc::Weak;
use std::sync::Arc;

use bytes::Bytes;
use lacewing_core::stream::{SharedConnection, SharedStream};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;
use wasmtime::{Memory, ResourceLimiter, TypedFunc};

use crate::callout::GrpcStreamHandle;
use crate::exports::Callback;
use crate::plugin::PluginShared;
use crate::vm::Vm;

/// Where a stream context is in its life; decides which maps may still change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Created,
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    Log,
}

/// What a context is attached to.
pub(crate) enum CtxKind {
    Root,
    Http(SharedStream),
    Net(SharedConnection),
}

/// One proxy-wasm context.
pub(crate) struct Ctx {
    /// The root context it belongs to (itself for a root).
    pub root: u32,
    pub plugin: Arc<PluginShared>,
    pub kind: CtxKind,
    pub phase: Phase,
    /// The root's tick timer.
    pub tick: Option<AbortHandle>,
    /// Properties set on a context without a stream.
    pub properties: HashMap<String, Bytes>,
}

/// Data of an HTTP or gRPC callout visible during its callback.
#[derive(Default)]
pub(crate) struct CalloutData {
    pub headers: Vec<(String, Bytes)>,
    pub body: Bytes,
    pub trailers: Vec<(String, Bytes)>,
    /// `proxy_get_status` code and message.
    pub status: u32,
    pub message: String,
}

/// The callback being run.
pub(crate) struct Current {
    /// The context the callback was invoked on.
    pub origin: u32,
    /// The context hostcalls act on (`proxy_set_effective_context` changes it).
    pub effective: u32,
    pub callback: Callback,
    pub callout: Option<CalloutData>,
    pub foreign_args: Option<Bytes>,
}

impl Current {
    pub(crate) fn idle() -> Self {
        Self {
            origin: 0,
            effective: 0,
            callback: Callback::Initialize,
            callout: None,
            foreign_args: None,
        }
    }
}

/// Caps linear memory at the plugin's limit and remembers when it was hit.
pub(crate) struct MemoryLimiter {
    pub cap: usize,
    pub exceeded: bool,
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.exceeded = true;
            return Ok(false);
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _max: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}

/// A buffer a module lent for the values hostcalls return: the guest
/// addresses of its "offered" flag byte and of the buffer, and its capacity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReturnBuffer {
    pub flag: u32,
    pub buf: u32,
    pub cap: u32,
}

/// A gRPC call or stream of this VM.
pub(crate) struct GrpcCall {
    pub context: u32,
    pub handle: Option<GrpcStreamHandle>,
}

/// The data of a `Store`: everything hostcalls see.
pub(crate) struct HostState {
    /// The plugin whose context is running (VMs may be shared by several).
    pub plugin: Arc<PluginShared>,
    pub limiter: MemoryLimiter,
    pub memory: Option<Memory>,
    /// Shared so a hostcall holds it across the call without cloning the
    /// function's type (which registers and unregisters it each time).
    pub allocate: Option<Arc<TypedFunc<i32, i32>>>,
    /// The buffer the module lent for returned values, if it did
    /// (`lacewing_abi::names::RETURN_BUFFER_FUNCTION`).
    pub return_buffer: Option<ReturnBuffer>,
    pub vm: Weak<Vm>,
    /// Whether hostcalls may start tasks (false for the load-time validation instance).
    pub spawn: bool,
    pub current: Current,
    /// Keyed by host-assigned ids: FxHash, a few instructions where SipHash
    /// took a hundred or more per lookup (several lookups per callback).
    pub contexts: FxHashMap<u32, Ctx>,
    next_context_id: u32,
    next_token: u32,
    /// Pending HTTP calls: token to calling context.
    pub http_calls: FxHashMap<u32, u32>,
    pub grpc_calls: FxHashMap<u32, GrpcCall>,
    /// Sender of this VM's queue-ready task, created on first registration.
    pub queue_tx: Option<UnboundedSender<u32>>,
    /// Queue id to the root context that registered it.
    pub queue_owners: FxHashMap<u32, u32>,
    /// Contexts whose `proxy_on_done` returned false.
    pub pending_done: FxHashSet<u32>,
    /// Contexts to delete once the running callback returns.
    pub deferred_delete: Vec<u32>,
    /// Why the running callback must stop (set by hostcalls that trap on purpose).
    pub failure_note: Option<String>,
    /// WASI environment, `KEY=VALUE`.
    pub env: Vec<String>,
    /// The last error-level line the module logged (bounded), so a refused
    /// `on_vm_start`/`on_configure` can say why.
    pub last_error_log: Option<String>,
}

impl HostState {
    pub(crate) fn new(plugin: &Arc<PluginShared>, spawn: bool) -> Self {
        Self {
            plugin: plugin.clone(),
            limiter: MemoryLimiter {
                cap: plugin.memory_cap,
                exceeded: false,
            },
            memory: None,
            allocate: None,
            return_buffer: None,
            vm: Weak::new(),
            spawn,
            current: Current::idle(),
            contexts: FxHashMap::default(),
            next_context_id: 1,
            next_token: 1,
            http_calls: FxHashMap::default(),
            grpc_calls: FxHashMap::default(),
            queue_tx: None,
            queue_owners: FxHashMap::default(),
            pending_done: FxHashSet::default(),
            deferred_delete: Vec::new(),
            failure_note: None,
            env: plugin
                .cfg
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            last_error_log: None,
        }
    }

    /// A fresh context id (never 0, never one in use).
    pub(crate) fn new_context_id(&mut self) -> u32 {
        loop {
            let id = self.next_context_id;
            self.next_context_id = self.next_context_id.wrapping_add(1).max(1);
            if !self.contexts.contains_key(&id) {
                return id;
            }
        }
    }

    /// A fresh callout token.
    pub fn new_token(&mut self) -> u32 {
        loop {
            let id = self.next_token;
            self.next_token = self.next_token.wrapping_add(1).max(1);
            if !self.http_calls.contains_key(&id) && !self.grpc_calls.contains_key(&id) {
                return id;
            }
        }
    }

    /// The context hostcalls act on.
    pub fn effective(&self) -> Option<&Ctx> {
        self.contexts.get(&self.current.effective)
    }

    /// The root context of the effective context.
    pub fn effective_root(&self) -> u32 {
        self.effective().map_or(self.current.effective, |c| c.root)
    }

    /// Removes a context and stops what belongs to it.
    pub(crate) fn remove_context(&mut self, id: u32) {
        if let Some(ctx) = self.contexts.remove(&id)
            && let Some(tick) = ctx.tick
        {
            tick.abort();
        }
        self.pending_done.remove(&id);
        self.http_calls.retain(|_, c| *c != id);
        self.grpc_calls.retain(|_, c| c.context != id);
    }
}
