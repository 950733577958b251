//! seal in the real host: fields sealed on the way out open on the way in
//! (including after a key rotation), plaintext is refused where sealing is
//! required, and bad keys reject the configuration.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use lacewing_filter_test::{FilterTest, Verdict, module};
use serde_json::json;

fn key(byte: u8) -> String {
    STANDARD.encode([byte; 32])
}

/// A sidecar that seals `x-card` and `card.number` in responses.
fn sealer(active: &str) -> FilterTest {
    FilterTest::builder(module("seal").unwrap())
        .configuration(json!({
            "keys": [{"id": "k1", "key": key(1)}, {"id": "k2", "key": key(2)}],
            "active_key": active,
            "response": {"mode": "seal", "headers": ["x-card"], "json_fields": ["card.number"]}
        }))
        .load()
        .unwrap()
}

/// A sidecar that opens them in requests and requires them sealed.
fn opener(keys: serde_json::Value) -> FilterTest {
    FilterTest::builder(module("seal").unwrap())
        .configuration(json!({
            "keys": keys,
            "active_key": "k2",
            "request": {"mode": "open", "headers": ["x-card"], "json_fields": ["card.number"], "require_sealed": true}
        }))
        .load()
        .unwrap()
}

/// Seals a response through `test`: returns the sealed header and body.
fn seal_response(test: &FilterTest) -> (String, serde_json::Value) {
    let mut s = test.stream(http::Request::get("/card").body(()).unwrap());
    assert_eq!(s.request_headers(true), Verdict::Continue);
    let response = http::Response::builder()
        .status(200)
        .header("x-card", "4111-1111")
        .header("content-length", "47")
        .body(())
        .unwrap();
    assert_eq!(s.response_headers(response, false), Verdict::Continue);
    assert_eq!(
        s.response_header("content-length"),
        None,
        "the body changes length"
    );
    let body = br#"{"card":{"number":"4111-1111","name":"Ada"}}"#;
    assert_eq!(s.response_body(&body[..20], false), Verdict::Buffering);
    assert_eq!(s.response_body(&body[20..], true), Verdict::Continue);
    let header = s.response_header("x-card").unwrap();
    let body: serde_json::Value = serde_json::from_slice(s.forwarded_response_body()).unwrap();
    (header, body)
}

/// Sends a sealed request through `test`: returns what the service receives.
fn open_request(
    test: &FilterTest,
    header: &str,
    body: &serde_json::Value,
) -> Result<(String, serde_json::Value), Box<lacewing_filter_test::Reply>> {
    let mut s = test.stream(
        http::Request::post("/pay")
            .header("x-card", header)
            .body(())
            .unwrap(),
    );
    match s.request_headers(false) {
        Verdict::Continue => {}
        Verdict::Replied(r) => return Err(Box::new(r)),
        other => panic!("{other:?}"),
    }
    match s.request_body(body.to_string().as_bytes(), true) {
        Verdict::Continue => {}
        Verdict::Replied(r) => return Err(Box::new(r)),
        other => panic!("{other:?}"),
    }
    let received = serde_json::from_slice(s.forwarded_request_body()).unwrap();
    Ok((s.request_header("x-card").unwrap(), received))
}

#[test]
fn sealed_fields_round_trip_and_survive_rotation() {
    let (header, body) = seal_response(&sealer("k1"));
    assert!(header.starts_with("lws1:k1:"), "{header}");
    let sealed = body["card"]["number"].as_str().unwrap();
    assert!(sealed.starts_with("lws1:k1:"), "{body}");
    assert!(
        !body.to_string().contains("4111"),
        "no plaintext left: {body}"
    );
    assert_eq!(body["card"]["name"], "Ada", "unlisted fields untouched");

    // The opener has rotated to k2 but still lists k1.
    let (got_header, got_body) = open_request(
        &opener(json!([{"id": "k2", "key": key(2)}, {"id": "k1", "key": key(1)}])),
        &header,
        &body,
    )
    .unwrap();
    assert_eq!(got_header, "4111-1111");
    assert_eq!(
        got_body,
        json!({"card": {"number": "4111-1111", "name": "Ada"}})
    );

    // After k1 is dropped, values sealed under it no longer open.
    let only_k2 = opener(json!([{"id": "k2", "key": key(2)}]));
    let reply = open_request(&only_k2, &header, &body).unwrap_err();
    assert_eq!(reply.status, 400);
    assert!(String::from_utf8_lossy(&reply.body).contains("unknown key `k1`"));
    // New values are sealed under the active key.
    let (header2, _) = seal_response(&sealer("k2"));
    assert!(header2.starts_with("lws1:k2:"), "{header2}");
}

#[test]
fn plaintext_is_refused_where_sealing_is_required() {
    let test = opener(json!([{"id": "k2", "key": key(2)}]));
    let reply = open_request(&test, "4111-1111", &json!({})).unwrap_err();
    assert_eq!(reply.status, 400);
    assert_eq!(reply.header("x-lacewing-seal"), Some("refused"));
    assert!(String::from_utf8_lossy(&reply.body).contains("header `x-card` must arrive sealed"));

    let (header, _) = seal_response(&sealer("k2"));
    let reply = open_request(&test, &header, &json!({"card": {"number": "4111"}})).unwrap_err();
    assert!(
        String::from_utf8_lossy(&reply.body).contains("field `card.number` must arrive sealed")
    );
}

#[test]
fn bad_keys_and_fields_are_refused() {
    for (config, reason) in [
        (
            json!({"keys": [{"id": "k", "key": STANDARD.encode([0u8; 16])}], "active_key": "k"}),
            "must be 32 bytes",
        ),
        (
            json!({"keys": [{"id": "k", "key": key(1)}], "active_key": "other"}),
            "active_key",
        ),
        (
            json!({"keys": [{"id": "k", "key": "not base64!"}], "active_key": "k"}),
            "not base64",
        ),
        (
            json!({"keys": [{"id": "k", "key": key(1)}], "active_key": "k", "request": {"mode": "seal", "headers": ["a"], "require_sealed": true}}),
            "only with mode `open`",
        ),
        (
            json!({"keys": [], "active_key": "k", "cipher": "des"}),
            "unknown field `cipher`",
        ),
    ] {
        let err = FilterTest::builder(module("seal").unwrap())
            .configuration(config)
            .load()
            .unwrap_err();
        assert!(err.to_string().contains(reason), "{reason}: {err}");
    }
}
