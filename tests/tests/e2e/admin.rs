//! The admin endpoint: `/metrics` counts what the data plane did, `/ready`
//! says whether it serves, `/config_dump` shows the live configuration.

use http::StatusCode;
use lacewing_tests::client::{self, metric_sum};
use lacewing_tests::{proxy, servers};

#[tokio::test]
async fn metrics_count_requests_by_listener_route_cluster_and_class() {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::simple_yaml(&[upstream.addr], "http1"));
    for path in ["/a", "/b", "/status/503", "/status/404"] {
        client::get(&proxy::url(&handle, "main", path)).await;
    }

    let metrics = client::metrics(proxy::admin_addr(&handle)).await;

    let count = |class: &str| {
        metric_sum(
            &metrics,
            "lacewing_http_requests_total",
            &[
                ("listener", "main"),
                ("route", "default"),
                ("cluster", "upstream"),
                ("class", class),
            ],
        )
    };
    assert_eq!(count("2xx"), Some(2.0), "{metrics}");
    assert_eq!(count("4xx"), Some(1.0), "{metrics}");
    // 503 is retried by default (attempts: 2), but the client saw one request.
    assert_eq!(count("5xx"), Some(1.0), "{metrics}");
    assert!(
        metrics.contains("lacewing_http_request_duration_seconds_bucket"),
        "latency histogram present: {metrics}"
    );
    assert!(
        metric_sum(
            &metrics,
            "lacewing_downstream_connections_total",
            &[("listener", "main")]
        )
        .is_some_and(|n| n >= 4.0),
        "downstream connections counted: {metrics}"
    );
}

#[tokio::test]
async fn ready_answers_200_while_serving() {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::simple_yaml(&[upstream.addr], "http1"));

    let ready = client::get(&format!("http://{}/ready", proxy::admin_addr(&handle))).await;

    assert_eq!(ready.status, StatusCode::OK);
    assert_eq!(ready.text().trim(), "ready");
}

#[tokio::test]
async fn config_dump_shows_the_live_listeners_and_clusters() {
    let upstream = servers::http_echo().await;
    let handle = proxy::start(&proxy::simple_yaml(&[upstream.addr], "http1"));

    let dump = client::get(&format!(
        "http://{}/config_dump",
        proxy::admin_addr(&handle)
    ))
    .await;

    assert_eq!(dump.status, StatusCode::OK);
    let config = dump.json();
    let listeners: Vec<&str> = config["listeners"]
        .as_array()
        .expect("listeners is a list")
        .iter()
        .filter_map(|l| l["name"].as_str())
        .collect();
    assert_eq!(listeners, ["main"]);
    assert_eq!(config["clusters"][0]["name"], "upstream");
    assert_eq!(
        config["clusters"][0]["endpoints"][0],
        upstream.addr.to_string()
    );
}
