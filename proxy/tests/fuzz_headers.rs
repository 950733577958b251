//! Fuzz target for the proxy's header handling (`lacewing_proxy::http::headers`):
//! any request head a client can send goes through the functions the
//! forwarding path applies to it, never panics, and comes out with no
//! hop-by-hop header, one normalised authority, the client appended to
//! `x-forwarded-for` and a request id. Runs for about a second under
//! `cargo test`; `BOLERO_RANDOM_TEST_TIME_MS` runs it longer (docs/security.md).

use std::net::{IpAddr, Ipv4Addr};

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Version};
use lacewing_proxy::http::headers::{
    X_FORWARDED_FOR, X_REQUEST_ID, append_forwarded_for, ensure_request_id, one_authority,
    strip_hop_by_hop,
};

/// Names the header functions treat specially; a generated name picks one of
/// these or is taken as raw bytes.
const NAMES: &[&str] = &[
    "host",
    "connection",
    "te",
    "transfer-encoding",
    "upgrade",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "x-forwarded-for",
    "x-request-id",
    "content-length",
];

/// Values that steer the same functions; likewise picked or raw.
const VALUES: &[&str] = &[
    "close",
    "upgrade, keep-alive",
    "host",
    "te, x-forwarded-for",
    "trailers",
    "gzip, trailers",
    "Admin.Example.",
    "admin.example:80",
    "[::1]:8080",
    "user@admin.example",
    ".",
    "",
];

/// Hop-by-hop names that never survive [`strip_hop_by_hop`].
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
    "proxy-authenticate",
];

fn pick(list: &[&str], choice: u8, raw: &[u8]) -> Vec<u8> {
    match list.get(usize::from(choice)) {
        Some(known) => known.as_bytes().to_vec(),
        None => raw.to_vec(),
    }
}

type Head = (Vec<(u8, Vec<u8>, u8, Vec<u8>)>, Vec<u8>, bool, [u8; 4]);

#[test]
fn fuzz_request_heads_through_the_header_functions() {
    bolero::check!()
        .with_type::<Head>()
        .for_each(|(fields, target, h2, ip)| {
            let target = String::from_utf8_lossy(target);
            let Ok(mut parts) = Request::get(target.as_ref())
                .body(())
                .map(|r| r.into_parts().0)
            else {
                return;
            };
            parts.version = if *h2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };
            for (name_choice, name, value_choice, value) in fields {
                let name = HeaderName::from_bytes(&pick(NAMES, *name_choice % 32, name));
                let value = HeaderValue::from_bytes(&pick(VALUES, *value_choice % 32, value));
                if let (Ok(name), Ok(value)) = (name, value) {
                    parts.headers.append(name, value);
                }
            }

            let hop = strip_hop_by_hop(&mut parts.headers);
            for name in HOP_BY_HOP {
                assert!(!parts.headers.contains_key(*name), "{name} survived");
            }
            for te in parts.headers.get_all(header::TE) {
                assert_eq!(te, "trailers");
            }
            assert_eq!(parts.headers.contains_key(header::TE), hop.te_trailers);

            if one_authority(&mut parts).is_ok() {
                let hosts: Vec<&HeaderValue> = parts.headers.get_all(header::HOST).iter().collect();
                assert!(hosts.len() <= 1, "{hosts:?}");
                if let Some(host) = hosts.first() {
                    let host = host.to_str().expect("an authority is ASCII");
                    assert!(!host.bytes().any(|b| b.is_ascii_uppercase()), "{host}");
                    // One authority: the URI carries exactly what Host does.
                    if let Some(authority) = parts.uri.authority() {
                        assert_eq!(authority.as_str(), host);
                    }
                }
            }

            let client = IpAddr::V4(Ipv4Addr::from(*ip));
            append_forwarded_for(&mut parts.headers, client);
            let forwarded = parts.headers[&X_FORWARDED_FOR].to_str().unwrap_or("");
            assert!(
                forwarded.is_empty() || forwarded.ends_with(&client.to_string()),
                "{forwarded}"
            );

            let id = ensure_request_id(&mut parts.headers);
            assert_eq!(parts.headers[&X_REQUEST_ID], id);
        });
}
