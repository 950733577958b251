//! One wasm instance (a VM) and its state: the `Store`, memory and CPU limits,
//! contexts, and calls into the module's callbacks.
//!
//! Each worker thread keeps its own VMs in a thread-local map, created lazily on
//! first use. Plugins with the same non-empty `vm_id` and the same module share
//! one VM (each with its own root context). A callback that traps, runs past
//! its deadline or exhausts memory marks the VM broken; the next stream on that
//! worker gets a fresh VM, at most [`MAX_RESTARTS`] times per [`RESTART_WINDOW`].

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use lacewing_core::stream::{SharedConnection, SharedStream};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::AbortHandle;
use wasmtime::{
    Instance, Memory, ResourceLimiter, Store, Trap, TypedFunc, WasmParams, WasmResults,
};

use crate::callout::{GrpcEvent, GrpcStreamHandle, HttpCallResponse};
use crate::plugin::PluginShared;

/// Most VM recreations per worker and VM within [`RESTART_WINDOW`].
pub(crate) const MAX_RESTARTS: usize = 5;
/// See [`MAX_RESTARTS`].
pub(crate) const RESTART_WINDOW: Duration = Duration::from_secs(10);

/// The module callbacks the host calls, for logs and the duration histogram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Callback {
    Initialize,
    VmStart,
    Configure,
    ContextCreate,
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    Log,
    Done,
    Delete,
    Tick,
    NewConnection,
    DownstreamData,
    UpstreamData,
    DownstreamClose,
    UpstreamClose,
    HttpCallResponse,
    GrpcInitialMetadata,
    GrpcMessage,
    GrpcTrailingMetadata,
    GrpcClose,
    QueueReady,
    ForeignFunction,
}

impl Callback {
    pub const ALL: [Callback; 26] = [
        Self::Initialize,
        Self::VmStart,
        Self::Configure,
        Self::ContextCreate,
        Self::RequestHeaders,
        Self::RequestBody,
        Self::RequestTrailers,
        Self::ResponseHeaders,
        Self::ResponseBody,
        Self::ResponseTrailers,
        Self::Log,
        Self::Done,
        Self::Delete,
        Self::Tick,
        Self::NewConnection,
        Self::DownstreamData,
        Self::UpstreamData,
        Self::DownstreamClose,
        Self::UpstreamClose,
        Self::HttpCallResponse,
        Self::GrpcInitialMetadata,
        Self::GrpcMessage,
        Self::GrpcTrailingMetadata,
        Self::GrpcClose,
        Self::QueueReady,
        Self::ForeignFunction,
    ];

    /// Whether the data plane is inside this callback for its stream (and so
    /// is not waiting to be resumed).
    pub fn is_stream_phase(self) -> bool {
        matches!(
            self,
            Self::RequestHeaders
                | Self::RequestBody
                | Self::RequestTrailers
                | Self::ResponseHeaders
                | Self::ResponseBody
                | Self::ResponseTrailers
                | Self::NewConnection
                | Self::DownstreamData
                | Self::UpstreamData
        )
    }

    /// The export name (label of the duration histogram).
    pub fn name(self) -> &'static str {
        match self {
            Self::Initialize => "_initialize",
            Self::VmStart => "proxy_on_vm_start",
            Self::Configure => "proxy_on_configure",
            Self::ContextCreate => "proxy_on_context_create",
            Self::RequestHeaders => "proxy_on_request_headers",
            Self::RequestBody => "proxy_on_request_body",
            Self::RequestTrailers => "proxy_on_request_trailers",
            Self::ResponseHeaders => "proxy_on_response_headers",
            Self::ResponseBody => "proxy_on_response_body",
            Self::ResponseTrailers => "proxy_on_response_trailers",
            Self::Log => "proxy_on_log",
            Self::Done => "proxy_on_done",
            Self::Delete => "proxy_on_delete",
            Self::Tick => "proxy_on_tick",
            Self::NewConnection => "proxy_on_new_connection",
            Self::DownstreamData => "proxy_on_downstream_data",
            Self::UpstreamData => "proxy_on_upstream_data",
            Self::DownstreamClose => "proxy_on_downstream_connection_close",
            Self::UpstreamClose => "proxy_on_upstream_connection_close",
            Self::HttpCallResponse => "proxy_on_http_call_response",
            Self::GrpcInitialMetadata => "proxy_on_grpc_receive_initial_metadata",
            Self::GrpcMessage => "proxy_on_grpc_receive",
            Self::GrpcTrailingMetadata => "proxy_on_grpc_receive_trailing_metadata",
            Self::GrpcClose => "proxy_on_grpc_close",
            Self::QueueReady => "proxy_on_queue_ready",
            Self::ForeignFunction => "proxy_on_foreign_function",
        }
    }
}

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
    fn idle() -> Self {
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
    cap: usize,
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
    pub allocate: Option<TypedFunc<i32, i32>>,
    pub vm: Weak<Vm>,
    /// Whether hostcalls may start tasks (false for the load-time validation instance).
    pub spawn: bool,
    pub current: Current,
    pub contexts: HashMap<u32, Ctx>,
    next_context_id: u32,
    next_token: u32,
    /// Pending HTTP calls: token to calling context.
    pub http_calls: HashMap<u32, u32>,
    pub grpc_calls: HashMap<u32, GrpcCall>,
    /// Sender of this VM's queue-ready task, created on first registration.
    pub queue_tx: Option<UnboundedSender<u32>>,
    /// Queue id to the root context that registered it.
    pub queue_owners: HashMap<u32, u32>,
    /// Contexts whose `proxy_on_done` returned false.
    pub pending_done: HashSet<u32>,
    /// Contexts to delete once the running callback returns.
    pub deferred_delete: Vec<u32>,
    /// Why the running callback must stop (set by hostcalls that trap on purpose).
    pub failure_note: Option<String>,
    /// WASI environment, `KEY=VALUE`.
    pub env: Vec<String>,
}

