//! Filter adapters: a plugin as an HTTP filter and as a network filter.
//!
//! Each stream or connection gets a context in the worker's VM. What a
//! callback returns maps to a [`FilterStatus`] as Envoy maps it:
//!
//! | callback | 0 | 1 (`Pause`) | 2 | 3 and above |
//! |---|---|---|---|---|
//! | headers | Continue | StopIteration (holds headers and body) | Continue | StopIteration |
//! | body | Continue | StopAndBuffer | StopAndBuffer | StopNoBuffer |
//! | trailers, connection | Continue | StopIteration | StopIteration | StopIteration |
//!
//! A failed callback fails the stream by the plugin's policy: `closed`
//! answers 503 (flag FF) or closes the connection, `open` skips the plugin for
//! the rest of the stream.

use std::sync::Arc;

use http::{HeaderMap, StatusCode};
use lacewing_config::FailPolicy;
use lacewing_core::ResponseFlag;
use lacewing_core::filter::{
    FilterStatus, HttpFilter, HttpFilterFactory, NetworkFilter, NetworkFilterFactory, PeerType,
};
use lacewing_core::stream::{HttpStream, LocalReply, SharedConnection, SharedStream};
use std::rc::Rc;

use wasmtime::TypedFunc;

use crate::plugin::{PluginShared, WasmPlugin};
use crate::vm::{
    Callback, CtxKind, Exports, Failure, FailureKind, HeadersFn, Phase, Vm, worker_vm,
};

/// `(context, size, end_of_stream) -> action`: the body and data callbacks.
type DataFn = TypedFunc<(i32, i32, i32), i32>;
/// `(context, count) -> action`: the trailer callbacks.
type TrailersFn = TypedFunc<(i32, i32), i32>;
/// `(context, peer)`: the connection close callbacks.
type CloseFn = TypedFunc<(i32, i32), ()>;

/// Fails an HTTP stream by the plugin's policy (closed: 503 while the response
/// head has not gone downstream, reset after; open: nothing).
pub(crate) fn fail_http_stream(
    stream: &SharedStream,
    plugin: &PluginShared,
    phase: Phase,
    failure: &Failure,
) {
    if plugin.cfg.fail == FailPolicy::Open {
        return;
    }
    let Ok(mut s) = stream.try_borrow_mut() else {
        return;
    };
    if phase <= Phase::ResponseHeaders {
        s.local_reply = Some(LocalReply {
            status: StatusCode::SERVICE_UNAVAILABLE,
            headers: HeaderMap::new(),
            body: format!("plugin `{}` failed\n", plugin.name).into(),
            details: format!("wasm plugin `{}` failed: {}", plugin.name, failure.message),
            flag: ResponseFlag::FilterFailure,
        });
    } else {
        s.reset = true;
    }
}

/// Fails a connection by the plugin's policy (closed: close it; open: nothing).
pub(crate) fn fail_connection(conn: &SharedConnection, plugin: &PluginShared) {
    if plugin.cfg.fail == FailPolicy::Open {
        return;
    }
    if let Ok(mut c) = conn.try_borrow_mut() {
        c.close = true;
    }
}

/// Logs why a plugin takes no part; quietly while its VM is held back by the
/// restart limit (the failures that led there were logged already).
fn log_unavailable(plugin: &PluginShared, what: &str, failure: &Failure) {
    if failure.kind == FailureKind::Unavailable {
        tracing::debug!(plugin = %plugin.name, "plugin unavailable for a {what}: {failure}");
    } else {
        tracing::warn!(plugin = %plugin.name, "plugin unavailable for a {what}: {failure}");
    }
}

/// A new stream context for `kind` in this worker's VM of the plugin.
fn create_context(plugin: &Arc<PluginShared>, kind: CtxKind) -> Result<(Rc<Vm>, u32), Failure> {
    let (vm, root) = worker_vm(plugin)?;
    let ctx = vm.create_stream_context(plugin, root, kind)?;
    Ok((vm, ctx))
}

/// `proxy_on_log` for a context; its outcome does not change the stream.
fn call_on_log(vm: &Vm, plugin: &Arc<PluginShared>, ctx: u32) {
    let _ = vm.call(
        plugin,
        Callback::Log,
        ctx,
        vm.exports.on_log.as_ref(),
        ctx as i32,
        |_| {},
    );
}

