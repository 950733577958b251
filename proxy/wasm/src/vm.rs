//! One wasm instance (a VM): its `Store` with memory and CPU limits, its
//! contexts, and calls into the module's callbacks. A callback that traps,
//! runs past its deadline or exhausts memory marks the VM broken (see
//! `workers` for what happens next).

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use rustc_hash::FxHashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use wasmtime::{Store, TypedFunc, WasmParams, WasmResults};

use crate::callout::{GrpcEvent, HttpCallResponse};
use crate::plugin::PluginShared;

pub(crate) use crate::exports::{Callback, Exports, HeadersFn, typed};
pub(crate) use crate::failure::{Failure, FailureKind};
pub(crate) use crate::state::{CalloutData, Ctx, CtxKind, GrpcCall, HostState, Phase};
pub(crate) use crate::workers::{VmKey, spawn_local, worker_vm};

/// One instance of a module with its store.
pub(crate) struct Vm {
    store: RefCell<Store<HostState>>,
    pub exports: Exports,
    /// Set when a callback failed: the instance is no longer trusted.
    pub broken: Cell<bool>,
    /// Root context of each plugin in this VM.
    roots: RefCell<FxHashMap<u64, u32>>,
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
        store.data_mut().allocate = allocate.map(Arc::new);
        let vm = Rc::new_cyclic(|weak| {
            store.data_mut().vm = weak.clone();
            Vm {
                store: RefCell::new(store),
                exports,
                broken: Cell::new(false),
                roots: RefCell::new(FxHashMap::default()),
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
        let steps = [
            (
                Callback::VmStart,
                self.exports.on_vm_start.as_ref(),
                plugin.vm_config.len(),
                "on_vm_start returned false",
            ),
            (
                Callback::Configure,
                self.exports.on_configure.as_ref(),
                plugin.plugin_config.len(),
                "on_configure returned false",
            ),
        ];
        self.with_state(|s| s.last_error_log = None);
        for (callback, func, config_size, refusal) in steps {
            let accepted = self.call(
                plugin,
                callback,
                id,
                func,
                (id as i32, config_size as i32),
                |_| {},
            )?;
            if accepted == Some(0) {
                let logged = self
                    .with_state(|s| {
                        s.remove_context(id);
                        s.last_error_log.take()
                    })
                    .flatten();
                return Err(Failure::rejected(match logged {
                    Some(line) => format!("{refusal}: {line}"),
                    None => refusal.to_string(),
                }));
            }
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
        if plugin.skips(Callback::Done) {
            // The module is always done at once (it said so): straight to delete.
            self.delete_context(plugin, id);
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
    /// The root context of context `id` (`id` itself when it is unknown).
    ///
    /// Callout events go to the root context of the context that started the
    /// callout, as in Envoy, which makes every callout on the root context;
    /// SDKs find the calling context by token and make it effective.
    fn root_context_of(&self, id: u32) -> u32 {
        self.with_state(|s| s.contexts.get(&id).map(|c| c.root))
            .flatten()
            .unwrap_or(id)
    }

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
            let timed = plugin
                .metrics
                .callback_started(callback)
                .map(|histogram| (histogram, Instant::now()));
            let result = func.call(&mut *store, params);
            if let Some((histogram, started)) = timed {
                histogram.observe(started.elapsed().as_secs_f64());
            }
            let state = store.data_mut();
            state.current.callout = None;
            state.current.foreign_args = None;
            match result {
                // Looked at under this borrow: almost always empty, and
                // borrowing the store again to find out cost about 30
                // instructions a callback.
                Ok(v) => Ok((v, !state.deferred_delete.is_empty())),
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
            Ok((v, deletes_deferred)) => {
                if deletes_deferred {
                    self.run_deferred_deletes(plugin);
                }
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
        let root = self.root_context_of(context);
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
            root,
            self.exports.on_http_call_response.as_ref(),
            (root as i32, token as i32, nh, nb, nt),
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
        let root = self.root_context_of(context);
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
            root,
            func,
            (root as i32, token as i32, arg),
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

    /// Ends the root contexts of retired plugins (`proxy_on_done`, then
    /// `proxy_on_delete`) and drops their timers and queues; true when no root
    /// is left.
    pub(crate) fn retire_roots(&self) -> bool {
        let retired: Vec<(Arc<PluginShared>, u32)> = self
            .with_state(|s| {
                s.contexts
                    .iter()
                    .filter(|(_, c)| {
                        matches!(c.kind, CtxKind::Root) && c.plugin.retired.load(Ordering::Acquire)
                    })
                    .map(|(id, c)| (c.plugin.clone(), *id))
                    .collect()
            })
            .unwrap_or_default();
        for (plugin, root) in &retired {
            self.finish_context(plugin, *root);
            // A root that asked to finish later (`proxy_done`) goes now: its plugin is gone.
            self.with_state(|s| {
                s.remove_context(*root);
                s.queue_owners.retain(|_, owner| owner != root);
            });
            self.roots.borrow_mut().remove(&plugin.uid);
        }
        self.roots.borrow().is_empty()
    }

    /// A plugin that still has a root context here.
    pub(crate) fn any_root_plugin(&self) -> Option<Arc<PluginShared>> {
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
            stop_queue_delivery(s);
        });
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        stop_queue_delivery(self.store.get_mut().data_mut());
    }
}

/// Ends the task that delivers `proxy_on_queue_ready` to this VM. The shared
/// queues hold senders of its channel too, so it would wait forever; a
/// wake-up lets it see the VM is gone (or broken) and end, which marks this
/// VM's queue registrations dead. Queue id 0 is never a queue.
fn stop_queue_delivery(state: &mut HostState) {
    if let Some(tx) = state.queue_tx.take() {
        let _ = tx.send(0);
    }
}
