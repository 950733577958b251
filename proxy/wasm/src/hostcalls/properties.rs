//! Properties (`proxy_get_property` / `proxy_set_property`) with Envoy's paths
//! and encodings: strings raw, integers 8-byte little-endian, booleans one byte,
//! timestamps and durations as nanoseconds, maps as serialized pairs.
//! `proxy_set_property` stores per stream (in `filter_state`), or per context
//! when there is no stream; values set are read back with the same path.

use std::collections::HashMap;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HOST, REFERER, USER_AGENT};
use lacewing_abi::{Status, pairs, property};
use lacewing_core::ResponseFlag;
use lacewing_core::stream::{HttpStream, StreamInfo, TlsFacts};
use wasmtime::{Caller, Linker};

use super::ENV;
use crate::memory::{self, HostResult, status};
use crate::vm::{CtxKind, HostState, Phase};

pub(super) fn add(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        ENV,
        "proxy_get_property",
        |mut c: Caller<'_, HostState>, path_ptr: i32, path_len: i32, ret_ptr: i32, ret_len: i32| {
            status(get(&mut c, path_ptr, path_len, ret_ptr, ret_len))
        },
    )?;
    linker.func_wrap(
        ENV,
        "proxy_set_property",
        |mut c: Caller<'_, HostState>, path_ptr: i32, path_len: i32, val_ptr: i32, val_len: i32| {
            status(set(&mut c, path_ptr, path_len, val_ptr, val_len))
        },
    )?;
    Ok(())
}

/// The key a path is stored under in `filter_state`: segments joined by `.`.
fn state_key(segments: &[&[u8]]) -> Result<String, Status> {
    let mut key = String::new();
    for (i, s) in segments.iter().enumerate() {
        if i > 0 {
            key.push('.');
        }
        key.push_str(std::str::from_utf8(s).map_err(|_| Status::BadArgument)?);
    }
    Ok(key)
}

fn get(
    caller: &mut Caller<'_, HostState>,
    path_ptr: i32,
    path_len: i32,
    ret_ptr: i32,
    ret_len: i32,
) -> HostResult {
    let value = {
        let (data, state) = memory::split(caller)?;
        let path = memory::slice(data, path_ptr, path_len)?;
        with_segments(path, |segments| lookup(state, segments))?
    };
    memory::give(caller, &value, ret_ptr, ret_len)
}

/// Segments a path splits into on the stack; a longer path takes the heap.
const STACK_SEGMENTS: usize = 8;

/// Runs `f` on the segments of a wire path (what [`property::split_path`]
/// gives) without allocating for paths of up to [`STACK_SEGMENTS`] segments:
/// saves an allocation on every property read.
fn with_segments<R>(path: &[u8], f: impl FnOnce(&[&[u8]]) -> R) -> R {
    let trimmed = path.strip_suffix(&[0]).unwrap_or(path);
    if trimmed.is_empty() {
        return f(&[]);
    }
    let mut stack: [&[u8]; STACK_SEGMENTS] = [&[]; STACK_SEGMENTS];
    let mut count = 0;
    for segment in trimmed.split(|b| *b == 0) {
        if count == STACK_SEGMENTS {
            return f(&property::split_path(path));
        }
        stack[count] = segment;
        count += 1;
    }
    f(&stack[..count])
}

/// What a filter set at this path with `proxy_set_property`, if anything; the
/// key is built only when something was set (most streams set nothing, and
/// building it cost an allocation per read).
fn stored(map: &HashMap<String, Bytes>, segments: &[&[u8]]) -> Option<Bytes> {
    if map.is_empty() {
        return None;
    }
    let key = state_key(segments).ok()?;
    map.get(&key).cloned()
}

fn set(
    caller: &mut Caller<'_, HostState>,
    path_ptr: i32,
    path_len: i32,
    val_ptr: i32,
    val_len: i32,
) -> HostResult {
    let (data, state) = memory::split(caller)?;
    let path = memory::slice(data, path_ptr, path_len)?;
    let segments = property::split_path(path);
    if segments.is_empty() {
        return Err(Status::BadArgument.into());
    }
    let key = state_key(&segments)?;
    let value = Bytes::copy_from_slice(memory::slice(data, val_ptr, val_len)?);
    let id = state.current.effective;
    let ctx = state.contexts.get_mut(&id).ok_or(Status::BadArgument)?;
    match &ctx.kind {
        CtxKind::Http(stream) => {
            stream
                .try_borrow_mut()
                .map_err(|_| Status::InternalFailure)?
                .filter_state
                .insert(key, value);
        }
        CtxKind::Net(conn) => {
            conn.try_borrow_mut()
                .map_err(|_| Status::InternalFailure)?
                .filter_state
                .insert(key, value);
        }
        CtxKind::Root => {
            ctx.properties.insert(key, value);
        }
    }
    Ok(())
}