/// Which callback's result is read, for [`action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Returns {
    Headers,
    Body,
    /// Trailers and connection callbacks: continue or stop.
    Other,
}

/// What a callback's return value asks for (a missing export continues).
fn action(result: Option<i32>, returns: Returns) -> FilterStatus {
    match (returns, result) {
        (_, None | Some(0)) => FilterStatus::Continue,
        // Envoy's ContinueAndDontEndStream.
        (Returns::Headers, Some(2)) => FilterStatus::Continue,
        // StopIterationAndBuffer, and StopIterationAndWatermark (buffered here too).
        (Returns::Body, Some(1 | 2)) => FilterStatus::StopAndBuffer,
        (Returns::Body, Some(_)) => FilterStatus::StopNoBuffer,
        (_, Some(_)) => FilterStatus::StopIteration,
    }
}

impl HttpFilterFactory for WasmPlugin {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn create(&self, stream: &SharedStream) -> Option<Box<dyn HttpFilter>> {
        let plugin = &self.shared;
        match create_context(plugin, CtxKind::Http(stream.clone())) {
            Ok((vm, ctx)) => Some(Box::new(WasmHttpFilter {
                vm,
                plugin: plugin.clone(),
                ctx,
                skip: false,
            })),
            Err(failure) => {
                log_unavailable(plugin, "stream", &failure);
                match plugin.cfg.fail {
                    FailPolicy::Open => None,
                    FailPolicy::Closed => Some(Box::new(UnavailableHttpFilter {
                        plugin: plugin.clone(),
                        failure,
                    })),
                }
            }
        }
    }
}

/// Stands in for a fail-closed plugin whose VM could not be had: answers 503.
struct UnavailableHttpFilter {
    plugin: Arc<PluginShared>,
    failure: Failure,
}

impl HttpFilter for UnavailableHttpFilter {
    fn on_request_headers(&mut self, stream: &SharedStream, _eos: bool) -> FilterStatus {
        fail_http_stream(stream, &self.plugin, Phase::RequestHeaders, &self.failure);
        if let Ok(s) = stream.try_borrow() {
            s.resume();
        }
        FilterStatus::StopIteration
    }
}

/// A plugin on one HTTP stream.
struct WasmHttpFilter {
    vm: Rc<Vm>,
    plugin: Arc<PluginShared>,
    ctx: u32,
    /// Set once the plugin failed: it takes no further part in the stream.
    skip: bool,
}

impl WasmHttpFilter {
    fn run(
        &mut self,
        stream: &SharedStream,
        phase: Phase,
        callback: Callback,
        returns: Returns,
        call: impl FnOnce(&Vm, &Arc<PluginShared>, u32) -> Result<Option<i32>, Failure>,
    ) -> FilterStatus {
        if self.skip || self.plugin.skips(callback) {
            return FilterStatus::Continue;
        }
        if self.vm.broken.get() {
            return self.failed(stream, phase, &Failure::unavailable("the plugin VM failed"));
        }
        self.vm.set_phase(self.ctx, phase);
        let had_reply = stream.try_borrow().is_ok_and(|s| s.local_reply.is_some());
        match call(&self.vm, &self.plugin, self.ctx) {
            Ok(result) => {
                let answered = stream
                    .try_borrow()
                    .is_ok_and(|s| (!had_reply && s.local_reply.is_some()) || s.reset);
                if answered {
                    return FilterStatus::StopIteration;
                }
                action(result, returns)
            }
            Err(failure) => self.failed(stream, phase, &failure),
        }
    }

    /// A header callback (`count` headers).
    fn run_headers(
        &mut self,
        stream: &SharedStream,
        phase: Phase,
        callback: Callback,
        export: impl FnOnce(&Exports) -> Option<&HeadersFn>,
        count: usize,
        end_of_stream: bool,
    ) -> FilterStatus {
        self.run(stream, phase, callback, Returns::Headers, |vm, p, ctx| {
            let (id, n) = (ctx as i32, count as i32);
            match export(&vm.exports) {
                None => Ok(None),
                Some(HeadersFn::NoEndOfStream(f)) => {
                    vm.call(p, callback, ctx, Some(f), (id, n), |_| {})
                }
                Some(HeadersFn::WithEndOfStream(f)) => vm.call(
                    p,
                    callback,
                    ctx,
                    Some(f),
                    (id, n, i32::from(end_of_stream)),
                    |_| {},
                ),
            }
        })
    }