impl HostState {
    fn new(plugin: &Arc<PluginShared>, spawn: bool) -> Self {
        Self {
            plugin: plugin.clone(),
            limiter: MemoryLimiter {
                cap: plugin.memory_cap,
                exceeded: false,
            },
            memory: None,
            allocate: None,
            vm: Weak::new(),
            spawn,
            current: Current::idle(),
            contexts: HashMap::new(),
            next_context_id: 1,
            next_token: 1,
            http_calls: HashMap::new(),
            grpc_calls: HashMap::new(),
            queue_tx: None,
            queue_owners: HashMap::new(),
            pending_done: HashSet::new(),
            deferred_delete: Vec::new(),
            failure_note: None,
            env: plugin
                .cfg
                .env
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
        }
    }

    /// A fresh context id (never 0, never one in use).
    fn new_context_id(&mut self) -> u32 {
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
    fn remove_context(&mut self, id: u32) {
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

/// Why a callback or a VM failed.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub kind: FailureKind,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FailureKind {
    /// The module trapped (including `proc_exit`).
    Trap,
    /// The callback ran past its CPU deadline.
    Deadline,
    /// The module needed more memory than allowed.
    Memory,
    /// A start callback said no, or an export is unusable.
    Rejected,
    /// The VM is broken or cannot be (re)created now.
    Unavailable,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Failure {
    pub fn rejected(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Rejected,
            message: message.into(),
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            kind: FailureKind::Unavailable,
            message: message.into(),
        }
    }

    fn classify(
        what: &str,
        error: wasmtime::Error,
        note: Option<String>,
        memory_hit: bool,
        cap: usize,
    ) -> Self {
        if error.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return Self {
                kind: FailureKind::Deadline,
                message: format!("{what} exceeded its CPU deadline"),
            };
        }
        if memory_hit {
            return Self {
                kind: FailureKind::Memory,
                message: format!(
                    "{what} exceeded the memory limit of {cap} bytes: {}",
                    error_text(&error)
                ),
            };
        }
        if let Some(note) = note {
            return Self {
                kind: FailureKind::Trap,
                message: format!("{what}: {note}"),
            };
        }
        Self {
            kind: FailureKind::Trap,
            message: format!("{what} trapped: {}", error_text(&error)),
        }
    }
}

/// An error's message with its causes on one line, and for a trap the
/// innermost wasm function it happened in.
fn error_text(error: &wasmtime::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(trap) = error.downcast_ref::<Trap>() {
        parts.push(trap.to_string());
    }
    for cause in error.chain() {
        if cause.is::<Trap>() {
            continue;
        }
        let text = cause.to_string();
        let first = text
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .trim_end_matches(':')
            .to_string();
        if !first.is_empty()
            && !first.starts_with("error while executing")
            && !parts.contains(&first)
        {
            parts.push(first);
        }
    }
    // The innermost frame, demangled as the backtrace prints it ("  0: 0x1f - name").
    if let Some(frame) = error
        .downcast_ref::<wasmtime::WasmBacktrace>()
        .and_then(|bt| {
            bt.to_string()
                .lines()
                .find_map(|l| l.split_once(" - ").map(|(_, f)| f.trim().to_string()))
        })
    {
        parts.push(format!("in {frame}"));
    }
    parts.join(": ")
}

/// Arity of a header callback (0.1.0 has no `end_of_stream`).
pub(crate) enum HeadersFn {
    NoEndOfStream(TypedFunc<(i32, i32), i32>),
    WithEndOfStream(TypedFunc<(i32, i32, i32), i32>),
}

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
pub(crate) type HttpCallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// The module's callbacks, resolved once per instance.
pub(crate) struct Exports {
    initialize: Option<TypedFunc<(), ()>>,
    start: Option<TypedFunc<(), ()>>,
    main: Option<TypedFunc<(i32, i32), i32>>,
    pub on_vm_start: Option<TypedFunc<(i32, i32), i32>>,
    pub on_configure: Option<TypedFunc<(i32, i32), i32>>,
    pub on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    pub on_done: Option<TypedFunc<i32, i32>>,
    pub on_log: Option<TypedFunc<i32, ()>>,
    pub on_delete: Option<TypedFunc<i32, ()>>,
    pub on_tick: Option<TypedFunc<i32, ()>>,
    pub on_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
    pub on_new_connection: Option<TypedFunc<i32, i32>>,
    pub on_downstream_data: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_upstream_data: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_downstream_close: Option<TypedFunc<(i32, i32), ()>>,
    pub on_upstream_close: Option<TypedFunc<(i32, i32), ()>>,
    pub on_request_headers: Option<HeadersFn>,
    pub on_request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_request_trailers: Option<TypedFunc<(i32, i32), i32>>,
    pub on_response_headers: Option<HeadersFn>,
    pub on_response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    pub on_response_trailers: Option<TypedFunc<(i32, i32), i32>>,
    pub on_http_call_response: Option<HttpCallResponseFn>,
    pub on_grpc_initial_metadata: Option<TypedFunc<(i32, i32, i32), ()>>,
    pub on_grpc_message: Option<TypedFunc<(i32, i32, i32), ()>>,
    pub on_grpc_trailing_metadata: Option<TypedFunc<(i32, i32, i32), ()>>,
    pub on_grpc_close: Option<TypedFunc<(i32, i32, i32), ()>>,
}

fn typed<P: WasmParams, R: WasmResults>(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>, String> {
    match instance.get_func(&mut *store, name) {
        None => Ok(None),
        Some(f) => f
            .typed::<P, R>(&*store)
            .map(Some)
            .map_err(|e| format!("export {name} has the wrong signature: {}", error_text(&e))),
    }
}

fn headers_fn(
    instance: &Instance,
    store: &mut Store<HostState>,
    name: &str,
) -> Result<Option<HeadersFn>, String> {
    let Some(f) = instance.get_func(&mut *store, name) else {
        return Ok(None);
    };
    if f.ty(&*store).params().len() == 2 {
        typed(instance, store, name).map(|f| f.map(HeadersFn::NoEndOfStream))
    } else {
        typed(instance, store, name).map(|f| f.map(HeadersFn::WithEndOfStream))
    }
}

impl Exports {
    fn resolve(instance: &Instance, store: &mut Store<HostState>) -> Result<Self, String> {
        let exports = Self {
            initialize: typed(instance, store, "_initialize")?,
            start: typed(instance, store, "_start")?,
            // `main` comes in several shapes; only the (argc, argv) one is called.
            main: typed(instance, store, "main").ok().flatten(),
            on_vm_start: typed(instance, store, "proxy_on_vm_start")?,
            on_configure: typed(instance, store, "proxy_on_configure")?,
            on_context_create: typed(instance, store, "proxy_on_context_create")?,
            on_done: typed(instance, store, "proxy_on_done")?,
            on_log: typed(instance, store, "proxy_on_log")?,
            on_delete: typed(instance, store, "proxy_on_delete")?,
            on_tick: typed(instance, store, "proxy_on_tick")?,
            on_queue_ready: typed(instance, store, "proxy_on_queue_ready")?,
            on_new_connection: typed(instance, store, "proxy_on_new_connection")?,
            on_downstream_data: typed(instance, store, "proxy_on_downstream_data")?,
            on_upstream_data: typed(instance, store, "proxy_on_upstream_data")?,
            on_downstream_close: typed(instance, store, "proxy_on_downstream_connection_close")?,
            on_upstream_close: typed(instance, store, "proxy_on_upstream_connection_close")?,
            on_request_headers: headers_fn(instance, store, "proxy_on_request_headers")?,
            on_request_body: typed(instance, store, "proxy_on_request_body")?,
            on_request_trailers: typed(instance, store, "proxy_on_request_trailers")?,
            on_response_headers: headers_fn(instance, store, "proxy_on_response_headers")?,
            on_response_body: typed(instance, store, "proxy_on_response_body")?,
            on_response_trailers: typed(instance, store, "proxy_on_response_trailers")?,
            on_http_call_response: typed(instance, store, "proxy_on_http_call_response")?,
            on_grpc_initial_metadata: typed(
                instance,
                store,
                "proxy_on_grpc_receive_initial_metadata",
            )?,
            on_grpc_message: typed(instance, store, "proxy_on_grpc_receive")?,
            on_grpc_trailing_metadata: typed(
                instance,
                store,
                "proxy_on_grpc_receive_trailing_metadata",
            )?,
            on_grpc_close: typed(instance, store, "proxy_on_grpc_close")?,
        };
        // Lacewing registers no foreign callbacks, so this export is never
        // called; its signature is still checked.
        typed::<(i32, i32, i32), ()>(instance, store, "proxy_on_foreign_function")?;
        Ok(exports)
    }
}

/// Identifies a VM in a worker's map.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) enum VmKey {
    /// A plugin with its own VM.
    Plugin(u64),
    /// Plugins sharing a VM by `vm_id` and module.
    Shared {
        host: u64,
        vm_id: String,
        sha256: [u8; 32],
    },
}

/// One instance of a module with its store.
pub(crate) struct Vm {
    store: RefCell<Store<HostState>>,
    pub exports: Exports,
    /// Set when a callback failed: the instance is no longer trusted.
    pub broken: Cell<bool>,
    /// Root context of each plugin in this VM.
    roots: RefCell<HashMap<u64, u32>>,
}

impl Vm {
    /// Instantiates the module and runs its initialization (`_initialize` and
    /// `main`, or `_start`).
    /// `spawn` says whether hostcalls may start tasks (only on worker threads).
    pub fn start(plugin: &Arc<PluginShared>, spawn: bool) -> Result<Rc<Vm>, Failure> {
        let mut store = Store::new(&plugin.host.engine.engine, HostState::new(plugin, spawn));
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(plugin.deadline_ticks);
        let instance = match plugin.pre.instantiate(&mut store) {
            Ok(i) => i,
            Err(e) => {
                let state = store.data_mut();
                let note = state.failure_note.take();
                let memory_hit = std::mem::take(&mut state.limiter.exceeded);
                return Err(Failure::classify(
                    "instantiation",
                    e,
                    note,
                    memory_hit,
                    plugin.memory_cap,
                ));
            }
        };
        let memory = instance.get_memory(&mut store, "memory");
        let allocate = match typed::<i32, i32>(&instance, &mut store, "proxy_on_memory_allocate")
            .map_err(Failure::rejected)?
        {
            Some(f) => Some(f),
            None => typed::<i32, i32>(&instance, &mut store, "malloc")
                .ok()
                .flatten(),
        };
        let exports = Exports::resolve(&instance, &mut store).map_err(Failure::rejected)?;
        store.data_mut().memory = memory;
        store.data_mut().allocate = allocate;
        let vm = Rc::new_cyclic(|weak| {
            store.data_mut().vm = weak.clone();
            Vm {
                store: RefCell::new(store),
                exports,
                broken: Cell::new(false),
                roots: RefCell::new(HashMap::new()),
            }
        });
        if vm.exports.initialize.is_some() {
            vm.call(
                plugin,
                Callback::Initialize,
                0,
                vm.exports.initialize.as_ref(),
                (),
                |_| {},
            )?;
            vm.call(
                plugin,
                Callback::Initialize,
                0,
                vm.exports.main.as_ref(),
                (0, 0),
                |_| {},
            )?;
        } else {
            vm.call(
                plugin,
                Callback::Initialize,
                0,
                vm.exports.start.as_ref(),
                (),
                |_| {},
            )?;
        }
        Ok(vm)
    }

