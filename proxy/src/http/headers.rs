//! Proxy header semantics: one request authority, hop-by-hop removal,
//! `x-forwarded-for`, `x-request-id`.

use std::net::IpAddr;

use http::Version;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, Uri};

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

/// Removes hop-by-hop headers, including those `Connection` names. `TE` is
/// kept only as `TE: trailers`. Returns the upgrade the client asked for.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) -> HopByHop {
    let mut out = HopByHop::default();
    let fixed = fixed_hop_by_hop();
    // One scan of the names, no hashing: most requests carry no hop-by-hop
    // header and most HTTP/1.1 responses only `Connection`, so only the
    // names present are removed (each removal hashes; testing all seven did).
    let mut present = [false; 7];
    let mut has_te = false;
    for name in headers.keys() {
        if name == header::TE {
            has_te = true;
        } else if let Some(i) = fixed.iter().position(|f| *f == name) {
            present[i] = true;
        }
    }
    if !has_te && !present.contains(&true) {
        return out;
    }
    // `fixed[0]` is `Connection`.
    if present[0] {
        let mut wants_upgrade = false;
        let mut named: Vec<HeaderName> = Vec::new();
        for token in headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
        {
            let token = token.trim();
            if token.eq_ignore_ascii_case("upgrade") {
                wants_upgrade = true;
            }
            // `from_bytes` lowercases. A name of the fixed set goes anyway,
            // so the usual `keep-alive` or `upgrade` allocates nothing.
            let Ok(name) = HeaderName::from_bytes(token.as_bytes()) else {
                continue;
            };
            // `Host` is end to end: a client may not have it removed by naming it.
            if name != header::TE && name != header::HOST && !fixed.contains(&&name) {
                named.push(name);
            }
        }
        if wants_upgrade {
            out.upgrade = headers.get(header::UPGRADE).cloned();
        }
        for name in named {
            headers.remove(&name);
        }
    }
    for (name, present) in fixed.into_iter().zip(present) {
        if present {
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

/// Why a request's authority was refused (400).
#[derive(Debug, thiserror::Error)]
pub enum AuthorityError {
    #[error("more than one Host header")]
    DuplicateHost,
    #[error("`{0}` is not a valid authority")]
    Invalid(String),
    #[error("Host `{host}` differs from :authority `{authority}`")]
    Conflict { host: String, authority: String },
}

/// Makes the request carry one authority, the one it is routed on and the one
/// forwarded: a second Host is refused (RFC 9112 3.2); the request-target of
/// an HTTP/1 absolute-form request replaces Host (RFC 9112 3.2.2); an HTTP/2
/// Host that names another authority than `:authority` is refused (RFC 9113
/// 8.3.1). The result is lower case without a trailing dot, and written both
/// to Host and, when the URI has an authority, to the URI.
pub fn one_authority(parts: &mut Parts) -> Result<(), AuthorityError> {
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    let first = hosts.next();
    if hosts.next().is_some() {
        return Err(AuthorityError::DuplicateHost);
    }
    // The usual request: origin form and one Host that is already in normal
    // form. Checking the bytes saves parsing, copying and reinserting Host.
    if parts.uri.authority().is_none() && first.is_some_and(|h| is_normal_host(h.as_bytes())) {
        return Ok(());
    }
    let host = first.filter(|h| !h.is_empty()).cloned();
    let host = host.map(|h| parse_authority(h.as_bytes())).transpose()?;
    let chosen = match (parts.uri.authority(), host) {
        (Some(authority), Some(host))
            if parts.version == Version::HTTP_2 && normalize(authority)? != normalize(&host)? =>
        {
            return Err(AuthorityError::Conflict {
                host: host.to_string(),
                authority: authority.to_string(),
            });
        }
        (Some(authority), _) => normalize(authority)?,
        (None, Some(host)) => normalize(&host)?,
        (None, None) => {
            parts.headers.remove(header::HOST);
            return Ok(());
        }
    };
    if let Ok(value) = HeaderValue::from_str(chosen.as_str()) {
        parts.headers.insert(header::HOST, value);
    }
    if parts
        .uri
        .authority()
        .is_some_and(|a| a.as_str() != chosen.as_str())
    {
        let mut uri = std::mem::take(&mut parts.uri).into_parts();
        uri.authority = Some(chosen.clone());
        parts.uri =
            Uri::from_parts(uri).map_err(|_| AuthorityError::Invalid(chosen.to_string()))?;
    }
    Ok(())
}

/// Whether `raw` is `name[:port]` with a lower-case DNS name or IPv4 address
/// (no trailing dot) and a decimal port: what [`normalize`] leaves unchanged.
fn is_normal_host(raw: &[u8]) -> bool {
    let (name, port) = match raw.iter().position(|&b| b == b':') {
        Some(colon) => (&raw[..colon], Some(&raw[colon + 1..])),
        None => (raw, None),
    };
    let name_ok = !name.is_empty()
        && name.last() != Some(&b'.')
        && name
            .iter()
            .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    let port_ok =
        port.is_none_or(|p| !p.is_empty() && p.len() <= 5 && p.iter().all(u8::is_ascii_digit));
    name_ok && port_ok
}

fn parse_authority(raw: &[u8]) -> Result<Authority, AuthorityError> {
    let invalid = || AuthorityError::Invalid(String::from_utf8_lossy(raw).into_owned());
    let authority = Authority::try_from(raw).map_err(|_| invalid())?;
    // Host is `host[:port]`: user information has no place in it (RFC 9110 4.2.4).
    if authority.as_str().contains('@') || authority.host().is_empty() {
        return Err(invalid());
    }
    Ok(authority)
}

/// Lower case, without the trailing dot of a fully qualified name.
fn normalize(authority: &Authority) -> Result<Authority, AuthorityError> {
    let host = authority.host();
    let bare = if host.starts_with('[') {
        host
    } else {
        host.trim_end_matches('.')
    };
    let already =
        bare.len() == host.len() && !authority.as_str().bytes().any(|b| b.is_ascii_uppercase());
    if already {
        return Ok(authority.clone());
    }
    let mut text = bare.to_ascii_lowercase();
    if let Some(port) = authority.port() {
        text.push(':');
        text.push_str(port.as_str());
    }
    if text.is_empty() || text.starts_with(':') {
        return Err(AuthorityError::Invalid(authority.to_string()));
    }
    parse_authority(text.as_bytes())
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

    fn head(version: Version, uri: &str, hosts: &[&str]) -> Parts {
        let mut b = http::Request::builder().version(version).uri(uri);
        for h in hosts {
            b = b.header("host", *h);
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn one_authority_is_routed_and_forwarded() {
        // Absolute form wins over Host in HTTP/1.
        let mut p = head(
            Version::HTTP_11,
            "http://Public.Example./x",
            &["admin.example"],
        );
        one_authority(&mut p).unwrap();
        assert_eq!(p.headers["host"], "public.example");
        assert_eq!(p.uri.authority().unwrap(), "public.example");
        // Case alone differs: the URI is rewritten too (Authority's own
        // comparison ignores case).
        let mut p = head(Version::HTTP_11, "http://A.example/x", &[]);
        one_authority(&mut p).unwrap();
        assert_eq!(p.uri.authority().unwrap().as_str(), "a.example");
        // Trailing dot and case, port kept.
        let mut p = head(Version::HTTP_11, "/", &["ADMIN.example.:8080"]);
        one_authority(&mut p).unwrap();
        assert_eq!(p.headers["host"], "admin.example:8080");
        // HTTP/2: Host must agree with :authority.
        let mut p = head(
            Version::HTTP_2,
            "http://public.example/",
            &["admin.example"],
        );
        assert!(matches!(
            one_authority(&mut p),
            Err(AuthorityError::Conflict { .. })
        ));
        let mut p = head(
            Version::HTTP_2,
            "http://public.example/",
            &["PUBLIC.example."],
        );
        one_authority(&mut p).unwrap();
        assert_eq!(p.headers["host"], "public.example");
    }

    #[test]
    fn bad_hosts_are_refused() {
        let mut p = head(Version::HTTP_11, "/", &["a.example", "b.example"]);
        assert!(matches!(
            one_authority(&mut p),
            Err(AuthorityError::DuplicateHost)
        ));
        for bad in ["user@a.example", "a b", ".", ":80"] {
            let mut p = head(Version::HTTP_11, "/", &[bad]);
            assert!(one_authority(&mut p).is_err(), "{bad}");
        }
        let mut p = head(Version::HTTP_11, "/", &[]);
        one_authority(&mut p).unwrap();
        assert!(!p.headers.contains_key("host"));
    }

    #[test]
    fn normal_hosts_are_recognised_without_parsing() {
        for plain in ["a.example", "a.example:8080", "127.0.0.1:80", "svc-1"] {
            assert!(is_normal_host(plain.as_bytes()), "{plain}");
            let mut p = head(Version::HTTP_11, "/", &[plain]);
            one_authority(&mut p).unwrap();
            assert_eq!(p.headers["host"], plain);
        }
        for other in [
            "A.example",
            "a.example.",
            "a:",
            ":80",
            "a:1:2",
            "[::1]:80",
            "u@a",
            "a:123456",
            "",
        ] {
            assert!(!is_normal_host(other.as_bytes()), "{other}");
        }
    }

    #[test]
    fn connection_cannot_remove_host() {
        let mut h = HeaderMap::new();
        h.insert("connection", "host, x-a".parse().unwrap());
        h.insert("host", "public.example".parse().unwrap());
        h.insert("x-a", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h["host"], "public.example");
        assert!(!h.contains_key("x-a"));
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
