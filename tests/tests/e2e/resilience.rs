//! Upstream failures as a client sees them: timeouts, dead endpoints, retries,
//! and the short local replies the proxy writes for them.

use http::StatusCode;
use lacewing_tests::client::{self, Response, metric_sum};
use lacewing_tests::{proxy, servers};

/// A proxy-generated error reply is short, non-empty text.
fn assert_short_local_reply(response: &Response) {
    assert!(
        response.header("x-upstream").is_none(),
        "the proxy answered, not an upstream"
    );
    assert!(
        !response.body.is_empty() && response.body.len() <= 512,
        "local reply bodies are short and non-empty: {:?}",
        response.text()
    );
}

#[tokio::test]
async fn slow_upstream_times_out_with_504() {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::fill(
        "admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - { name: slow, cluster: upstream, timeout: 200ms }
clusters:
  - { name: upstream, endpoints: ['{upstream}'] }
",
        &[("upstream", &upstream.addr)],
    ));

    let response = client::get(&proxy::url(&handle, "main", "/delay/2000")).await;

    assert_eq!(response.status, StatusCode::GATEWAY_TIMEOUT);
    assert_short_local_reply(&response);
    let metrics = client::metrics(proxy::admin_addr(&handle)).await;
    assert_eq!(
        metric_sum(
            &metrics,
            "lacewing_http_local_replies_total",
            &[("flag", "UT")]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "lacewing_http_requests_total",
            &[("route", "slow"), ("class", "5xx")]
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn dead_endpoint_is_retried_on_a_live_one() {
    let live = servers::http_echo_named("live").await;
    let dead = servers::dead_addr();
    let handle = proxy::start(&proxy::fill(
        "admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - { name: default, cluster: upstream, retry: { attempts: 2 } }
clusters:
  - { name: upstream, endpoints: ['{dead}', '{live}'], lb: round_robin }
",
        &[("dead", &dead), ("live", &live.addr)],
    ));

    // Round robin sends at least one of these first attempts to the dead endpoint.
    for i in 0..4 {
        let response = client::get(&proxy::url(&handle, "main", &format!("/retry/{i}"))).await;
        assert_eq!(
            response.status,
            StatusCode::OK,
            "request {i}: {}",
            response.text()
        );
        assert_eq!(response.header("x-upstream"), Some("live"));
    }

    let admin = proxy::admin_addr(&handle);
    let metrics = client::metrics(admin).await;
    let retries = metric_sum(
        &metrics,
        "lacewing_upstream_retries_total",
        &[("cluster", "upstream")],
    );
    assert!(
        retries.is_some_and(|r| r > 0.0),
        "retries recorded: {metrics}"
    );
    let failures = metric_sum(
        &metrics,
        "lacewing_upstream_connect_failures_total",
        &[("cluster", "upstream")],
    );
    assert!(
        failures.is_some_and(|f| f > 0.0),
        "connect failures recorded: {metrics}"
    );
}

#[tokio::test]
async fn all_endpoints_dead_gives_a_short_5xx_naming_the_failure() {
    let handle = proxy::start(&proxy::fill(
        "admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - { name: default, cluster: upstream, retry: { attempts: 2 } }
clusters:
  - { name: upstream, endpoints: ['{a}', '{b}'] }
",
        &[("a", &servers::dead_addr()), ("b", &servers::dead_addr())],
    ));

    let response = client::get(&proxy::url(&handle, "main", "/nobody-home")).await;

    // lacewing-core's mapping: a failed connect is 502 (flag UF); no healthy
    // endpoint left to try is 503 (flag UH). Either is right here, but the
    // status and the recorded flag must agree.
    assert_short_local_reply(&response);
    let metrics = client::metrics(proxy::admin_addr(&handle)).await;
    let flag = |code: &str| {
        metric_sum(
            &metrics,
            "lacewing_http_local_replies_total",
            &[("flag", code)],
        )
        .unwrap_or(0.0)
    };
    match response.status {
        StatusCode::BAD_GATEWAY => assert_eq!(flag("UF"), 1.0, "502 is recorded as UF: {metrics}"),
        StatusCode::SERVICE_UNAVAILABLE => {
            assert_eq!(flag("UH"), 1.0, "503 is recorded as UH: {metrics}")
        }
        other => panic!("expected 502 or 503, got {other}: {}", response.text()),
    }
}