fn int(v: i64) -> Vec<u8> {
    v.to_le_bytes().to_vec()
}

fn text(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn nanos(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Envoy's response flag bits for the flags Lacewing records.
fn flag_bits(flag: Option<ResponseFlag>) -> i64 {
    match flag {
        None => 0,
        Some(ResponseFlag::NoHealthyUpstream) => 0x2,
        Some(ResponseFlag::UpstreamRequestTimeout) => 0x4,
        Some(ResponseFlag::UpstreamConnectionFailure) => 0x20,
        Some(ResponseFlag::UpstreamConnectionTermination) => 0x40,
        Some(ResponseFlag::UpstreamOverflow) => 0x80,
        Some(ResponseFlag::NoRouteFound) => 0x100,
        Some(ResponseFlag::DownstreamConnectionTermination) => 0x4000,
        Some(ResponseFlag::StreamIdleTimeout) => 0x10000,
        Some(ResponseFlag::DownstreamProtocolError) => 0x40000,
        Some(ResponseFlag::UpstreamProtocolError) => 0x800000,
        // No Envoy equivalent: bits above Envoy's range.
        Some(ResponseFlag::LocalReply) => 1 << 40,
        Some(ResponseFlag::FilterFailure) => 1 << 41,
        Some(ResponseFlag::PayloadTooLarge) => 1 << 42,
        Some(ResponseFlag::FilterTimeout) => 1 << 43,
    }
}

fn header_map_value(headers: &http::HeaderMap, segments: &[&[u8]]) -> Result<Vec<u8>, Status> {
    match segments {
        [] => {
            let list: Vec<(&[u8], &[u8])> = headers
                .iter()
                .map(|(k, v)| (k.as_str().as_bytes(), v.as_bytes()))
                .collect();
            Ok(pairs::encode(list.iter().map(|(k, v)| (*k, *v))))
        }
        [name] => {
            let name = std::str::from_utf8(name)
                .map_err(|_| Status::NotFound)?
                .to_ascii_lowercase();
            headers
                .get(name.as_str())
                .map(|v| v.as_bytes().to_vec())
                .ok_or(Status::NotFound)
        }
        _ => Err(Status::NotFound),
    }
}

/// The value of a property for the running callback.
fn lookup(state: &HostState, segments: &[&[u8]]) -> Result<Vec<u8>, Status> {
    // A path that is not text names nothing. Not checked up front (about
    // 90 instructions a read): every segment below is matched against ASCII
    // names, and the ones used as text (a stored key, a header name) are
    // checked where they are used.
    let ctx = state.effective();
    // Values set by filters win, so what was set is read back.
    if let Some(ctx) = ctx {
        let found = match &ctx.kind {
            CtxKind::Http(stream) => stream
                .try_borrow()
                .ok()
                .and_then(|s| stored(&s.filter_state, segments)),
            CtxKind::Net(conn) => conn
                .try_borrow()
                .ok()
                .and_then(|c| stored(&c.filter_state, segments)),
            CtxKind::Root => stored(&ctx.properties, segments),
        };
        if let Some(v) = found {
            return Ok(v.to_vec());
        }
    }
    let plugin = &state.plugin;
    let first: &[u8] = segments.first().copied().unwrap_or_default();
    match (first, &segments[1.min(segments.len())..]) {
        (b"plugin_name", []) => return Ok(text(&plugin.name)),
        (b"plugin_root_id", []) => return Ok(text(&plugin.cfg.root_id)),
        (b"plugin_vm_id", []) => return Ok(text(&plugin.cfg.vm_id)),
        (b"node", [b"id"]) => return Ok(text(&plugin.host.node_id)),
        (b"node", [b"cluster"]) => return Ok(text(&plugin.host.node_cluster)),
        _ => {}
    }
    let Some(ctx) = ctx else {
        return Err(Status::NotFound);
    };
    match &ctx.kind {
        CtxKind::Http(stream) => {
            let s = stream.try_borrow().map_err(|_| Status::InternalFailure)?;
            if let Some(v) = info_property(&s.info, segments)? {
                return Ok(v);
            }
            http_property(&s, segments, ctx.phase == Phase::Log)
        }
        CtxKind::Net(conn) => {
            let c = conn.try_borrow().map_err(|_| Status::InternalFailure)?;
            info_property(&c.info, segments)?.ok_or(Status::NotFound)
        }
        CtxKind::Root => Err(Status::NotFound),
    }
}

/// Connection-level properties shared by HTTP and TCP.
fn info_property(info: &StreamInfo, segments: &[&[u8]]) -> Result<Option<Vec<u8>>, Status> {
    let v = match segments {
        [b"source", b"address"] => text(&info.downstream_remote.to_string()),
        [b"source", b"port"] => int(i64::from(info.downstream_remote.port())),
        [b"destination", b"address"] => text(&info.downstream_local.to_string()),
        [b"destination", b"port"] => int(i64::from(info.downstream_local.port())),
        [b"connection", b"id"] => int(info.connection_id as i64),
        [b"connection", b"mtls"] => vec![u8::from(info.tls.as_ref().is_some_and(|t| t.mtls))],
        [b"connection", b"requested_server_name"] => {
            text(info.tls.as_ref().map_or("", |t| &t.requested_server_name))
        }
        [b"connection", field] => return tls_property(info, field),
        [b"source", b"principal" | b"uri_san_peer_certificate"] => {
            text(first(info, |t| &t.peer_uri_sans)?)
        }
        [b"destination", b"principal"] => text(first(info, |t| &t.local_uri_sans)?),
        [b"upstream", b"address"] => {
            text(&info.upstream_address.ok_or(Status::NotFound)?.to_string())
        }
        [b"upstream", b"port"] => int(i64::from(
            info.upstream_address.ok_or(Status::NotFound)?.port(),
        )),
        [b"upstream", field] => return upstream_property(info, field),
        [b"cluster_name"] | [b"xds", b"cluster_name"] => {
            text(info.cluster_name.as_deref().ok_or(Status::NotFound)?)
        }
        [b"route_name"] | [b"xds", b"route_name"] => {
            text(info.route_name.as_deref().ok_or(Status::NotFound)?)
        }
        [b"listener_name"] | [b"xds", b"listener_name"] => text(&info.listener_name),
        [b"listener_direction"] | [b"xds", b"listener_direction"] => int(0),
        _ => return Ok(None),
    };
    Ok(Some(v))
}

/// The first of a list of the connection's TLS facts; not found on a
/// plaintext connection or when the list is empty.
fn first(info: &StreamInfo, list: impl Fn(&TlsFacts) -> &Vec<String>) -> Result<&str, Status> {
    info.tls
        .as_deref()
        .and_then(|t| list(t).first())
        .map(String::as_str)
        .ok_or(Status::NotFound)
}

/// `connection.<field>` from the TLS handshake: not found on plaintext, or
/// when the client sent no certificate (the peer fields).
fn tls_property(info: &StreamInfo, field: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    let Some(tls) = info.tls.as_deref() else {
        return match field {
            b"tls_version"
            | b"subject_peer_certificate"
            | b"uri_san_peer_certificate"
            | b"uri_san_local_certificate"
            | b"sha256_peer_certificate_digest" => Err(Status::NotFound),
            _ => Ok(None),
        };
    };
    let peer = |value: &str| {
        if tls.mtls {
            Ok(Some(text(value)))
        } else {
            Err(Status::NotFound)
        }
    };
    match field {
        b"tls_version" => Ok(Some(text(&tls.version))),
        b"subject_peer_certificate" => peer(&tls.peer_subject),
        b"uri_san_peer_certificate" => first(info, |t| &t.peer_uri_sans).map(|v| Some(text(v))),
        b"uri_san_local_certificate" => first(info, |t| &t.local_uri_sans).map(|v| Some(text(v))),
        b"sha256_peer_certificate_digest" => peer(&tls.peer_sha256),
        _ => Ok(None),
    }
}

/// `upstream.<field>` of the connection that answered (HTTP, from the
/// response phase on) or that was made (TCP): not found before, and the TLS
/// fields not found on plaintext. Certificates are parsed on first read.
fn upstream_property(info: &StreamInfo, field: &[u8]) -> Result<Option<Vec<u8>>, Status> {
    let known = matches!(
        field,
        b"local_address"
            | b"tls_version"
            | b"subject_local_certificate"
            | b"subject_peer_certificate"
            | b"uri_san_local_certificate"
            | b"uri_san_peer_certificate"
            | b"dns_san_local_certificate"
            | b"dns_san_peer_certificate"
            | b"sha256_peer_certificate_digest"
    );
    if !known {
        return Ok(None);
    }
    let connection = info
        .upstream_connection
        .as_deref()
        .ok_or(Status::NotFound)?;
    if field == b"local_address" {
        let local = connection.local_address.ok_or(Status::NotFound)?;
        return Ok(Some(text(&local.to_string())));
    }
    let tls = connection.tls.as_deref().ok_or(Status::NotFound)?;
    let first = |list: &[String]| list.first().map(|v| text(v)).ok_or(Status::NotFound);
    let local = || tls.local_certificate().ok_or(Status::NotFound);
    let peer = || tls.peer_certificate().ok_or(Status::NotFound);
    let v = match field {
        b"tls_version" => text(tls.version()),
        b"subject_local_certificate" => text(&local()?.subject),
        b"subject_peer_certificate" => text(&peer()?.subject),
        b"uri_san_local_certificate" => first(&local()?.uri_sans)?,
        b"uri_san_peer_certificate" => first(&peer()?.uri_sans)?,
        b"dns_san_local_certificate" => first(&local()?.dns_sans)?,
        b"dns_san_peer_certificate" => first(&peer()?.dns_sans)?,
        _ => text(&peer()?.sha256),
    };
    Ok(Some(v))
}

/// A request property; `complete` says whether the stream has ended (the
/// `on_done`/`on_log` phase), before which `request.duration` is not found.
fn http_property(s: &HttpStream, segments: &[&[u8]], complete: bool) -> Result<Vec<u8>, Status> {
    let req = &s.request;
    let header = |name: http::header::HeaderName| {
        req.headers
            .get(name)
            .map(|v| v.as_bytes().to_vec())
            .ok_or(Status::NotFound)
    };
    let v = match segments {
        [b"request", b"path"] => text(req.uri.path_and_query().map_or("/", |p| p.as_str())),
        [b"request", b"url_path"] => text(req.uri.path()),
        [b"request", b"host"] => match req.uri.authority() {
            Some(a) => text(a.as_str()),
            None => header(HOST)?,
        },
        [b"request", b"scheme"] => text(req.uri.scheme_str().unwrap_or("http")),
        [b"request", b"method"] => text(req.method.as_str()),
        [b"request", b"headers", rest @ ..] => {
            if rest.is_empty() {
                let mut list = Vec::new();
                super::maps::request_pairs(s, &mut list);
                pairs::encode(list.iter().map(|(k, v)| (*k, *v)))
            } else {
                header_map_value(&req.headers, rest)?
            }
        }
        [b"request", b"id"] => header(http::header::HeaderName::from_static("x-request-id"))?,
        [b"request", b"protocol"] => text(lacewing_core::stream::protocol_name(s.info.protocol)),
        [b"request", b"time"] => int(nanos(s.info.start_time)),
        // As in Envoy, the duration exists once the request is complete.
        [b"request", b"duration"] if complete => {
            int(s.info.start_instant.elapsed().as_nanos() as i64)
        }
        [b"request", b"size"] => int(s.info.request_body_bytes as i64),
        [b"request", b"total_size"] => {
            let headers: usize = req
                .headers
                .iter()
                .map(|(k, v)| k.as_str().len() + v.len() + 4)
                .sum();
            int((s.info.request_body_bytes as usize + headers) as i64)
        }
        [b"request", b"query"] => text(req.uri.query().unwrap_or_default()),
        [b"request", b"useragent"] => header(USER_AGENT)?,
        [b"request", b"referer"] => header(REFERER)?,
        [b"response", rest @ ..] => return response_property(s, rest),
        _ => return Err(Status::NotFound),
    };
    Ok(v)
}

fn response_property(s: &HttpStream, segments: &[&[u8]]) -> Result<Vec<u8>, Status> {
    let v = match segments {
        [b"code"] => {
            let code = s
                .info
                .response_code
                .or_else(|| s.response.as_ref().map(|r| r.status.as_u16()))
                .ok_or(Status::NotFound)?;
            int(i64::from(code))
        }
        [b"code_details"] => text(s.info.response_code_details.as_deref().unwrap_or_default()),
        [b"flags"] => int(flag_bits(s.info.response_flag)),
        [b"headers", rest @ ..] => {
            header_map_value(&s.response.as_ref().ok_or(Status::NotFound)?.headers, rest)?
        }
        [b"trailers", rest @ ..] => {
            header_map_value(s.response_trailers.as_ref().ok_or(Status::NotFound)?, rest)?
        }
        [b"size"] => int(s.info.response_body_bytes as i64),
        [b"total_size"] => {
            let headers: usize = s.response.as_ref().map_or(0, |r| {
                r.headers
                    .iter()
                    .map(|(k, v)| k.as_str().len() + v.len() + 4)
                    .sum()
            });
            int((s.info.response_body_bytes as usize + headers) as i64)
        }
        _ => return Err(Status::NotFound),
    };
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segments_of(path: &[u8]) -> Vec<Vec<u8>> {
        with_segments(path, |s| s.iter().map(|s| s.to_vec()).collect())
    }

    #[test]
    fn segments_on_the_stack_match_split_path() {
        let long: Vec<u8> = (0..12u8).flat_map(|i| [b'a' + i, 0]).collect::<Vec<_>>();
        for path in [
            &b""[..],
            b"\0",
            b"source\0principal",
            b"source\0principal\0",
            b"request\0headers\0x-id",
            b"a\0\0b",
            b"a\0b\0c\0d\0e\0f\0g\0h",
            &long,
        ] {
            let expected: Vec<Vec<u8>> = property::split_path(path)
                .into_iter()
                .map(<[u8]>::to_vec)
                .collect();
            assert_eq!(segments_of(path), expected, "{path:?}");
        }
    }
}
