//! Header maps: request/response headers and trailers of the effective stream
//! (pseudo-headers `:method`, `:path`, `:authority`, `:scheme`, `:status` map to
//! the request and response parts), and the read-only maps of the HTTP or gRPC
//! callout whose callback is running.

use bytes::Bytes;
use http::header::{HOST, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Method, StatusCode, Uri};
use lacewing_abi::{AbiVersion, MapType, Status, pairs};
use lacewing_core::stream::{HttpStream, SharedStream};
use wasmtime::{Caller, Linker};

use super::ENV;
use crate::memory::{self, HostResult, status};
use crate::vm::{CtxKind, HostState, Phase};

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, HostState>, map: i32, ret_ptr: i32, ret_len: i32| {
            status(get_pairs(&mut c, map, ret_ptr, ret_len))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_header_map_size",
        |mut c: Caller<'_, HostState>, map: i32, ret_size: i32| {
            status(get_size(&mut c, map, ret_size))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_, HostState>, map: i32, ptr: i32, len: i32| {
            status(set_pairs(&mut c, map, ptr, len))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_get_header_map_value",
        |mut c: Caller<'_, HostState>,
         map: i32,
         key_ptr: i32,
         key_len: i32,
         ret_ptr: i32,
         ret_len: i32| {
            status(get_value(&mut c, map, key_ptr, key_len, ret_ptr, ret_len))
        },
    )?;
    for (name, edit) in [
        ("proxy_add_header_map_value", Edit::Add),
        ("proxy_replace_header_map_value", Edit::Replace),
    ] {
        linker.func_wrap(
            ENV,
            name,
            move |mut c: Caller<'_, HostState>,
                  map: i32,
                  key_ptr: i32,
                  key_len: i32,
                  val_ptr: i32,
                  val_len: i32| {
                let value = Some((val_ptr, val_len));
                status(modify(&mut c, map, key_ptr, key_len, value, edit))
            },
        )?;
    }
    linker.func_wrap(
        ENV,
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, HostState>, map: i32, key_ptr: i32, key_len: i32| {
            status(modify(&mut c, map, key_ptr, key_len, None, Edit::Remove))
        },
    )?;
    Ok(())
}

#[derive(Clone, Copy)]
enum Edit {
    Add,
    Replace,
    Remove,
}

/// Where a map lives for the running callback.
enum Target {
    Stream(SharedStream, Phase),
    Callout(Vec<(String, Bytes)>),
}

fn map_type(map: i32) -> Result<MapType, Status> {
    MapType::try_from(map as u32).map_err(|_| Status::BadArgument)
}

fn is_callout_map(map: MapType) -> bool {
    matches!(
        map,
        MapType::HttpCallResponseHeaders
            | MapType::HttpCallResponseTrailers
            | MapType::GrpcReceiveInitialMetadata
            | MapType::GrpcReceiveTrailingMetadata
    )
}

fn target(state: &HostState, map: MapType) -> Result<Target, Status> {
    if is_callout_map(map) {
        let callout = state.current.callout.as_ref().ok_or(Status::NotFound)?;
        let list = match map {
            MapType::HttpCallResponseHeaders | MapType::GrpcReceiveInitialMetadata => {
                &callout.headers
            }
            _ => &callout.trailers,
        };
        return Ok(Target::Callout(list.clone()));
    }
    match state.effective() {
        Some(ctx) => match &ctx.kind {
            CtxKind::Http(stream) => Ok(Target::Stream(stream.clone(), ctx.phase)),
            _ => Err(Status::BadArgument),
        },
        None => Err(Status::BadArgument),
    }
}

