//! The exported proxy-wasm callbacks, routed to a [`Plugin`] and its
//! [`Filter`]s. [`crate::register!`] instantiates this for one plugin type; a
//! filter author never calls it directly.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::rc::Rc;
use std::thread::LocalKey;

use lacewing_abi::{BufferType, StreamType};

use crate::callout::{self, CURRENT, GrpcContinuation, HttpContinuation, Pending};
use crate::http::{Body, Headers};
use crate::{Action, Filter, Plugin, hostcalls};

/// One stream's filter and where it paused.
struct Slot<F> {
    filter: F,
    /// The root context (plugin) the stream belongs to.
    root: u32,
    /// Whether the response has started: a resume then continues the response.
    response_started: bool,
}

/// Hashes the context ids the host assigns with one multiplication: every
/// callback looks its context up, and SipHash (std's default, keyed against
/// untrusted input these ids are not) costs a few hundred wasm instructions.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, n: u32) {
        self.0 = (self.0 ^ u64::from(n)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

type IdMap<V> = HashMap<u32, V, BuildHasherDefault<IdHasher>>;

/// Contexts of one plugin type on this thread.
pub struct Dispatcher<P: Plugin> {
    roots: IdMap<Option<Rc<P>>>,
    /// A stream's filter; `None` while its callback runs or when the plugin was never configured.
    streams: IdMap<Option<Slot<P::Filter>>>,
}

impl<P: Plugin> Default for Dispatcher<P> {
    fn default() -> Self {
        Self {
            roots: IdMap::default(),
            streams: IdMap::default(),
        }
    }
}

impl<P: Plugin> std::fmt::Debug for Dispatcher<P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("roots", &self.roots.len())
            .field("streams", &self.streams.len())
            .finish()
    }
}

/// The thread-local dispatcher of a plugin type, as [`crate::register!`] declares it.
pub type Key<P> = LocalKey<RefCell<Dispatcher<P>>>;

/// Parses a configuration the way [`Plugin::Config`] documents: absent or blank is `{}`.
pub fn parse_config<C: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<C, String> {
    let text =
        core::str::from_utf8(bytes).map_err(|e| format!("configuration is not UTF-8: {e}"))?;
    let text = if text.trim().is_empty() { "{}" } else { text };
    serde_json::from_str(text).map_err(|e| format!("invalid configuration: {e}"))
}

/// [`parse_config`], except for [`crate::NoConfig`], which takes no parser
/// (so a filter without configuration carries no JSON code).
fn read_config<C: serde::de::DeserializeOwned + 'static>(bytes: &[u8]) -> Result<C, String> {
    if core::any::TypeId::of::<C>() == core::any::TypeId::of::<crate::NoConfig>() {
        if !bytes.iter().all(u8::is_ascii_whitespace) {
            return Err("this plugin takes no configuration".into());
        }
        let none: Box<dyn core::any::Any> = Box::new(crate::NoConfig);
        return none
            .downcast::<C>()
            .map(|c| *c)
            .map_err(|_| "configuration type mismatch".to_string());
    }
    parse_config(bytes)
}

/// `_initialize`, which hosts call once before any other export (Lacewing and
/// Envoy both do): runs the module's static constructors (wasi-libc's).
///
/// Without an explicit call to `__wasm_call_ctors`, the linker treats the
/// module as a command and wraps every export in a call to the constructors
/// and one to the destructors: about 700 wasm instructions a request for a
/// filter, in a module whose exports the host calls a few times a request.
#[allow(unsafe_code)]
pub fn initialize() {
    #[cfg(target_arch = "wasm32")]
    {
        unsafe extern "C" {
            fn __wasm_call_ctors();
        }
        // SAFETY: the linker's constructor list, run once, before the host
        // calls any other export (the reactor convention).
        unsafe { __wasm_call_ctors() }
    }
}

/// `proxy_on_context_create`.
pub fn context_create<P: Plugin>(key: &'static Key<P>, ctx: u32, parent: u32) {
    key.with(|d| {
        let mut d = d.borrow_mut();
        if parent == 0 {
            d.roots.insert(ctx, None);
            return;
        }
        let plugin = d.roots.get(&parent).cloned().flatten();
        let slot = plugin.map(|p| Slot {
            filter: p.new_filter(),
            root: parent,
            response_started: false,
        });
        d.streams.insert(ctx, slot);
    });
}

/// A stream callback a [`Filter`] may leave to its default (which does
/// nothing and continues), in the order of
/// [`lacewing_abi::names::SKIPPABLE_CALLBACKS`].
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum Unused {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
    Log,
    Done,
}

