//! Stream control: continue/close a stream, local replies, the effective
//! context, `proxy_done`, and `proxy_get_status` for callout callbacks.

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, HeaderName, HeaderValue, TRANSFER_ENCODING};
use http::{HeaderMap, StatusCode};
use lacewing_abi::{Status, StreamType, pairs};
use lacewing_core::ResponseFlag;
use lacewing_core::stream::LocalReply;
use wasmtime::{Caller, Linker};

use super::ENV;
use crate::memory::{self, HostResult, status};
use crate::vm::{CtxKind, HostState, Phase};

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_continue_stream",
        |mut c: Caller<'_, HostState>, kind: i32| status(continue_stream(&mut c, kind, false)),
    )?;
    linker.func_wrap(
        ENV,
        "proxy_close_stream",
        |mut c: Caller<'_, HostState>, kind: i32| status(continue_stream(&mut c, kind, true)),
    )?;
    // ABI 0.1.0.
    linker.func_wrap(
        ENV,
        "proxy_continue_request",
        |mut c: Caller<'_, HostState>| {
            status(continue_stream(
                &mut c,
                StreamType::HttpRequest as i32,
                false,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_continue_response",
        |mut c: Caller<'_, HostState>| {
            status(continue_stream(
                &mut c,
                StreamType::HttpResponse as i32,
                false,
            ))
        },
    )?;
    // Routes are chosen by the data plane, which keeps no cache a filter could clear.
    linker.func_wrap(
        ENV,
        "proxy_clear_route_cache",
        |_: Caller<'_, HostState>| Status::Unimplemented.code(),
    )?;
    linker.func_wrap(
        ENV,
        "proxy_send_local_response",
        |mut c: Caller<'_, HostState>,
         code: i32,
         details_ptr: i32,
         details_len: i32,
         body_ptr: i32,
         body_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         grpc_status: i32| {
            status(send_local_response(
                &mut c,
                code,
                (details_ptr, details_len),
                (body_ptr, body_len),
                (headers_ptr, headers_len),
                grpc_status,
            ))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_effective_context",
        |mut c: Caller<'_, HostState>, id: i32| {
            let state = c.data_mut();
            if state.contexts.contains_key(&(id as u32)) {
                state.current.effective = id as u32;
                Status::Ok.code()
            } else {
                Status::BadArgument.code()
            }
        },
    )?;
    linker.func_wrap(ENV, "proxy_done", |mut c: Caller<'_, HostState>| {
        let state = c.data_mut();
        let id = state.current.effective;
        if state.pending_done.remove(&id) {
            state.deferred_delete.push(id);
            Status::Ok.code()
        } else {
            Status::NotFound.code()
        }
    })?;
    linker.func_wrap(
        ENV,
        "proxy_get_status",
        |mut c: Caller<'_, HostState>, ret_code: i32, ret_msg_ptr: i32, ret_msg_len: i32| {
            status(get_status(&mut c, ret_code, ret_msg_ptr, ret_msg_len))
        },
    )?;
    Ok(())
}

/// Whether the effective context is not the one whose callback is running, so
/// the data plane may be waiting on it and must be woken.
fn outside_own_callback(state: &HostState) -> bool {
    !(state.current.callback.is_stream_phase() && state.current.effective == state.current.origin)
}

fn continue_stream(caller: &mut Caller<'_, HostState>, kind: i32, close: bool) -> HostResult {
    let kind = StreamType::try_from(kind as u32).map_err(|_| Status::BadArgument)?;
    let state = caller.data();
    let wake = outside_own_callback(state) || close;
    let ctx = state.effective().ok_or(Status::BadArgument)?;
    match (&ctx.kind, kind) {
        (CtxKind::Http(stream), StreamType::HttpRequest | StreamType::HttpResponse) => {
            let mut s = stream
                .try_borrow_mut()
                .map_err(|_| Status::InternalFailure)?;
            if close {
                s.reset = true;
            }
            if wake {
                s.resume();
            }
            Ok(())
        }
        (CtxKind::Net(conn), StreamType::Downstream | StreamType::Upstream) => {
            let mut c = conn.try_borrow_mut().map_err(|_| Status::InternalFailure)?;
            if close {
                c.close = true;
            }
            if wake {
                c.resume();
            }
            Ok(())
        }
        _ => Err(Status::BadArgument.into()),
    }
}

