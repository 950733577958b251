//! The module's callbacks: their names (for logs and metrics) and their typed
//! handles, resolved once per instance.

use lacewing_abi::names::SKIPPABLE_CALLBACKS;
use wasmtime::{Instance, Store, TypedFunc, WasmParams, WasmResults};

use crate::failure::error_text;
use crate::state::HostState;

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

    /// This callback's bit in [`crate::plugin::PluginShared::unused_callbacks`].
    pub fn bit(self) -> u32 {
        1 << (self as u32)
    }

    /// A stream callback a module may declare unused, by its export name
    /// (the arguments of `lacewing_unused_callbacks`). Skipping one is
    /// exactly what a module that does nothing there would do: continue
    /// (and for `proxy_on_done`, be done).
    pub fn skippable(export: &[u8]) -> Option<Callback> {
        let listed = SKIPPABLE_CALLBACKS.iter().any(|n| n.as_bytes() == export);
        listed
            .then(|| {
                Self::ALL
                    .into_iter()
                    .find(|c| c.name().as_bytes() == export)
            })
            .flatten()
    }

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

/// Arity of a header callback (0.1.0 has no `end_of_stream`).
pub(crate) enum HeadersFn {
    NoEndOfStream(TypedFunc<(i32, i32), i32>),
    WithEndOfStream(TypedFunc<(i32, i32, i32), i32>),
}

/// `proxy_on_http_call_response(context, token, headers, body size, trailers)`.
pub(crate) type HttpCallResponseFn = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// The module's callbacks, resolved once per instance.
pub(crate) struct Exports {
    pub initialize: Option<TypedFunc<(), ()>>,
    pub start: Option<TypedFunc<(), ()>>,
    pub main: Option<TypedFunc<(i32, i32), i32>>,
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

pub(crate) fn typed<P: WasmParams, R: WasmResults>(
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
    pub(crate) fn resolve(
        instance: &Instance,
        store: &mut Store<HostState>,
    ) -> Result<Self, String> {
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