    /// A body callback (`size` bytes buffered).
    fn run_body(
        &mut self,
        stream: &SharedStream,
        phase: Phase,
        callback: Callback,
        export: impl FnOnce(&Exports) -> Option<&DataFn>,
        size: usize,
        end_of_stream: bool,
    ) -> FilterStatus {
        self.run(stream, phase, callback, Returns::Body, |vm, p, ctx| {
            let params = (ctx as i32, size as i32, i32::from(end_of_stream));
            vm.call(p, callback, ctx, export(&vm.exports), params, |_| {})
        })
    }

    /// A trailer callback (`count` trailers).
    fn run_trailers(
        &mut self,
        stream: &SharedStream,
        phase: Phase,
        callback: Callback,
        export: impl FnOnce(&Exports) -> Option<&TrailersFn>,
        count: usize,
    ) -> FilterStatus {
        self.run(stream, phase, callback, Returns::Other, |vm, p, ctx| {
            let params = (ctx as i32, count as i32);
            vm.call(p, callback, ctx, export(&vm.exports), params, |_| {})
        })
    }

    fn failed(&mut self, stream: &SharedStream, phase: Phase, failure: &Failure) -> FilterStatus {
        match self.plugin.cfg.fail {
            FailPolicy::Open => {
                self.skip = true;
                FilterStatus::Continue
            }
            FailPolicy::Closed => {
                // The failure becomes this stream's reply once; later phases
                // (the reply itself passing through) go on without the plugin.
                self.skip = true;
                fail_http_stream(stream, &self.plugin, phase, failure);
                if let Ok(s) = stream.try_borrow() {
                    s.resume();
                }
                FilterStatus::StopIteration
            }
        }
    }
}

/// How many trailers `of` the stream holds (none while it is borrowed).
fn trailer_count(
    stream: &SharedStream,
    of: impl FnOnce(&HttpStream) -> Option<&HeaderMap>,
) -> usize {
    stream
        .try_borrow()
        .ok()
        .and_then(|s| of(&s).map(HeaderMap::len))
        .unwrap_or(0)
}

fn request_header_count(stream: &SharedStream) -> usize {
    stream.try_borrow().map_or(0, |s| {
        let host = if s.request.uri.authority().is_none() {
            s.request.headers.get_all(http::header::HOST).iter().count()
        } else {
            0
        };
        4 + s.request.headers.len() - host
    })
}

impl HttpFilter for WasmHttpFilter {
    fn on_request_headers(&mut self, stream: &SharedStream, end_of_stream: bool) -> FilterStatus {
        let count = request_header_count(stream);
        self.run_headers(
            stream,
            Phase::RequestHeaders,
            Callback::RequestHeaders,
            |e| e.on_request_headers.as_ref(),
            count,
            end_of_stream,
        )
    }

    fn on_request_body(&mut self, stream: &SharedStream, end_of_stream: bool) -> FilterStatus {
        let size = stream.try_borrow().map_or(0, |s| s.request_body.len());
        self.run_body(
            stream,
            Phase::RequestBody,
            Callback::RequestBody,
            |e| e.on_request_body.as_ref(),
            size,
            end_of_stream,
        )
    }

    fn on_request_trailers(&mut self, stream: &SharedStream) -> FilterStatus {
        let count = trailer_count(stream, |s| s.request_trailers.as_ref());
        self.run_trailers(
            stream,
            Phase::RequestTrailers,
            Callback::RequestTrailers,
            |e| e.on_request_trailers.as_ref(),
            count,
        )
    }

    fn on_response_headers(&mut self, stream: &SharedStream, end_of_stream: bool) -> FilterStatus {
        let count = stream
            .try_borrow()
            .ok()
            .and_then(|s| s.response.as_ref().map(|r| r.headers.len() + 1))
            .unwrap_or(0);
        self.run_headers(
            stream,
            Phase::ResponseHeaders,
            Callback::ResponseHeaders,
            |e| e.on_response_headers.as_ref(),
            count,
            end_of_stream,
        )
    }