fn send_local_response(
    caller: &mut Caller<'_, HostState>,
    code: i32,
    details: (i32, i32),
    body: (i32, i32),
    headers: (i32, i32),
    grpc_status: i32,
) -> HostResult {
    let (data, state) = memory::split(caller)?;
    let details = String::from_utf8_lossy(memory::slice(data, details.0, details.1)?).into_owned();
    let body = Bytes::copy_from_slice(memory::slice(data, body.0, body.1)?);
    let header_bytes = memory::slice(data, headers.0, headers.1)?;
    let list = pairs::decode(header_bytes).map_err(|_| Status::BadArgument)?;
    let status_code = u16::try_from(code)
        .ok()
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Status::BadArgument)?;
    let mut header_map = HeaderMap::with_capacity(list.len() + 2);
    for (k, v) in list {
        let name = HeaderName::from_bytes(k).map_err(|_| Status::BadArgument)?;
        let value = HeaderValue::from_bytes(v).map_err(|_| Status::BadArgument)?;
        header_map.append(name, value);
    }
    frame_local_reply(&mut header_map, &body);
    if grpc_status >= 0 {
        header_map.insert(
            HeaderName::from_static("grpc-status"),
            HeaderValue::from(grpc_status),
        );
    }
    let wake = outside_own_callback(state);
    let ctx = state.effective().ok_or(Status::BadArgument)?;
    let CtxKind::Http(stream) = &ctx.kind else {
        return Err(Status::BadArgument.into());
    };
    // Only while the response head has not gone downstream.
    if ctx.phase > Phase::ResponseHeaders {
        return Err(Status::BadArgument.into());
    }
    let mut s = stream
        .try_borrow_mut()
        .map_err(|_| Status::InternalFailure)?;
    s.local_reply = Some(LocalReply {
        status: status_code,
        headers: header_map,
        body,
        details,
        flag: ResponseFlag::LocalReply,
    });
    if wake {
        s.resume();
    }
    Ok(())
}

/// Makes a local reply's head describe its body, as Envoy does: the length is
/// the body's own (a module-supplied `content-length` or `transfer-encoding`
/// is dropped, the server frames the body); a body without a `content-type`
/// is `text/plain`, and a reply without a body has no `content-type`.
fn frame_local_reply(headers: &mut HeaderMap, body: &[u8]) {
    headers.remove(CONTENT_LENGTH);
    headers.remove(TRANSFER_ENCODING);
    if body.is_empty() {
        headers.remove(CONTENT_TYPE);
    } else if !headers.contains_key(CONTENT_TYPE) {
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    }
}

fn get_status(
    caller: &mut Caller<'_, HostState>,
    ret_code: i32,
    ret_msg_ptr: i32,
    ret_msg_len: i32,
) -> HostResult {
    let (code, message) = match &caller.data().current.callout {
        Some(c) => (c.status, c.message.clone()),
        None => return Err(Status::NotFound.into()),
    };
    memory::write_u32(caller, ret_code, code)?;
    memory::give(caller, message.as_bytes(), ret_msg_ptr, ret_msg_len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn framed(headers: &[(&str, &str)], body: &[u8]) -> Vec<(String, String)> {
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        frame_local_reply(&mut map, body);
        map.iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    }

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn local_reply_length_is_the_body_length_and_text_is_the_default_type() {
        assert_eq!(
            framed(&[("content-length", "0"), ("x-a", "1")], b"denied"),
            owned(&[("x-a", "1"), ("content-type", "text/plain")])
        );
        assert_eq!(
            framed(&[("content-type", "application/json")], b"{}"),
            owned(&[("content-type", "application/json")])
        );
        assert_eq!(
            framed(
                &[
                    ("content-type", "text/html"),
                    ("transfer-encoding", "chunked")
                ],
                b""
            ),
            owned(&[])
        );
    }
}
