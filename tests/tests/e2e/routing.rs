//! Route matching as a client sees it: each request lands on the cluster its
//! route names (told apart by the upstream's `x-upstream` header).

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use lacewing_tests::client::{self, metric_sum};
use lacewing_tests::{proxy, servers};

const ROUTES: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
drain_timeout: 1s
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - name: exact
        match: { path: { exact: /exact } }
        cluster: exact
      - name: regex
        match: { path: { regex: '^/items/[0-9]+$' } }
        cluster: regex
      - name: canary
        match: { path: { prefix: /api }, headers: [{ name: x-canary, exact: '1' }] }
        cluster: canary
      - name: writes
        match: { path: { prefix: /api }, method: POST }
        cluster: writes
      - name: api
        match: { path: { prefix: /api } }
        cluster: api
      - name: shop
        match: { authority: '*.example.com' }
        cluster: shop
      - name: orders
        match: { authority: orders }
        cluster: orders
      - name: fallback
        match: { path: { prefix: / } }
        cluster: fallback
  - name: strict
    address: 127.0.0.1:0
    routes:
      - name: only
        match: { path: { exact: /only } }
        cluster: exact
clusters:
  - { name: exact, endpoints: ['{exact}'] }
  - { name: regex, endpoints: ['{regex}'] }
  - { name: canary, endpoints: ['{canary}'] }
  - { name: writes, endpoints: ['{writes}'] }
  - { name: api, endpoints: ['{api}'] }
  - { name: shop, endpoints: ['{shop}'] }
  - { name: orders, endpoints: ['{orders}'] }
  - { name: fallback, endpoints: ['{fallback}'] }
";

/// A request (path, method, headers) and the upstream it must land on.
type Case = (
    &'static str,
    Method,
    &'static [(&'static str, &'static str)],
    &'static str,
);

/// Sends a request and returns which upstream answered.
async fn landed_on(url: &str, method: Method, headers: &[(&str, &str)]) -> String {
    let mut request = Request::builder().method(method.clone()).uri(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = client::request(request.body(Full::new(Bytes::new())).unwrap()).await;
    assert_eq!(
        response.status,
        StatusCode::OK,
        "{method} {url} {headers:?}: {}",
        response.text()
    );
    response
        .header("x-upstream")
        .unwrap_or_else(|| panic!("{method} {url}: no x-upstream header"))
        .to_string()
}

#[tokio::test]
async fn requests_take_the_first_matching_route() {
    let names = [
        "exact", "regex", "canary", "writes", "api", "shop", "orders", "fallback",
    ];
    let mut upstreams = Vec::new();
    for name in names {
        upstreams.push(servers::http_echo_named(name).await);
    }
    let addrs: Vec<_> = upstreams.iter().map(|u| u.addr).collect();
    let values: Vec<(&str, &dyn std::fmt::Display)> = names
        .iter()
        .zip(&addrs)
        .map(|(name, addr)| (*name, addr as &dyn std::fmt::Display))
        .collect();
    let handle = proxy::start(&proxy::fill(ROUTES, &values));
    let url = |path: &str| proxy::url(&handle, "main", path);

    let cases: &[Case] = &[
        ("/exact", Method::GET, &[], "exact"),
        ("/exact/more", Method::GET, &[], "fallback"),
        ("/items/42", Method::GET, &[], "regex"),
        ("/items/forty-two", Method::GET, &[], "fallback"),
        ("/api/orders", Method::GET, &[("x-canary", "1")], "canary"),
        ("/api/orders", Method::GET, &[("x-canary", "2")], "api"),
        ("/api/orders", Method::POST, &[], "writes"),
        ("/api/orders", Method::GET, &[], "api"),
        (
            "/anything",
            Method::GET,
            &[("host", "shop.example.com")],
            "shop",
        ),
        (
            "/anything",
            Method::GET,
            &[("host", "orders:8080")],
            "orders",
        ),
        (
            "/anything",
            Method::GET,
            &[("host", "example.com")],
            "fallback",
        ),
        ("/", Method::GET, &[], "fallback"),
    ];
    for (path, method, headers, expected) in cases {
        let got = landed_on(&url(path), method.clone(), headers).await;
        assert_eq!(&got, expected, "{method} {path} {headers:?}");
    }
}

#[tokio::test]
async fn unmatched_request_gets_404_from_the_proxy() {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::fill(
        "admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - { name: only, match: { path: { exact: /only } }, cluster: upstream }
clusters:
  - { name: upstream, endpoints: ['{upstream}'] }
",
        &[("upstream", &upstream.addr)],
    ));

    let miss = client::get(&proxy::url(&handle, "main", "/elsewhere")).await;

    assert_eq!(miss.status, StatusCode::NOT_FOUND);
    assert!(
        miss.header("x-upstream").is_none(),
        "the proxy answered, not the upstream"
    );
    assert!(
        !miss.body.is_empty() && miss.body.len() < 512,
        "short body: {:?}",
        miss.text()
    );
    assert_eq!(upstream.accepted(), 0);
    let hit = client::get(&proxy::url(&handle, "main", "/only")).await;
    assert_eq!(hit.status, StatusCode::OK);
    let metrics = client::metrics(proxy::admin_addr(&handle)).await;
    assert_eq!(
        metric_sum(
            &metrics,
            "lacewing_http_local_replies_total",
            &[("flag", "NR")]
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn weighted_clusters_split_traffic_by_weight() {
    let heavy = servers::http_echo_named("heavy").await;
    let light = servers::http_echo_named("light").await;
    let handle = proxy::start(&proxy::fill(
        "admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - name: split
        weighted_clusters: [{ cluster: heavy, weight: 80 }, { cluster: light, weight: 20 }]
clusters:
  - { name: heavy, endpoints: ['{heavy}'] }
  - { name: light, endpoints: ['{light}'] }
",
        &[("heavy", &heavy.addr), ("light", &light.addr)],
    ));
    let url = proxy::url(&handle, "main", "/split");

    const SAMPLES: usize = 400;
    let mut heavy_count = 0usize;
    for _ in 0..SAMPLES {
        match landed_on(&url, Method::GET, &[]).await.as_str() {
            "heavy" => heavy_count += 1,
            "light" => {}
            other => panic!("unexpected upstream {other}"),
        }
    }

    // Expected 320 of 400 (σ ≈ 8); the bounds are ±7σ so chance alone never fails the test.
    assert!(
        (264..=376).contains(&heavy_count),
        "80/20 split gave {heavy_count} of {SAMPLES} to the heavy cluster"
    );
}
