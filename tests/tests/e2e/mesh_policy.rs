//! SMI policy and the first-party filters in the mesh: `examples/mesh.yaml`
//! applied to frontend, orders and payments sidecars (`lacewing proxy
//! --control` processes) in front of echo apps. The control plane turns the
//! TrafficTargets into the `authz` filter's configuration, runs `telemetry`
//! on every sidecar, and ships both (and `headers`) as `builtin:` modules.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lacewing_tests::client::{Response, ReusingClient};

use crate::mesh_support::*;

const FRONTEND_ID: &str = "spiffe://lacewing.local/ns/default/sa/frontend";
const ORDERS_ID: &str = "spiffe://lacewing.local/ns/default/sa/orders";

fn example_mesh() -> String {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/mesh.yaml");
    std::fs::read_to_string(path).expect("examples/mesh.yaml")
}

/// The sum of the plugin counters of `plugin` whose name starts with `prefix`.
fn plugin_counter(metrics: &str, plugin: &str, prefix: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("lacewing_wasm_plugin_counter{"))
        .filter(|l| l.contains(&format!("plugin=\"{plugin}\"")))
        .filter(|l| l.contains(&format!("name=\"{prefix}")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_policy_targets_allow_and_deny_by_identity_and_route_and_reload_under_load() {
    let mesh = SidecarMesh::start(&["frontend", "orders", "payments"]).await;
    let example = example_mesh();
    mesh.apply_ok(&example).await;
    let client = ReusingClient::http1();

    // Allowed: frontend may GET /api/* on orders, over mTLS.
    let ok = mesh
        .call(&client, "frontend", "orders", "GET", "/api/orders/42")
        .await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.header("x-upstream"), Some("orders"));
    assert_eq!(ok.header("x-peer-identity"), Some(FRONTEND_ID));
    // telemetry on both sidecars: the app gets a W3C traceparent.
    let seen = ok.json();
    let traceparent = seen["headers"]["traceparent"].as_str().unwrap_or("");
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert!(
        parts.len() == 4 && parts[0] == "00" && parts[1].len() == 32 && parts[2].len() == 16,
        "traceparent {traceparent:?} in {seen}"
    );

    // Denied: the wrong route, the wrong caller.
    for (from, to, method, path) in [
        ("frontend", "orders", "POST", "/api/orders"),
        ("payments", "orders", "GET", "/api/orders/42"),
        ("frontend", "payments", "POST", "/charge"),
    ] {
        let denied = mesh.call(&client, from, to, method, path).await;
        assert_eq!(denied.status, 403, "{from} -> {to} {method} {path}");
        assert_eq!(denied.header("x-lacewing-authz"), Some("denied"));
    }
    // orders may charge payments (a rule without `matches` selects the whole group).
    let charged = mesh
        .call(&client, "orders", "payments", "POST", "/charge")
        .await;
    assert_eq!(charged.status, 200, "{}", charged.text());
    assert_eq!(charged.header("x-peer-identity"), Some(ORDERS_ID));

    // Counted on orders' sidecar: authz decisions, telemetry by source.
    let metrics = mesh.metrics("orders").await;
    assert!(
        plugin_counter(&metrics, "default.lacewing-authz", "authz_allowed.source.") >= 1.0,
        "{metrics}"
    );
    assert!(
        plugin_counter(&metrics, "default.lacewing-authz", "authz_denied.source.") >= 2.0,
        "{metrics}"
    );
    assert!(
        plugin_counter(
            &metrics,
            "default.lacewing-telemetry-inbound",
            &format!("telemetry_requests.source.{FRONTEND_ID}.destination.orders")
        ) >= 2.0,
        "{metrics}"
    );

    // A policy change under load: frontend may now also create orders.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok_count, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let outbound = mesh.sidecar("frontend").addr("outbound");
    let mut load = Vec::new();
    for _ in 0..4 {
        let (stop, ok_count, failed) = (stop.clone(), ok_count.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            let client = ReusingClient::http1();
            while !stop.load(Ordering::Relaxed) {
                let request = Request::get(format!("http://{outbound}/api/orders/7"))
                    .header("host", "orders")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                if client.request(request).await.status == 200 {
                    ok_count.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let changed = example.replacen("matches: [read]\n", "matches: [read, write]\n", 1);
    assert_ne!(changed, example);
    mesh.apply_ok(&changed).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    for task in load {
        task.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed");
    assert!(ok_count.load(Ordering::Relaxed) > 0);
    let created = mesh
        .call(&client, "frontend", "orders", "POST", "/api/orders")
        .await;
    assert_eq!(created.status, 200, "{}", created.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_policy_bad_documents_are_refused_and_bad_plugin_configurations_nacked() {
    let mesh = SidecarMesh::start(&["frontend", "orders"]).await;
    let base = format!("{}{}", service("frontend", ""), service("orders", ""));
    let version = mesh.apply_ok(&base).await;
    let client = ReusingClient::http1();
    let works = |response: Response| {
        assert_eq!(response.status, 200, "{}", response.text());
        response
    };
    works(mesh.call(&client, "frontend", "orders", "GET", "/").await);

    // Refused by apply, with the document and field: nothing changes.
    let refused = [
        (
            "apiVersion: specs.smi-spec.io/v1alpha4\nkind: HTTPRouteGroup\nmetadata: {name: g}\nspec:\n  matches:\n  - {name: m, pathRegex: '/api/(unclosed'}\n",
            "spec.matches[0].pathRegex",
            "invalid regex",
        ),
        (
            "kind: TrafficTarget\napiVersion: access.smi-spec.io/v1alpha3\nmetadata: {name: t}\nspec:\n  destination: {kind: ServiceAccount, name: orders}\n  sources: [{kind: ServiceAccount, name: nobody}]\n",
            "spec.sources[0].name",
            "no Service `nobody`",
        ),
        (
            "apiVersion: lacewing.dev/v1alpha1\nkind: WasmPlugin\nmetadata: {name: p}\nspec: {module: 'builtin:nope'}\n",
            "spec.module",
            "no first-party filter `nope`",
        ),
    ];
    let mut operator = mesh.plane.client().await;
    for (doc, field, reason) in refused {
        let text = format!("{base}{doc}");
        let err = apply(&mut operator, mesh.dir.path(), "bad.yaml", &text)
            .await
            .expect_err("refused")
            .to_string();
        assert!(err.contains(field) && err.contains(reason), "{err}");
    }

    // A first-party plugin whose configuration the filter refuses: the
    // sidecar NACKs with the filter's own message, the old version serves.
    let bad_config = format!(
        "{base}apiVersion: lacewing.dev/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: tag}}\nspec:\n  module: builtin:headers\n  selector: {{service: orders}}\n  configuration: {{request: {{sett: {{x-a: b}}}}}}\n"
    );
    let (_, done) = apply_and_wait(&mut operator, mesh.dir.path(), "mesh.yaml", &bad_config).await;
    assert_eq!(done.nacked.len(), 1, "{done:?}");
    let reason = &done.nacked[0].nack_reason;
    assert!(
        reason.contains("on_configure returned false") && reason.contains("sett"),
        "{reason}"
    );
    let status = operator.status().await.unwrap();
    let orders = status
        .sidecars
        .iter()
        .find(|s| s.service == "orders")
        .expect("orders' sidecar");
    assert_eq!(orders.acked_version, version, "{orders:?}");
    works(mesh.call(&client, "frontend", "orders", "GET", "/").await);

    // Telemetry is on by default and a MeshConfig turns it off.
    let traced = works(mesh.call(&client, "frontend", "orders", "GET", "/").await);
    assert!(traced.json()["headers"]["traceparent"].is_string());
    // (The plugin fixed in the same apply.)
    let fixed = bad_config.replace("sett:", "set:");
    mesh.apply_ok(&format!(
        "{fixed}---\napiVersion: lacewing.dev/v1alpha1\nkind: MeshConfig\nmetadata: {{name: mesh}}\nspec: {{telemetry: {{enabled: false}}}}\n"
    ))
    .await;
    let untraced = works(mesh.call(&client, "frontend", "orders", "GET", "/").await);
    assert!(
        untraced.json()["headers"]["traceparent"].is_null(),
        "{}",
        untraced.text()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_policy_seal_and_ratelimit_run_as_first_party_plugins() {
    let mesh = SidecarMesh::start(&["frontend", "orders", "payments"]).await;
    let key = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
    let keys = format!("keys: [{{id: k1, key: '{key}'}}]\n    active_key: k1\n");
    let text = format!(
        "{}{}{}\
apiVersion: lacewing.dev/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: seal-out}}\nspec:\n  module: builtin:seal\n  selector: {{service: frontend}}\n  direction: outbound\n  configuration:\n    {keys}    request: {{mode: seal, headers: [x-card]}}\n---\n\
apiVersion: lacewing.dev/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: seal-in}}\nspec:\n  module: builtin:seal\n  selector: {{service: orders}}\n  configuration:\n    {keys}    request: {{mode: open, headers: [x-card], require_sealed: true}}\n---\n\
apiVersion: lacewing.dev/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: limit}}\nspec:\n  module: builtin:ratelimit\n  selector: {{service: payments}}\n  configuration: {{key: principal, capacity: 2, refill_tokens: 1, interval_seconds: 3600}}\n",
        service("frontend", ""),
        service("orders", ""),
        service("payments", ""),
    );
    mesh.apply_ok(&text).await;
    let client = ReusingClient::http1();
    let with_card = |from: &str| {
        let outbound = mesh.sidecar(from).addr("outbound");
        Request::get(format!("http://{outbound}/card"))
            .header("host", "orders")
            .header("x-card", "4111-1111")
            .body(Full::new(Bytes::new()))
            .unwrap()
    };

    // frontend's sidecar seals the header; orders' sidecar opens it for the app.
    let opened = client.request(with_card("frontend")).await;
    assert_eq!(opened.status, 200, "{}", opened.text());
    assert_eq!(opened.json()["headers"]["x-card"], "4111-1111");
    // payments' sidecar does not seal: orders refuses the plaintext value.
    let refused = client.request(with_card("payments")).await;
    assert_eq!(refused.status, 400, "{}", refused.text());
    assert_eq!(refused.header("x-lacewing-seal"), Some("refused"));

    // Two calls per caller identity, then 429 with Retry-After.
    for _ in 0..2 {
        let ok = mesh.call(&client, "frontend", "payments", "GET", "/").await;
        assert_eq!(ok.status, 200, "{}", ok.text());
    }
    let limited = mesh.call(&client, "frontend", "payments", "GET", "/").await;
    assert_eq!(limited.status, 429, "{}", limited.text());
    let retry: u64 = limited
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=3600).contains(&retry), "{retry}");
    // Another identity has its own bucket.
    let other = mesh.call(&client, "orders", "payments", "GET", "/").await;
    assert_eq!(other.status, 200, "{}", other.text());
}