    /// The root context of `plugin` in this VM, if it was created.
    pub fn root_of(&self, plugin: &PluginShared) -> Option<u32> {
        self.roots.borrow().get(&plugin.uid).copied()
    }

    /// Creates the plugin's root context and runs `proxy_on_vm_start` and
    /// `proxy_on_configure` on it.
    pub fn create_root(&self, plugin: &Arc<PluginShared>) -> Result<u32, Failure> {
        let id = self.new_context(plugin, None, CtxKind::Root)?;
        self.call(
            plugin,
            Callback::ContextCreate,
            id,
            self.exports.on_context_create.as_ref(),
            (id as i32, 0),
            |_| {},
        )?;
        // As in Envoy, `proxy_on_vm_start` gets the root context id (SDKs look it up).
        let size = plugin.vm_config.len() as i32;
        let started = self.call(
            plugin,
            Callback::VmStart,
            id,
            self.exports.on_vm_start.as_ref(),
            (id as i32, size),
            |_| {},
        )?;
        if started == Some(0) {
            self.with_state(|s| s.remove_context(id));
            return Err(Failure::rejected("on_vm_start returned false"));
        }
        let size = plugin.plugin_config.len() as i32;
        let configured = self.call(
            plugin,
            Callback::Configure,
            id,
            self.exports.on_configure.as_ref(),
            (id as i32, size),
            |_| {},
        )?;
        if configured == Some(0) {
            self.with_state(|s| s.remove_context(id));
            return Err(Failure::rejected("on_configure returned false"));
        }
        self.roots.borrow_mut().insert(plugin.uid, id);
        Ok(id)
    }