impl Unused {
    fn export(self) -> &'static str {
        lacewing_abi::names::SKIPPABLE_CALLBACKS[self as usize]
    }
}

thread_local! {
    /// The root context whose callback is running: the plugin a default
    /// method speaks for.
    static CURRENT_ROOT: Cell<u32> = const { Cell::new(0) };
    /// Per root context, the callbacks already declared unused to the host:
    /// the host keeps them per plugin, and plugins sharing a VM (`vm_id`)
    /// share this module's memory.
    static DECLARED_UNUSED: RefCell<Vec<(u32, u16)>> = const { RefCell::new(Vec::new()) };
}

/// Tells the host, once per plugin, that this module does nothing in
/// `callback`: a plugin has one [`Filter`] type, so when a default method
/// runs, every stream of the plugin would run that same default. A Lacewing
/// host then skips the callback for that plugin (one wasm call fewer per
/// stream); another host answers `NotFound` and goes on calling it, which
/// changes nothing.
#[doc(hidden)]
pub fn unused(callback: Unused) {
    let bit = 1u16 << (callback as u16);
    let root = CURRENT_ROOT.with(Cell::get);
    let declared = DECLARED_UNUSED.with(|d| {
        let mut d = d.borrow_mut();
        match d.iter_mut().find(|(r, _)| *r == root) {
            Some((_, bits)) => core::mem::replace(bits, *bits | bit),
            None => {
                d.push((root, bit));
                0
            }
        }
    });
    if declared & bit != 0 {
        return;
    }
    let name = lacewing_abi::names::UNUSED_CALLBACKS_FUNCTION;
    if let Err(e) = hostcalls::call_foreign_function(name, callback.export().as_bytes())
        && e.status != lacewing_abi::Status::NotFound
    {
        crate::debug!("{name}: {e}");
    }
}

/// `proxy_on_configure`: parse, validate, replace the root's plugin.
pub fn configure<P: Plugin>(key: &'static Key<P>, root: u32, size: usize) -> bool {
    let bytes = match hostcalls::buffer(BufferType::PluginConfiguration, 0, size) {
        Ok(b) => b.unwrap_or_default(),
        Err(e) => {
            crate::error!("cannot read the plugin configuration: {e}");
            return false;
        }
    };
    let plugin = match read_config::<P::Config>(&bytes).and_then(P::configure) {
        Ok(p) => Rc::new(p),
        Err(reason) => {
            crate::error!("configuration rejected: {reason}");
            return false;
        }
    };
    let period = plugin.tick_period_ms();
    if period > 0
        && let Err(e) = hostcalls::set_tick_period(period)
    {
        crate::error!("cannot start the tick timer: {e}");
        return false;
    }
    key.with(|d| d.borrow_mut().roots.insert(root, Some(plugin)));
    // `proxy_on_done` always answers done (see `register!`).
    CURRENT_ROOT.with(|c| c.set(root));
    unused(Unused::Done);
    true
}

/// `proxy_on_tick`.
pub fn tick<P: Plugin>(key: &'static Key<P>, root: u32) {
    let plugin = key.with(|d| d.borrow().roots.get(&root).cloned().flatten());
    if let Some(p) = plugin {
        CURRENT.with(|c| c.set(root));
        p.on_tick();
    }
}

/// Runs `f` on a stream's filter, taken out of the map so the filter may
/// reenter the host freely. Unknown contexts (or a plugin never configured)
/// continue.
fn with_filter<P: Plugin>(
    key: &'static Key<P>,
    ctx: u32,
    f: impl FnOnce(&mut Slot<P::Filter>) -> Action,
) -> Action {
    let taken = key.with(|d| d.borrow_mut().streams.get_mut(&ctx).and_then(Option::take));
    let Some(mut slot) = taken else {
        return Action::Continue;
    };
    CURRENT.with(|c| c.set(ctx));
    CURRENT_ROOT.with(|c| c.set(slot.root));
    let action = f(&mut slot);
    key.with(|d| {
        if let Some(s) = d.borrow_mut().streams.get_mut(&ctx) {
            *s = Some(slot);
        }
    });
    action
}

/// Which stream callback ran.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    RequestHeaders,
    RequestBody,
    RequestTrailers,
    ResponseHeaders,
    ResponseBody,
    ResponseTrailers,
}