/// The serialized pairs of a map.
fn encode(state: &HostState, map: MapType) -> Result<Vec<u8>, Status> {
    match target(state, map)? {
        Target::Callout(list) => Ok(pairs::encode(
            list.iter().map(|(k, v)| (k.as_bytes(), v.as_ref())),
        )),
        Target::Stream(stream, _) => {
            let s = stream.borrow();
            let mut list: Vec<(&[u8], &[u8])> = Vec::new();
            match map {
                MapType::HttpRequestHeaders => request_pairs(&s, &mut list),
                MapType::HttpRequestTrailers => {
                    header_pairs(s.request_trailers.as_ref(), &mut list)
                }
                MapType::HttpResponseHeaders => {
                    let response = s.response.as_ref().ok_or(Status::NotFound)?;
                    list.push((b":status", response.status.as_str().as_bytes()));
                    header_pairs(Some(&response.headers), &mut list);
                }
                _ => header_pairs(s.response_trailers.as_ref(), &mut list),
            }
            Ok(pairs::encode(list.iter().map(|(k, v)| (*k, *v))))
        }
    }
}

fn header_pairs<'a>(headers: Option<&'a HeaderMap>, out: &mut Vec<(&'a [u8], &'a [u8])>) {
    if let Some(h) = headers {
        for (name, value) in h {
            out.push((name.as_str().as_bytes(), value.as_bytes()));
        }
    }
}

/// The request's pseudo-headers, in the order the pairs list them.
const REQUEST_PSEUDO_HEADERS: [&[u8]; 4] = [b":authority", b":path", b":method", b":scheme"];

/// One request pseudo-header (`host` stands in for a missing `:authority`).
fn request_pseudo_header<'a>(s: &'a HttpStream, name: &[u8]) -> Option<&'a [u8]> {
    let parts = &s.request;
    let value = match name {
        b":authority" => parts
            .uri
            .authority()
            .map(|a| a.as_str().as_bytes())
            .or_else(|| parts.headers.get(HOST).map(HeaderValue::as_bytes))
            .unwrap_or_default(),
        b":path" => parts
            .uri
            .path_and_query()
            .map_or("/", PathAndQuery::as_str)
            .as_bytes(),
        b":method" => parts.method.as_str().as_bytes(),
        b":scheme" => parts.uri.scheme_str().unwrap_or("http").as_bytes(),
        _ => return None,
    };
    Some(value)
}

/// Request headers with the pseudo-headers first; `host` is shown as `:authority`.
pub(crate) fn request_pairs<'a>(s: &'a HttpStream, out: &mut Vec<(&'a [u8], &'a [u8])>) {
    let parts = &s.request;
    for name in REQUEST_PSEUDO_HEADERS {
        out.push((name, request_pseudo_header(s, name).unwrap_or_default()));
    }
    for (name, value) in &parts.headers {
        if name != HOST {
            out.push((name.as_str().as_bytes(), value.as_bytes()));
        }
    }
}