    /// Registers a context (a root when `root` is `None`) and returns its id.
    pub fn new_context(
        &self,
        plugin: &Arc<PluginShared>,
        root: Option<u32>,
        kind: CtxKind,
    ) -> Result<u32, Failure> {
        self.with_state(|s| {
            let id = s.new_context_id();
            s.contexts.insert(
                id,
                Ctx {
                    root: root.unwrap_or(id),
                    plugin: plugin.clone(),
                    kind,
                    phase: Phase::Created,
                    tick: None,
                    properties: HashMap::new(),
                },
            );
            id
        })
        .ok_or_else(|| Failure::unavailable("VM is busy"))
    }

    /// Creates a stream context under `root` and runs `proxy_on_context_create`.
    pub fn create_stream_context(
        &self,
        plugin: &Arc<PluginShared>,
        root: u32,
        kind: CtxKind,
    ) -> Result<u32, Failure> {
        let id = self.new_context(plugin, Some(root), kind)?;
        if let Err(f) = self.call(
            plugin,
            Callback::ContextCreate,
            id,
            self.exports.on_context_create.as_ref(),
            (id as i32, root as i32),
            |_| {},
        ) {
            self.with_state(|s| s.remove_context(id));
            return Err(f);
        }
        Ok(id)
    }

    /// Ends a stream context: `proxy_on_done`, then `proxy_on_delete` unless the
    /// module asked to finish later with `proxy_done`.
    pub fn finish_context(&self, plugin: &Arc<PluginShared>, id: u32) {
        if self.broken.get() {
            self.with_state(|s| s.remove_context(id));
            return;
        }
        match self.call(
            plugin,
            Callback::Done,
            id,
            self.exports.on_done.as_ref(),
            id as i32,
            |_| {},
        ) {
            Ok(Some(0)) => {
                self.with_state(|s| s.pending_done.insert(id));
            }
            Ok(_) => self.delete_context(plugin, id),
            Err(_) => {
                self.with_state(|s| s.remove_context(id));
            }
        }
    }

