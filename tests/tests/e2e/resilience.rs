//! Upstream failures as a client sees them: timeouts, dead endpoints, retries,
//! and the short local replies the proxy writes for them.

use http::StatusCode;
use lacewing_proxy::ProxyHandle;
use lacewing_tests::client::{self, Response, metric_sum};
use lacewing_tests::{proxy, servers};

/// The retry policy of the routes to clusters with a dead endpoint.
const RETRY_TWICE: &str = "{ name: default, cluster: upstream, retry: { attempts: 2 } }";

/// A one-worker proxy config with listener `main` holding the single `route`
/// and the single `cluster`, both YAML flow mappings.
fn one_route_yaml(route: &str, cluster: &str) -> String {
    format!(
        "admin: {{ address: 127.0.0.1:0 }}
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - {route}
clusters:
  - {cluster}
"
    )
}

/// A proxy retrying twice on cluster `upstream`, whose two endpoints refuse
/// connections; `cluster_settings` (`, key: value`...) extend the cluster.
fn start_with_two_dead_endpoints(cluster_settings: &str) -> ProxyHandle {
    let cluster = format!("{{ name: upstream, endpoints: ['{{a}}', '{{b}}']{cluster_settings} }}");
    proxy::start(&proxy::fill(
        &one_route_yaml(RETRY_TWICE, &cluster),
        &[("a", &servers::dead_addr()), ("b", &servers::dead_addr())],
    ))
}

/// Asserts exactly one local reply carried response flag `flag`; returns the
/// metrics text for further checks.
async fn assert_one_local_reply_flagged(handle: &ProxyHandle, flag: &str) -> String {
    let metrics = client::metrics(proxy::admin_addr(handle)).await;
    assert_eq!(
        metric_sum(
            &metrics,
            "lacewing_http_local_replies_total",
            &[("flag", flag)]
        ),
        Some(1.0),
        "{metrics}"
    );
    metrics
}

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
        &one_route_yaml(
            "{ name: slow, cluster: upstream, timeout: 200ms }",
            "{ name: upstream, endpoints: ['{upstream}'] }",
        ),
        &[("upstream", &upstream.addr)],
    ));

    let response = client::get(&proxy::url(&handle, "main", "/delay/2000")).await;

    assert_eq!(response.status, StatusCode::GATEWAY_TIMEOUT);
    assert_short_local_reply(&response);
    let metrics = assert_one_local_reply_flagged(&handle, "UT").await;
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