/// A stream callback; returns the wire [`Action`].
pub fn stream<P: Plugin>(
    key: &'static Key<P>,
    ctx: u32,
    phase: Phase,
    n: usize,
    end_of_stream: bool,
) -> u32 {
    with_filter(key, ctx, |s| match phase {
        Phase::RequestHeaders => s
            .filter
            .on_request_headers(&Headers::REQUEST, end_of_stream),
        Phase::RequestBody => s.filter.on_request_body(&Body::request(n), end_of_stream),
        Phase::RequestTrailers => s.filter.on_request_trailers(&Headers::REQUEST_TRAILERS),
        Phase::ResponseHeaders => {
            s.response_started = true;
            s.filter
                .on_response_headers(&Headers::RESPONSE, end_of_stream)
        }
        Phase::ResponseBody => {
            s.response_started = true;
            s.filter.on_response_body(&Body::response(n), end_of_stream)
        }
        Phase::ResponseTrailers => {
            s.response_started = true;
            s.filter.on_response_trailers(&Headers::RESPONSE_TRAILERS)
        }
    }) as u32
}

/// `proxy_on_log`.
pub fn log<P: Plugin>(key: &'static Key<P>, ctx: u32) {
    with_filter(key, ctx, |s| {
        s.filter.on_log();
        Action::Continue
    });
}

/// `proxy_on_delete`: forgets the context and its pending callouts.
pub fn delete<P: Plugin>(key: &'static Key<P>, ctx: u32) {
    key.with(|d| {
        let mut d = d.borrow_mut();
        d.streams.remove(&ctx);
        if d.roots.remove(&ctx).is_some() {
            DECLARED_UNUSED.with(|u| u.borrow_mut().retain(|(root, _)| *root != ctx));
        }
    });
    callout::forget_context(ctx);
}

/// Callout replies arrive on the root context (as in Envoy); what their
/// continuation does (headers, resume, local reply) is meant for the stream
/// that made the call.
fn act_on_stream(ctx: u32) {
    if let Err(e) = hostcalls::set_effective_context(ctx) {
        crate::debug!("cannot make context {ctx} effective: {e}");
    }
}

/// Resumes the paused stream when a continuation says `Continue`.
fn resume_if<F>(slot: &Slot<F>, action: Action) {
    if action == Action::Continue {
        let kind = if slot.response_started {
            StreamType::HttpResponse
        } else {
            StreamType::HttpRequest
        };
        if let Err(e) = hostcalls::continue_stream(kind) {
            crate::warn!("cannot resume the stream: {e}");
        }
    }
}

/// `proxy_on_http_call_response`.
pub fn http_call_response<P: Plugin>(
    key: &'static Key<P>,
    token: u32,
    num_headers: usize,
    body_size: usize,
) {
    let Some((ctx, Pending::Http(then))) = callout::pending_take(token) else {
        return;
    };
    let Ok(then) = then.downcast::<HttpContinuation<P::Filter>>() else {
        return;
    };
    let reply = callout::read_http_reply(num_headers, body_size);
    act_on_stream(ctx);
    with_filter(key, ctx, |s| {
        let action = then(&mut s.filter, reply);
        resume_if(s, action);
        action
    });
}

/// `proxy_on_grpc_receive`: keeps the message for the close.
pub fn grpc_receive(token: u32, size: usize) {
    if let Some((ctx, Pending::Grpc { then, .. })) = callout::pending_take(token) {
        let message = callout::read_grpc_message(size);
        callout::pending_put_back(token, (ctx, Pending::Grpc { then, message }));
    }
}

/// `proxy_on_grpc_close`: runs the continuation.
pub fn grpc_close<P: Plugin>(key: &'static Key<P>, token: u32, status: u32) {
    let Some((ctx, Pending::Grpc { then, message })) = callout::pending_take(token) else {
        return;
    };
    let Ok(then) = then.downcast::<GrpcContinuation<P::Filter>>() else {
        return;
    };
    act_on_stream(ctx);
    with_filter(key, ctx, |s| {
        let action = then(&mut s.filter, crate::callout::GrpcReply { status, message });
        resume_if(s, action);
        action
    });
}

/// `proxy_on_memory_allocate`: a buffer the host fills and hands over.
pub fn allocate(size: usize) -> *mut u8 {
    if let Some(lent) = crate::hostcalls::lend(size) {
        return lent;
    }
    let mut buf: Vec<u8> = Vec::with_capacity(size);
    let ptr = buf.as_mut_ptr();
    std::mem::forget(buf);
    ptr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unused_callbacks_name_their_exports() {
        for (callback, export) in [
            (Unused::RequestHeaders, "proxy_on_request_headers"),
            (Unused::RequestTrailers, "proxy_on_request_trailers"),
            (Unused::ResponseBody, "proxy_on_response_body"),
            (Unused::Log, "proxy_on_log"),
            (Unused::Done, "proxy_on_done"),
        ] {
            assert_eq!(callback.export(), export);
        }
    }
}