    fn delete_context(&self, plugin: &Arc<PluginShared>, id: u32) {
        let _ = self.call(
            plugin,
            Callback::Delete,
            id,
            self.exports.on_delete.as_ref(),
            id as i32,
            |_| {},
        );
        self.with_state(|s| s.remove_context(id));
    }

    /// Sets the phase of a context.
    pub fn set_phase(&self, id: u32, phase: Phase) {
        self.with_state(|s| {
            if let Some(c) = s.contexts.get_mut(&id) {
                c.phase = phase;
            }
        });
    }

    /// Runs `f` on the store data unless a callback is running.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut HostState) -> R) -> Option<R> {
        let mut store = self.store.try_borrow_mut().ok()?;
        Some(f(store.data_mut()))
    }

    /// The plugin that owns a context.
    pub fn plugin_of(&self, id: u32) -> Option<Arc<PluginShared>> {
        self.with_state(|s| s.contexts.get(&id).map(|c| c.plugin.clone()))
            .flatten()
    }

    /// Calls one export. `Ok(None)` when the module does not export it. A
    /// failure marks the VM broken, is logged with the plugin and callback
    /// names, and is counted.
    pub fn call<P: WasmParams, R: WasmResults>(
        &self,
        plugin: &Arc<PluginShared>,
        callback: Callback,
        context: u32,
        func: Option<&TypedFunc<P, R>>,
        params: P,
        prepare: impl FnOnce(&mut HostState),
    ) -> Result<Option<R>, Failure> {
        let Some(func) = func else {
            return Ok(None);
        };
        if self.broken.get() {
            return Err(Failure::unavailable("the plugin VM failed earlier"));
        }
        let result = {
            let Ok(mut store) = self.store.try_borrow_mut() else {
                return Err(Failure::unavailable(format!(
                    "{} called while the VM is busy",
                    callback.name()
                )));
            };
            store.set_epoch_deadline(plugin.deadline_ticks);
            let state = store.data_mut();
            if !Arc::ptr_eq(&state.plugin, plugin) {
                state.plugin = plugin.clone();
            }
            state.current.origin = context;
            state.current.effective = context;
            state.current.callback = callback;
            prepare(state);
            let started = Instant::now();
            let result = func.call(&mut *store, params);
            plugin
                .metrics
                .observe(callback, started.elapsed().as_secs_f64());
            let state = store.data_mut();
            state.current.callout = None;
            state.current.foreign_args = None;
            match result {
                Ok(v) => Ok(v),
                Err(e) => {
                    let note = state.failure_note.take();
                    let memory_hit = std::mem::take(&mut state.limiter.exceeded);
                    Err(Failure::classify(
                        callback.name(),
                        e,
                        note,
                        memory_hit,
                        plugin.memory_cap,
                    ))
                }
            }
        };
        match result {
            Ok(v) => {
                self.run_deferred_deletes(plugin);
                Ok(Some(v))
            }
            Err(failure) => Err(self.fail(plugin, callback, failure)),
        }
    }