fn get_pairs(
    caller: &mut Caller<'_, HostState>,
    map: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> HostResult {
    let map = map_type(map)?;
    let bytes = encode(caller.data(), map)?;
    memory::give(caller, &bytes, ret_ptr, ret_len)
}

fn get_size(caller: &mut Caller<'_, HostState>, map: i32, ret_size: i32) -> HostResult {
    let map = map_type(map)?;
    let size = encode(caller.data(), map)?.len();
    memory::write_u32(caller, ret_size, size as u32)?;
    Ok(())
}

/// One value; several values of a header are joined with `,`.
fn lookup(state: &HostState, map: MapType, key: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    match target(state, map)? {
        Target::Callout(list) => Ok(list
            .iter()
            .find(|(k, _)| k.as_bytes().eq_ignore_ascii_case(key))
            .map(|(_, v)| v.to_vec())),
        Target::Stream(stream, _) => {
            let s = stream.borrow();
            let headers = match map {
                MapType::HttpRequestHeaders => {
                    if key.starts_with(b":") {
                        return Ok(request_pseudo_header(&s, key).map(<[u8]>::to_vec));
                    }
                    Some(&s.request.headers)
                }
                MapType::HttpRequestTrailers => s.request_trailers.as_ref(),
                MapType::HttpResponseHeaders => {
                    let response = s.response.as_ref().ok_or(Status::NotFound)?;
                    if key == b":status" {
                        return Ok(Some(response.status.as_str().as_bytes().to_vec()));
                    }
                    Some(&response.headers)
                }
                _ => s.response_trailers.as_ref(),
            };
            let Some(headers) = headers else {
                return Ok(None);
            };
            let Ok(name) = HeaderName::from_bytes(key) else {
                return Ok(None);
            };
            let mut values = headers.get_all(name).iter();
            let Some(first) = values.next() else {
                return Ok(None);
            };
            let mut out = first.as_bytes().to_vec();
            for v in values {
                out.push(b',');
                out.extend_from_slice(v.as_bytes());
            }
            Ok(Some(out))
        }
    }
}

fn get_value(
    caller: &mut Caller<'_, HostState>,
    map: i32,
    key_ptr: i32,
    key_len: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> HostResult {
    let map = map_type(map)?;
    let value = {
        let (data, state) = memory::split(caller)?;
        let key = memory::slice(data, key_ptr, key_len)?;
        lookup(state, map, key)?
    };
    match value {
        Some(v) => memory::give(caller, &v, ret_ptr, ret_len),
        None if caller.data().plugin.abi == AbiVersion::V0_1_0 => {
            memory::give(caller, &[], ret_ptr, ret_len)
        }
        None => Err(Status::NotFound.into()),
    }
}

/// Whether the map may still change in this phase.
fn writable(map: MapType, phase: Phase) -> bool {
    match map {
        // As in Envoy: request headers go upstream once their phase
        // continues; until then (paused) they stay writable.
        MapType::HttpRequestHeaders => phase == Phase::RequestHeaders,
        MapType::HttpRequestTrailers => phase <= Phase::RequestTrailers,
        MapType::HttpResponseHeaders => phase == Phase::ResponseHeaders,
        MapType::HttpResponseTrailers => {
            (Phase::ResponseHeaders..=Phase::ResponseTrailers).contains(&phase)
        }
        _ => false,
    }
}

fn writable_stream(state: &HostState, map: MapType) -> Result<SharedStream, Status> {
    match target(state, map)? {
        Target::Stream(stream, phase) if writable(map, phase) => Ok(stream),
        _ => Err(Status::BadArgument),
    }
}

fn modify(
    caller: &mut Caller<'_, HostState>,
    map: i32,
    key_ptr: i32,
    key_len: i32,
    value: Option<(i32, i32)>,
    edit: Edit,
) -> HostResult {
    let map = map_type(map)?;
    let (data, state) = memory::split(caller)?;
    let key = memory::slice(data, key_ptr, key_len)?;
    let value = match value {
        Some((ptr, len)) => memory::slice(data, ptr, len)?,
        None => &[],
    };
    let stream = writable_stream(state, map)?;
    let mut s = stream.borrow_mut();
    apply(&mut s, map, key, value, edit)?;
    Ok(())
}

fn set_pairs(caller: &mut Caller<'_, HostState>, map: i32, ptr: i32, len: i32) -> HostResult {
    let map = map_type(map)?;
    let (data, state) = memory::split(caller)?;
    let bytes = memory::slice(data, ptr, len)?;
    let list = pairs::decode(bytes).map_err(|_| Status::BadArgument)?;
    let stream = writable_stream(state, map)?;
    let mut s = stream.borrow_mut();
    // Validate everything before touching the stream, so a bad pair changes nothing.
    for (k, v) in &list {
        if !k.starts_with(b":") {
            HeaderName::from_bytes(k).map_err(|_| Status::BadArgument)?;
            HeaderValue::from_bytes(v).map_err(|_| Status::BadArgument)?;
        }
    }
    match map {
        MapType::HttpRequestHeaders => s.request.headers.clear(),
        MapType::HttpRequestTrailers => s.request_trailers = Some(HeaderMap::new()),
        MapType::HttpResponseHeaders => {
            s.response
                .as_mut()
                .ok_or(Status::BadArgument)?
                .headers
                .clear();
        }
        _ => s.response_trailers = Some(HeaderMap::new()),
    }
    for (k, v) in list {
        apply(&mut s, map, k, v, Edit::Add)?;
    }
    Ok(())
}

/// Applies one edit to a stream map.
fn apply(
    s: &mut HttpStream,
    map: MapType,
    key: &[u8],
    value: &[u8],
    edit: Edit,
) -> Result<(), Status> {
    if key.starts_with(b":") {
        return apply_pseudo(s, map, key, value, edit);
    }
    let headers = match map {
        MapType::HttpRequestHeaders => &mut s.request.headers,
        MapType::HttpRequestTrailers => s.request_trailers.get_or_insert_with(HeaderMap::new),
        MapType::HttpResponseHeaders => {
            &mut s.response.as_mut().ok_or(Status::BadArgument)?.headers
        }
        _ => s.response_trailers.get_or_insert_with(HeaderMap::new),
    };
    let name = HeaderName::from_bytes(key).map_err(|_| Status::BadArgument)?;
    match edit {
        Edit::Remove => {
            headers.remove(name);
        }
        Edit::Add => {
            let value = HeaderValue::from_bytes(value).map_err(|_| Status::BadArgument)?;
            headers.append(name, value);
        }
        Edit::Replace => {
            let value = HeaderValue::from_bytes(value).map_err(|_| Status::BadArgument)?;
            headers.insert(name, value);
        }
    }
    Ok(())
}

fn apply_pseudo(
    s: &mut HttpStream,
    map: MapType,
    key: &[u8],
    value: &[u8],
    edit: Edit,
) -> Result<(), Status> {
    match (map, key) {
        (MapType::HttpResponseHeaders, b":status") => {
            if let Edit::Add | Edit::Replace = edit {
                let status = StatusCode::from_bytes(value).map_err(|_| Status::BadArgument)?;
                s.response.as_mut().ok_or(Status::BadArgument)?.status = status;
            }
            Ok(())
        }
        (MapType::HttpRequestHeaders, b":method") => {
            if let Edit::Add | Edit::Replace = edit {
                s.request.method = Method::from_bytes(value).map_err(|_| Status::BadArgument)?;
            }
            Ok(())
        }
        (MapType::HttpRequestHeaders, b":path") => {
            if let Edit::Add | Edit::Replace = edit {
                let pq = PathAndQuery::try_from(value).map_err(|_| Status::BadArgument)?;
                let mut parts = s.request.uri.clone().into_parts();
                parts.path_and_query = Some(pq);
                s.request.uri = Uri::from_parts(parts).map_err(|_| Status::BadArgument)?;
            }
            Ok(())
        }
        (MapType::HttpRequestHeaders, b":authority") => {
            if let Edit::Remove = edit {
                s.request.headers.remove(HOST);
                return Ok(());
            }
            let authority = Authority::try_from(value).map_err(|_| Status::BadArgument)?;
            let host = HeaderValue::from_bytes(value).map_err(|_| Status::BadArgument)?;
            if s.request.uri.authority().is_some() {
                let mut parts = s.request.uri.clone().into_parts();
                parts.authority = Some(authority);
                s.request.uri = Uri::from_parts(parts).map_err(|_| Status::BadArgument)?;
            }
            s.request.headers.insert(HOST, host);
            Ok(())
        }
        (MapType::HttpRequestHeaders, b":scheme") => {
            if let Edit::Remove = edit {
                return Ok(());
            }
            if s.request.uri.scheme_str().unwrap_or("http").as_bytes() == value {
                return Ok(());
            }
            let scheme = Scheme::try_from(value).map_err(|_| Status::BadArgument)?;
            let authority = match s.request.uri.authority() {
                Some(a) => Some(a.clone()),
                None => s
                    .request
                    .headers
                    .get(HOST)
                    .and_then(|h| Authority::try_from(h.as_bytes()).ok()),
            };
            if let Some(authority) = authority {
                let mut parts = s.request.uri.clone().into_parts();
                parts.scheme = Some(scheme);
                parts.authority = Some(authority);
                if parts.path_and_query.is_none() {
                    parts.path_and_query = Some(PathAndQuery::from_static("/"));
                }
                s.request.uri = Uri::from_parts(parts).map_err(|_| Status::BadArgument)?;
            }
            Ok(())
        }
        _ => Err(Status::BadArgument),
    }
}