/// An HTTP/1 connection's requests share one timer for their route
/// timeouts: each request still gets exactly its own route's timeout, after
/// a request with a longer timeout and after one that finished long before.
#[tokio::test]
async fn every_request_of_a_keep_alive_connection_gets_its_own_route_timeout() {
    let upstream = servers::http_echo().await;
    let yaml = "admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - { name: patient, match: { path: { prefix: /patient } }, cluster: upstream, timeout: 5s }
      - { name: hasty, cluster: upstream, timeout: 300ms }
clusters:
  - { name: upstream, endpoints: ['{upstream}'] }
";
    let handle = proxy::start(&proxy::fill(yaml, &[("upstream", &upstream.addr)]));
    let client = client::ReusingClient::http1();
    let url = |path: &str| proxy::url(&handle, "main", path);

    // The patient route's 5 s timer is armed first; the hasty request after
    // it must not wait for it.
    let answered = client.get(&url("/patient")).await;
    assert_eq!(answered.status, StatusCode::OK, "{}", answered.text());
    let started = std::time::Instant::now();
    let hasty = client.get(&url("/delay/3000")).await;
    let waited = started.elapsed();
    assert_eq!(
        hasty.status,
        StatusCode::GATEWAY_TIMEOUT,
        "{}",
        hasty.text()
    );
    assert!(
        waited >= std::time::Duration::from_millis(300)
            && waited < std::time::Duration::from_secs(3),
        "the hasty route timed out after {waited:?}"
    );

    // Quick requests leave the timer armed for deadlines long gone by the
    // time a slow one comes: it still waits its whole timeout, and no more.
    for _ in 0..3 {
        let quick = client.get(&url("/quick")).await;
        assert_eq!(quick.status, StatusCode::OK);
    }
    tokio::time::sleep(std::time::Duration::from_millis(400)).await;
    let answered = client.get(&url("/delay/150")).await;
    assert_eq!(
        answered.status,
        StatusCode::OK,
        "within its 300 ms: {}",
        answered.text()
    );
    let started = std::time::Instant::now();
    let slow = client.get(&url("/delay/3000")).await;
    let waited = started.elapsed();
    assert_eq!(slow.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(
        waited >= std::time::Duration::from_millis(300)
            && waited < std::time::Duration::from_secs(3),
        "timed out after {waited:?}"
    );

    let metrics = client::metrics(proxy::admin_addr(&handle)).await;
    assert_eq!(
        metric_sum(
            &metrics,
            "lacewing_downstream_connections_total",
            &[("listener", "main")]
        ),
        Some(1.0),
        "every request came on one connection: {metrics}"
    );
}

/// An HTTP/1.1 upstream on loopback that answers its first request `503`
/// and every later one `200`, each with the request's `x-kept` header as
/// its body (`-` when absent), over keep-alive connections.
async fn busy_once_upstream() -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let answered = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let answered = answered.clone();
            tokio::spawn(async move {
                let mut buffered = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buffered.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buffered.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buffered[..end]).to_lowercase();
                    buffered.drain(..end + 4);
                    let kept = head
                        .lines()
                        .find_map(|line| line.strip_prefix("x-kept:"))
                        .map_or("-".to_owned(), |v| v.trim().to_owned());
                    let first = answered.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0;
                    let status = if first {
                        "503 Service Unavailable"
                    } else {
                        "200 OK"
                    };
                    let reply = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n{kept}",
                        kept.len()
                    );
                    if stream.write_all(reply.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// A filtered request answered `503` is sent again as the filters left it:
/// with the header a plugin set, taken from the filters' stream.
#[tokio::test]
async fn a_filtered_request_is_retried_with_the_headers_its_filters_set() {
    let upstream = busy_once_upstream().await;
    let module = lacewing_tests::wasm::module("headers");
    let yaml = one_route_yaml(
        "{ name: default, cluster: upstream, filters: [tag], retry: { attempts: 2 } }",
        &format!("{{ name: upstream, endpoints: ['{upstream}'] }}"),
    ) + &format!(
        "plugins:\n  - {{ name: tag, module: {}, configuration: {{ request: {{ set: {{ x-kept: from-filter }} }} }} }}\n",
        lacewing_tests::wasm::yaml_path(&module)
    );
    let handle = proxy::start(&yaml);

    let response = client::get(&proxy::url(&handle, "main", "/")).await;

    assert_eq!(response.status, StatusCode::OK, "{}", response.text());
    assert_eq!(
        response.text(),
        "from-filter",
        "the retried request carried the filter's header"
    );
    let metrics = client::metrics(proxy::admin_addr(&handle)).await;
    assert_eq!(
        metric_sum(&metrics, "lacewing_upstream_retries_total", &[]),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn dead_endpoint_is_retried_on_a_live_one() {
    let live = servers::http_echo_named("live").await;
    let dead = servers::dead_addr();
    let handle = proxy::start(&proxy::fill(
        &one_route_yaml(
            RETRY_TWICE,
            "{ name: upstream, endpoints: ['{dead}', '{live}'], lb: round_robin }",
        ),
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
async fn all_endpoints_refusing_gives_502_with_flag_uf() {
    let handle = start_with_two_dead_endpoints("");

    let response = client::get(&proxy::url(&handle, "main", "/nobody-home")).await;

    // A connect failure on every endpoint (none ejected yet) is a failed
    // connect: 502, flag UF (lacewing-core `ProxyError::Connect`).
    assert_eq!(
        response.status,
        StatusCode::BAD_GATEWAY,
        "{}",
        response.text()
    );
    assert_short_local_reply(&response);
    assert_one_local_reply_flagged(&handle, "UF").await;
}

#[tokio::test]
async fn every_endpoint_ejected_fails_fast_with_503_and_flag_uh() {
    let handle = start_with_two_dead_endpoints(
        ", outlier_detection: { consecutive_failures: 1, base_ejection_time: 60s, max_ejection_percent: 100 }",
    );
    let url = proxy::url(&handle, "main", "/nobody-home");

    // The first request tries both endpoints; each refusal ejects one.
    let first = client::get(&url).await;
    assert_eq!(first.status, StatusCode::BAD_GATEWAY, "{}", first.text());
    let second = client::get(&url).await;

    // With every endpoint ejected for refusing connections, requests fail
    // fast: no healthy upstream, 503, flag UH.
    assert_eq!(
        second.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        second.text()
    );
    assert_short_local_reply(&second);
    let metrics = assert_one_local_reply_flagged(&handle, "UH").await;
    assert!(
        metric_sum(
            &metrics,
            "lacewing_upstream_ejections_total",
            &[("cluster", "upstream")]
        )
        .is_some_and(|n| n >= 2.0),
        "both endpoints ejected: {metrics}"
    );
}

/// A listener with no routes yet and a cluster with no endpoints yet are
/// valid (a control plane's mesh may have neither): the first answers 404
/// (flag NR), a route to the second 503 (flag UH).
#[tokio::test]
async fn no_routes_give_404_nr_and_no_endpoints_give_503_uh() {
    let no_routes = proxy::start(
        "admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - { name: main, address: 127.0.0.1:0 }
",
    );
    let response = client::get(&proxy::url(&no_routes, "main", "/any")).await;
    assert_eq!(response.status, StatusCode::NOT_FOUND);
    assert_short_local_reply(&response);
    assert_one_local_reply_flagged(&no_routes, "NR").await;

    let no_endpoints = proxy::start(&one_route_yaml(
        "{ name: default, cluster: upstream }",
        "{ name: upstream, endpoints: [] }",
    ));
    let response = client::get(&proxy::url(&no_endpoints, "main", "/any")).await;
    assert_eq!(response.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_short_local_reply(&response);
    assert_one_local_reply_flagged(&no_endpoints, "UH").await;
}