    /// Records a failed callback and retires the VM.
    fn fail(&self, plugin: &PluginShared, callback: Callback, failure: Failure) -> Failure {
        self.broken.set(true);
        match failure.kind {
            FailureKind::Deadline => plugin.metrics.deadlines.inc(),
            _ => plugin.metrics.traps.inc(),
        }
        tracing::error!(plugin = %plugin.name, callback = callback.name(), "wasm plugin failed: {}", failure.message);
        failure
    }

    fn run_deferred_deletes(&self, plugin: &Arc<PluginShared>) {
        loop {
            let Some(ids) = self.with_state(|s| std::mem::take(&mut s.deferred_delete)) else {
                return;
            };
            if ids.is_empty() {
                return;
            }
            for id in ids {
                let owner = self.plugin_of(id).unwrap_or_else(|| plugin.clone());
                self.delete_context(&owner, id);
            }
        }
    }

    /// Runs `proxy_on_tick` on a root context.
    pub fn deliver_tick(&self, root: u32) {
        if let Some(plugin) = self.plugin_of(root) {
            let _ = self.call(
                &plugin,
                Callback::Tick,
                root,
                self.exports.on_tick.as_ref(),
                root as i32,
                |_| {},
            );
        }
    }

    /// Runs `proxy_on_queue_ready` on the root context that registered the queue.
    pub fn deliver_queue_ready(&self, queue: u32) {
        let Some(root) = self
            .with_state(|s| s.queue_owners.get(&queue).copied())
            .flatten()
        else {
            return;
        };
        if let Some(plugin) = self.plugin_of(root) {
            let _ = self.call(
                &plugin,
                Callback::QueueReady,
                root,
                self.exports.on_queue_ready.as_ref(),
                (root as i32, queue as i32),
                |_| {},
            );
        }
    }

    /// Runs `proxy_on_http_call_response` with the response (or failure) visible.
    pub fn deliver_http_response(&self, token: u32, response: Result<HttpCallResponse, String>) {
        let Some(context) = self.with_state(|s| s.http_calls.remove(&token)).flatten() else {
            return;
        };
        let Some(plugin) = self.plugin_of(context) else {
            return;
        };
        let data = match response {
            Ok(r) => {
                let mut headers = Vec::with_capacity(r.headers.len() + 1);
                if !r.headers.iter().any(|(k, _)| k == ":status") {
                    headers.push((":status".to_string(), Bytes::from(r.status.to_string())));
                }
                headers.extend(r.headers);
                CalloutData {
                    headers,
                    body: r.body,
                    trailers: r.trailers,
                    status: 0,
                    message: String::new(),
                }
            }
            Err(message) => CalloutData {
                status: lacewing_abi::Status::InternalFailure as u32,
                message,
                ..CalloutData::default()
            },
        };
        let (nh, nb, nt) = (
            data.headers.len() as i32,
            data.body.len() as i32,
            data.trailers.len() as i32,
        );
        let result = self.call(
            &plugin,
            Callback::HttpCallResponse,
            context,
            self.exports.on_http_call_response.as_ref(),
            (context as i32, token as i32, nh, nb, nt),
            |s| s.current.callout = Some(data),
        );
        if let Err(f) = result {
            self.fail_context(&plugin, context, &f);
        }
    }