    fn on_response_body(&mut self, stream: &SharedStream, end_of_stream: bool) -> FilterStatus {
        let size = stream.try_borrow().map_or(0, |s| s.response_body.len());
        self.run_body(
            stream,
            Phase::ResponseBody,
            Callback::ResponseBody,
            |e| e.on_response_body.as_ref(),
            size,
            end_of_stream,
        )
    }

    fn on_response_trailers(&mut self, stream: &SharedStream) -> FilterStatus {
        let count = trailer_count(stream, |s| s.response_trailers.as_ref());
        self.run_trailers(
            stream,
            Phase::ResponseTrailers,
            Callback::ResponseTrailers,
            |e| e.on_response_trailers.as_ref(),
            count,
        )
    }

    fn on_log(&mut self, _stream: &SharedStream) {
        if self.skip || self.vm.broken.get() || self.plugin.skips(Callback::Log) {
            return;
        }
        self.vm.set_phase(self.ctx, Phase::Log);
        call_on_log(&self.vm, &self.plugin, self.ctx);
    }

    fn wants_request_body(&self) -> bool {
        !self.skip
            && self.vm.exports.on_request_body.is_some()
            && !self.plugin.skips(Callback::RequestBody)
    }

    fn wants_response_body(&self) -> bool {
        !self.skip
            && self.vm.exports.on_response_body.is_some()
            && !self.plugin.skips(Callback::ResponseBody)
    }
}

impl Drop for WasmHttpFilter {
    fn drop(&mut self) {
        self.vm.finish_context(&self.plugin, self.ctx);
    }
}

impl NetworkFilterFactory for WasmPlugin {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn create(&self, conn: &SharedConnection) -> Option<Box<dyn NetworkFilter>> {
        let plugin = &self.shared;
        match create_context(plugin, CtxKind::Net(conn.clone())) {
            Ok((vm, ctx)) => Some(Box::new(WasmNetworkFilter {
                vm,
                plugin: plugin.clone(),
                ctx,
                skip: false,
            })),
            Err(failure) => {
                log_unavailable(plugin, "connection", &failure);
                match plugin.cfg.fail {
                    FailPolicy::Open => None,
                    FailPolicy::Closed => Some(Box::new(UnavailableNetworkFilter {
                        plugin: plugin.clone(),
                    })),
                }
            }
        }
    }
}

/// Stands in for a fail-closed plugin whose VM could not be had: closes the connection.
struct UnavailableNetworkFilter {
    plugin: Arc<PluginShared>,
}

impl NetworkFilter for UnavailableNetworkFilter {
    fn on_new_connection(&mut self, conn: &SharedConnection) -> FilterStatus {
        fail_connection(conn, &self.plugin);
        if let Ok(c) = conn.try_borrow() {
            c.resume();
        }
        FilterStatus::StopIteration
    }
}

/// A plugin on one TCP connection.
struct WasmNetworkFilter {
    vm: Rc<Vm>,
    plugin: Arc<PluginShared>,
    ctx: u32,
    skip: bool,
}

impl WasmNetworkFilter {
    fn run(
        &mut self,
        conn: &SharedConnection,
        call: impl FnOnce(&Vm, &Arc<PluginShared>, u32) -> Result<Option<i32>, Failure>,
    ) -> FilterStatus {
        if self.skip {
            return FilterStatus::Continue;
        }
        let result = if self.vm.broken.get() {
            Err(Failure::unavailable("the plugin VM failed"))
        } else {
            call(&self.vm, &self.plugin, self.ctx)
        };
        match result {
            Ok(r) => {
                if conn.try_borrow().is_ok_and(|c| c.close) {
                    return FilterStatus::StopIteration;
                }
                action(r, Returns::Other)
            }
            Err(_) if self.plugin.cfg.fail == FailPolicy::Open => {
                self.skip = true;
                FilterStatus::Continue
            }
            Err(_) => {
                self.skip = true;
                fail_connection(conn, &self.plugin);
                if let Ok(c) = conn.try_borrow() {
                    c.resume();
                }
                FilterStatus::StopIteration
            }
        }
    }
}

