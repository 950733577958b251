//! Proxy header semantics: hop-by-hop removal, `x-forwarded-for`, `x-request-id`.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// `x-request-id`.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// `x-forwarded-for`.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `x-forwarded-proto`.
pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one hop and never travel further (RFC 9110 7.6.1).
fn fixed_hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHORIZATION,
        &header::PROXY_AUTHENTICATE,
    ]
}

/// What [`strip_hop_by_hop`] learned about an upgrade.
#[derive(Debug, Default)]
pub struct HopByHop {
    /// The `Upgrade` value when `Connection` listed `upgrade`.
    pub upgrade: Option<HeaderValue>,
    /// Whether `TE: trailers` was present (kept for gRPC).
    pub te_trailers: bool,
}

/// Whether a header name is hop-by-hop on its own (without `Connection` naming it).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TE || fixed_hop_by_hop().contains(&name)
}

/// Removes hop-by-hop headers, including those `Connection` names. `TE` is
/// kept only as `TE: trailers`. Returns the upgrade the client asked for.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> HopByHop {
    let mut out = HopByHop::default();
    // Fast path: one scan of the names, no hashing; most messages carry none.
    if !headers.keys().any(is_hop_by_hop) {
        return out;
    }
    let has_connection = headers.contains_key(header::CONNECTION);
    let has_te = headers.contains_key(header::TE);
    if has_connection {
        let mut wants_upgrade = false;
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|token| {
                let token = token.trim();
                if token.eq_ignore_ascii_case("upgrade") {
                    wants_upgrade = true;
                }
                HeaderName::from_bytes(token.to_ascii_lowercase().as_bytes()).ok()
            })
            .collect();
        if wants_upgrade {
            out.upgrade = headers.get(header::UPGRADE).cloned();
        }
        for name in named {
            if name != header::TE {
                headers.remove(&name);
            }
        }
    }
    for name in fixed_hop_by_hop() {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
    if has_te {
        out.te_trailers = headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        headers.remove(header::TE);
        if out.te_trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    out
}

/// Appends the client address to `x-forwarded-for`.
pub fn append_forwarded_for(headers: &mut HeaderMap, client: IpAddr) {
    let mut buf = [0u8; 64];
    let ip = format_ip(client, &mut buf);
    match headers.get(&X_FORWARDED_FOR).map(|v| v.as_bytes()) {
        Some(existing) if !existing.is_empty() => {
            let mut joined = Vec::with_capacity(existing.len() + 2 + ip.len());
            joined.extend_from_slice(existing);
            joined.extend_from_slice(b", ");
            joined.extend_from_slice(ip);
            if let Ok(v) = HeaderValue::from_bytes(&joined) {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
        _ => {
            if let Ok(v) = HeaderValue::from_bytes(ip) {
                headers.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
    }
}

fn format_ip(ip: IpAddr, buf: &mut [u8; 64]) -> &[u8] {
    use std::io::Write;
    if let IpAddr::V4(v4) = ip {
        // The common case, without the formatting machinery.
        let mut len = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[len] = b'.';
                len += 1;
            }
            if octet >= 100 {
                buf[len] = b'0' + octet / 100;
                len += 1;
            }
            if octet >= 10 {
                buf[len] = b'0' + (octet / 10) % 10;
                len += 1;
            }
            buf[len] = b'0' + octet % 10;
            len += 1;
        }
        return &buf[..len];
    }
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    // An IP address always fits in 64 bytes.
    let _ = write!(cursor, "{ip}");
    let len = cursor.position() as usize;
    &buf[..len]
}

/// Adds a fresh `x-request-id` when the request has none; returns the id.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        return v.clone();
    }
    let v = new_request_id();
    headers.insert(X_REQUEST_ID.clone(), v.clone());
    v
}

/// A random UUIDv4 string, formatted without allocation.
pub fn new_request_id() -> HeaderValue {
    use rand::Rng;
    let mut bytes: [u8; 16] = rand::rng().random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 36];
    let mut o = 0;
    for (i, b) in bytes.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[o] = b'-';
            o += 1;
        }
        out[o] = HEX[(b >> 4) as usize];
        out[o + 1] = HEX[(b & 0xf) as usize];
        o += 2;
    }
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_fixed_and_named_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert("connection", "keep-alive, x-secret".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("x-secret", "1".parse().unwrap());
        h.insert("proxy-connection", "close".parse().unwrap());
        h.insert("te", "gzip".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        let out = strip_hop_by_hop(&mut h);
        assert!(out.upgrade.is_none());
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }

    #[test]
    fn keeps_te_trailers_and_reports_upgrade() {
        let mut h = HeaderMap::new();
        h.insert("connection", "Upgrade".parse().unwrap());
        h.insert("upgrade", "websocket".parse().unwrap());
        h.insert("te", "trailers, deflate".parse().unwrap());
        let out = strip_hop_by_hop(&mut h);
        assert_eq!(out.upgrade.unwrap(), "websocket");
        assert!(out.te_trailers);
        assert_eq!(h.get("te").unwrap(), "trailers");
        assert!(!h.contains_key("upgrade"));
    }

    #[test]
    fn ipv4_formats_like_display() {
        for ip in [
            "0.0.0.0",
            "10.0.0.1",
            "127.0.0.1",
            "192.168.100.255",
            "1.20.255.9",
        ] {
            let mut buf = [0u8; 64];
            let addr: IpAddr = ip.parse().unwrap();
            assert_eq!(format_ip(addr, &mut buf), ip.as_bytes());
        }
    }

    #[test]
    fn messages_without_hop_headers_are_untouched() {
        let mut h = HeaderMap::new();
        h.insert("host", "a".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        let out = strip_hop_by_hop(&mut h);
        assert!(out.upgrade.is_none() && !out.te_trailers);
        assert_eq!(h.len(), 2);
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        append_forwarded_for(&mut h, "10.0.0.1".parse().unwrap());
        append_forwarded_for(&mut h, "::1".parse().unwrap());
        assert_eq!(h.get(&X_FORWARDED_FOR).unwrap(), "10.0.0.1, ::1");
    }

    #[test]
    fn request_id_is_uuid_shaped_and_kept() {
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        assert_eq!(ensure_request_id(&mut h), id);
    }
}