    /// Runs the gRPC callback for one event of call `token`.
    pub fn deliver_grpc(&self, token: u32, event: GrpcEvent) {
        let Some(context) = self
            .with_state(|s| s.grpc_calls.get(&token).map(|c| c.context))
            .flatten()
        else {
            return;
        };
        let Some(plugin) = self.plugin_of(context) else {
            return;
        };
        let (cb, func, arg, data) = match event {
            GrpcEvent::InitialMetadata(md) => (
                Callback::GrpcInitialMetadata,
                self.exports.on_grpc_initial_metadata.as_ref(),
                md.len() as i32,
                CalloutData {
                    headers: md,
                    ..CalloutData::default()
                },
            ),
            GrpcEvent::Message(body) => (
                Callback::GrpcMessage,
                self.exports.on_grpc_message.as_ref(),
                body.len() as i32,
                CalloutData {
                    body,
                    ..CalloutData::default()
                },
            ),
            GrpcEvent::TrailingMetadata(md) => (
                Callback::GrpcTrailingMetadata,
                self.exports.on_grpc_trailing_metadata.as_ref(),
                md.len() as i32,
                CalloutData {
                    trailers: md,
                    ..CalloutData::default()
                },
            ),
            GrpcEvent::Close { status, message } => {
                self.with_state(|s| s.grpc_calls.remove(&token));
                (
                    Callback::GrpcClose,
                    self.exports.on_grpc_close.as_ref(),
                    status as i32,
                    CalloutData {
                        status,
                        message,
                        ..CalloutData::default()
                    },
                )
            }
        };
        let result = self.call(
            &plugin,
            cb,
            context,
            func,
            (context as i32, token as i32, arg),
            |s| s.current.callout = Some(data),
        );
        if let Err(f) = result {
            self.fail_context(&plugin, context, &f);
        }
    }

    /// A callback delivered outside the stream's own callbacks failed: fail the
    /// stream it belongs to (if any) by the plugin's policy and wake it.
    fn fail_context(&self, plugin: &PluginShared, context: u32, failure: &Failure) {
        let target = self
            .with_state(|s| {
                s.contexts.get(&context).map(|c| match &c.kind {
                    CtxKind::Http(stream) => Some((Some(stream.clone()), None, c.phase)),
                    CtxKind::Net(conn) => Some((None, Some(conn.clone()), c.phase)),
                    CtxKind::Root => None,
                })
            })
            .flatten()
            .flatten();
        match target {
            Some((Some(stream), _, phase)) => {
                crate::filter::fail_http_stream(&stream, plugin, phase, failure);
                stream.borrow().resume();
            }
            Some((_, Some(conn), _)) => {
                crate::filter::fail_connection(&conn, plugin);
                conn.borrow().resume();
            }
            _ => {}
        }
    }

    /// Drops the root contexts (and their timers and queues) of retired
    /// plugins; true when no root is left. No module code runs.
    fn retire_roots(&self) -> bool {
        let retired: Vec<(u64, u32)> = self
            .with_state(|s| {
                s.contexts
                    .iter()
                    .filter(|(_, c)| {
                        matches!(c.kind, CtxKind::Root) && c.plugin.retired.load(Ordering::Acquire)
                    })
                    .map(|(id, c)| (c.plugin.uid, *id))
                    .collect()
            })
            .unwrap_or_default();
        if !retired.is_empty() {
            self.with_state(|s| {
                for (_, root) in &retired {
                    s.remove_context(*root);
                    s.queue_owners.retain(|_, owner| owner != root);
                }
            });
            let mut roots = self.roots.borrow_mut();
            for (uid, _) in &retired {
                roots.remove(uid);
            }
        }
        self.roots.borrow().is_empty()
    }

    /// A plugin that still has a root context here.
    fn any_root_plugin(&self) -> Option<Arc<PluginShared>> {
        self.with_state(|s| {
            s.contexts
                .values()
                .find(|c| matches!(c.kind, CtxKind::Root))
                .map(|c| c.plugin.clone())
        })
        .flatten()
    }

    /// Retires a VM that is no longer used (drops its contexts and timers).
    pub fn shutdown(&self) {
        self.broken.set(true);
        self.with_state(|s| {
            let ids: Vec<u32> = s.contexts.keys().copied().collect();
            for id in ids {
                s.remove_context(id);
            }
            s.queue_tx = None;
        });
    }
}