impl WasmNetworkFilter {
    /// A data callback (`size` bytes buffered in one direction).
    fn run_data(
        &mut self,
        conn: &SharedConnection,
        callback: Callback,
        export: impl FnOnce(&Exports) -> Option<&DataFn>,
        size: usize,
        end_of_stream: bool,
    ) -> FilterStatus {
        self.run(conn, |vm, p, ctx| {
            let params = (ctx as i32, size as i32, i32::from(end_of_stream));
            vm.call(p, callback, ctx, export(&vm.exports), params, |_| {})
        })
    }

    /// A close callback, telling which peer closed.
    fn run_close(
        &mut self,
        conn: &SharedConnection,
        callback: Callback,
        export: impl FnOnce(&Exports) -> Option<&CloseFn>,
        peer: PeerType,
    ) {
        self.run(conn, |vm, p, ctx| {
            let params = (ctx as i32, peer as i32);
            vm.call(p, callback, ctx, export(&vm.exports), params, |_| {})
                .map(|_| None)
        });
    }
}

impl NetworkFilter for WasmNetworkFilter {
    fn on_new_connection(&mut self, conn: &SharedConnection) -> FilterStatus {
        self.run(conn, |vm, p, ctx| {
            vm.call(
                p,
                Callback::NewConnection,
                ctx,
                vm.exports.on_new_connection.as_ref(),
                ctx as i32,
                |_| {},
            )
        })
    }

    fn on_downstream_data(&mut self, conn: &SharedConnection, end_of_stream: bool) -> FilterStatus {
        let size = conn.try_borrow().map_or(0, |c| c.downstream_data.len());
        self.run_data(
            conn,
            Callback::DownstreamData,
            |e| e.on_downstream_data.as_ref(),
            size,
            end_of_stream,
        )
    }

    fn on_upstream_data(&mut self, conn: &SharedConnection, end_of_stream: bool) -> FilterStatus {
        let size = conn.try_borrow().map_or(0, |c| c.upstream_data.len());
        self.run_data(
            conn,
            Callback::UpstreamData,
            |e| e.on_upstream_data.as_ref(),
            size,
            end_of_stream,
        )
    }

    fn on_downstream_close(&mut self, conn: &SharedConnection, peer: PeerType) {
        self.run_close(
            conn,
            Callback::DownstreamClose,
            |e| e.on_downstream_close.as_ref(),
            peer,
        );
    }

    fn on_upstream_close(&mut self, conn: &SharedConnection, peer: PeerType) {
        self.run_close(
            conn,
            Callback::UpstreamClose,
            |e| e.on_upstream_close.as_ref(),
            peer,
        );
    }

    fn on_log(&mut self, _conn: &SharedConnection) {
        if self.skip || self.vm.broken.get() {
            return;
        }
        call_on_log(&self.vm, &self.plugin, self.ctx);
    }
}

impl Drop for WasmNetworkFilter {
    fn drop(&mut self) {
        self.vm.finish_context(&self.plugin, self.ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::{Returns, action};
    use lacewing_core::filter::FilterStatus as S;

    #[test]
    fn callback_results_map_to_statuses_as_envoy_maps_them() {
        let table = [
            (
                Returns::Headers,
                [S::Continue, S::StopIteration, S::Continue, S::StopIteration],
            ),
            (
                Returns::Body,
                [
                    S::Continue,
                    S::StopAndBuffer,
                    S::StopAndBuffer,
                    S::StopNoBuffer,
                ],
            ),
            (
                Returns::Other,
                [
                    S::Continue,
                    S::StopIteration,
                    S::StopIteration,
                    S::StopIteration,
                ],
            ),
        ];
        for (returns, expected) in table {
            for (value, want) in expected.into_iter().enumerate() {
                assert_eq!(
                    action(Some(value as i32), returns),
                    want,
                    "{returns:?} {value}"
                );
            }
            assert_eq!(action(Some(77), returns), expected[3], "{returns:?} 77");
            assert_eq!(action(None, returns), S::Continue, "{returns:?}: no export");
        }
    }
}
