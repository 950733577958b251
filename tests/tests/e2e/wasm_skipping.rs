//! Callbacks an SDK filter leaves to their defaults are declared unused and
//! skipped by the host for each plugin that runs the module, including two
//! plugins that share one VM by `vm_id`.

use http::StatusCode;
use lacewing_tests::wasm::{self, EchoProxy, PluginRoutes, yaml_path};
use lacewing_tests::{client, proxy};

/// How many times `plugin`'s `callback` ran, from the proxy's /metrics.
fn callback_calls(metrics: &str, plugin: &str, callback: &str) -> u64 {
    let labels = [
        format!("plugin=\"{plugin}\""),
        format!("callback=\"{callback}\""),
    ];
    metrics
        .lines()
        .find(|l| {
            l.starts_with("lacewing_wasm_callbacks_total{")
                && labels.iter().all(|label| l.contains(label.as_str()))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn two_plugins_sharing_a_vm_each_skip_the_callbacks_their_filter_leaves_unused() {
    // hello-sdk implements only `on_response_headers`.
    let fixture = EchoProxy::start(
        PluginRoutes {
            listener_fields: "",
            routes: &["{ name: all, cluster: echo, filters: [first, second] }"],
            clusters: &[],
            plugins: &[
                "{ name: first, module: {module}, vm_id: shared }",
                "{ name: second, module: {module}, vm_id: shared }",
            ],
        },
        &[("module", &yaml_path(&wasm::module("hello-sdk")))],
    )
    .await;
    for _ in 0..4 {
        let response = fixture.get("/", &[]).await;
        assert_eq!(response.status, StatusCode::OK);
        assert_eq!(response.header("x-hello"), Some("hello, anonymous"));
    }
    let metrics = client::metrics(proxy::admin_addr(&fixture.proxy)).await;
    for plugin in ["first", "second"] {
        assert_eq!(
            callback_calls(&metrics, plugin, "proxy_on_response_headers"),
            4,
            "{plugin}"
        );
        // Each default ran once, on the plugin's first stream, and told the host.
        for unused in ["proxy_on_request_headers", "proxy_on_log"] {
            assert_eq!(
                callback_calls(&metrics, plugin, unused),
                1,
                "{plugin} {unused}"
            );
        }
        assert_eq!(
            callback_calls(&metrics, plugin, "proxy_on_done"),
            0,
            "{plugin}"
        );
    }
}