/// Starts a task on the current thread's `LocalSet`. `None` when the thread
/// runs none (callouts and timers then cannot work here), instead of letting
/// tokio's panic escape into the data plane.
pub(crate) fn spawn_local<F: std::future::Future<Output = ()> + 'static>(
    task: F,
) -> Option<tokio::task::JoinHandle<()>> {
    let spawned = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tokio::task::spawn_local(task)
    }));
    if spawned.is_err() {
        tracing::error!(
            "wasm host: no tokio LocalSet on this thread; callouts and timers are unavailable"
        );
    }
    spawned.ok()
}

/// A worker's VMs and their restart history.
struct WorkerSlot {
    vm: Option<Rc<Vm>>,
    restarts: VecDeque<Instant>,
    owner: std::sync::Weak<PluginShared>,
}

thread_local! {
    static WORKER_VMS: RefCell<HashMap<VmKey, WorkerSlot>> = RefCell::new(HashMap::new());
    /// The (host, retired generation) this worker last swept for.
    static SWEPT: Cell<(u64, u64)> = const { Cell::new((0, 0)) };
}

/// Forgets this worker's VMs of dropped plugins and their root contexts.
/// VMs still used by streams in flight live on until those streams end.
fn retire_dropped_plugins() {
    let slots: Vec<(VmKey, Option<Rc<Vm>>)> = WORKER_VMS.with(|m| {
        m.borrow()
            .iter()
            .map(|(k, s)| (k.clone(), s.vm.clone()))
            .collect()
    });
    let mut idle = Vec::new();
    let mut new_owners = Vec::new();
    for (key, vm) in slots {
        match vm {
            Some(vm) if !vm.retire_roots() => {
                if let Some(owner) = vm.any_root_plugin() {
                    new_owners.push((key, owner));
                }
            }
            _ => idle.push(key),
        }
    }
    WORKER_VMS.with(|m| {
        let mut map = m.borrow_mut();
        for (key, owner) in new_owners {
            if let Some(slot) = map.get_mut(&key) {
                slot.owner = Arc::downgrade(&owner);
            }
        }
        for key in idle {
            let retired = map.get(&key).is_some_and(|s| {
                s.owner
                    .upgrade()
                    .is_none_or(|p| p.retired.load(Ordering::Acquire))
            });
            if retired {
                map.remove(&key);
            }
        }
    });
}

/// The VM of `plugin` on this worker thread and the plugin's root context in
/// it, creating (or recreating, rate-limited) the VM when needed.
pub(crate) fn worker_vm(plugin: &Arc<PluginShared>) -> Result<(Rc<Vm>, u32), Failure> {
    let host = &plugin.host;
    let generation = (host.uid, host.retired_generation.load(Ordering::Acquire));
    if SWEPT.with(Cell::get) != generation {
        SWEPT.with(|s| s.set(generation));
        retire_dropped_plugins();
    }
    let existing = WORKER_VMS.with(|m| m.borrow().get(&plugin.vm_key).and_then(|s| s.vm.clone()));
    if let Some(vm) = &existing
        && !vm.broken.get()
    {
        if let Some(root) = vm.root_of(plugin) {
            return Ok((vm.clone(), root));
        }
        let root = vm.create_root(plugin)?;
        return Ok((vm.clone(), root));
    }
    let now = Instant::now();
    // Every creation after the first on this worker is a restart, rate-limited.
    let (allowed, restart) = WORKER_VMS.with(|m| {
        let mut map = m.borrow_mut();
        let restart = map.contains_key(&plugin.vm_key);
        let slot = map
            .entry(plugin.vm_key.clone())
            .or_insert_with(|| WorkerSlot {
                vm: None,
                restarts: VecDeque::new(),
                owner: Arc::downgrade(plugin),
            });
        if let Some(old) = slot.vm.take() {
            old.shutdown();
        }
        while slot
            .restarts
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            slot.restarts.pop_front();
        }
        if restart {
            if slot.restarts.len() >= MAX_RESTARTS {
                return (false, true);
            }
            slot.restarts.push_back(now);
        }
        (true, restart)
    });
    if !allowed {
        return Err(Failure::unavailable(format!(
            "VM restart limit reached ({MAX_RESTARTS} in {}s)",
            RESTART_WINDOW.as_secs()
        )));
    }
    if restart {
        plugin.metrics.restarts.inc();
        tracing::warn!(plugin = %plugin.name, "recreating the plugin VM after a failure");
    }
    let vm = Vm::start(plugin, true)?;
    WORKER_VMS.with(|m| {
        if let Some(slot) = m.borrow_mut().get_mut(&plugin.vm_key) {
            slot.vm = Some(vm.clone());
        }
    });
    let root = vm.create_root(plugin)?;
    Ok((vm, root))
}
