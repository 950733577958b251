//! The whole mesh on loopback: a control plane, `lacewing proxy --control`
//! sidecars and echo apps. Traffic goes app → its sidecar's outbound
//! (`Host: orders`) → the orders sidecar's inbound → the orders app.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lacewing_tests::client::{Response, ReusingClient};
use lacewing_tests::eventually;
use lacewing_tests::servers;
use lacewing_tests::wasm::module;

use crate::mesh_support::*;

/// GET through `outbound` to the service `host`.
async fn call(client: &ReusingClient, outbound: SocketAddr, host: &str) -> Response {
    let request = Request::get(format!("http://{outbound}/"))
        .header("host", host)
        .header("x-request-id", "r-1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    client.request(request).await
}

/// The version markers a response carries: `x-response-chain` (conformance
/// module) and `x-echo-*` headers (header-echo module).
fn markers(response: &Response) -> Vec<String> {
    let mut found: Vec<String> = response
        .headers
        .get_all("x-response-chain")
        .iter()
        .map(|v| format!("chain:{}", v.to_str().unwrap_or("?")))
        .collect();
    found.extend(
        response
            .headers
            .keys()
            .filter(|k| k.as_str().starts_with("x-echo-"))
            .map(|k| k.as_str().to_string()),
    );
    found
}

/// Round `n`'s mesh: orders' plugin is the conformance module tagging `vN`
/// (even rounds) or header-echo copying `x-request-id` to `x-echo-vN` (odd),
/// and the orders route's timeout changes too.
fn round(n: usize, conformance: &Path, header_echo: &Path) -> (String, String) {
    let (module, configuration, marker) = if n.is_multiple_of(2) {
        (conformance, format!("tag=v{n}"), format!("chain:v{n}"))
    } else {
        (
            header_echo,
            format!("x-request-id=x-echo-v{n}"),
            format!("x-echo-v{n}"),
        )
    };
    let mesh = format!(
        "{}{}{}",
        service(
            "orders",
            &format!("  timeouts: {{request: {}ms}}\n", 5000 + n)
        ),
        service("web", ""),
        plugin("tagger", "orders", module.to_str().unwrap(), &configuration),
    );
    (mesh, marker)
}

/// Fields drop in order: sidecars first, the state directory last.
struct Mesh {
    orders: Process,
    web: Process,
    _orders_app: servers::TestServer,
    _web_app: servers::TestServer,
    plane: Plane,
    dir: tempfile::TempDir,
}

impl Mesh {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let plane = Plane::start(&dir.path().join("control")).await;
        let orders_app = servers::http_echo_named("orders").await;
        let web_app = servers::http_echo_named("web").await;
        let control = plane.addr.to_string();
        let state = dir.path().join("control");
        let orders = sidecar_process(
            &control,
            &state,
            "orders",
            orders_app.addr,
            &dir.path().join("orders"),
        );
        let web = sidecar_process(
            &control,
            &state,
            "web",
            web_app.addr,
            &dir.path().join("web"),
        );
        Self {
            dir,
            plane,
            _orders_app: orders_app,
            _web_app: web_app,
            orders,
            web,
        }
    }

    async fn apply_and_wait(&self, text: &str) -> u64 {
        apply_taken(&self.plane, self.dir.path(), text).await
    }

    async fn both_connected(&self) {
        until_connected(&self.plane.client().await, 2).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_routes_by_host_and_plugins_apply_to_the_selected_service() {
    let mesh = Mesh::start().await;
    mesh.both_connected().await;
    let client = ReusingClient::http1();
    let outbound = mesh.web.addr("outbound");
    // No mesh yet: the outbound listener has no routes.
    assert_eq!(call(&client, outbound, "orders").await.status, 404);
    let conformance = module("conformance-filter");
    let header_echo = module("header-echo");
    let (text, marker) = round(1, &conformance, &header_echo);
    // `billing` has neither sidecars nor static endpoints yet.
    mesh.apply_and_wait(&format!("{text}{}", service("billing", "")))
        .await;
    for host in ["orders", "orders:80", "orders.default"] {
        let response = call(&client, outbound, host).await;
        assert_eq!(response.status, 200, "{host}");
        assert_eq!(response.header("x-upstream"), Some("orders"), "{host}");
        assert_eq!(markers(&response), std::slice::from_ref(&marker), "{host}");
    }
    // web is not selected by the plugin: calls to web carry no marker.
    let response = call(&client, mesh.orders.addr("outbound"), "web").await;
    assert_eq!(response.header("x-upstream"), Some("web"));
    assert!(markers(&response).is_empty());
    // An unknown service is not routed; a known one with no endpoints is unavailable.
    assert_eq!(call(&client, outbound, "payments").await.status, 404);
    assert_eq!(call(&client, outbound, "billing").await.status, 503);
    // The sidecar exports the version it serves.
    let metrics = lacewing_tests::client::metrics(mesh.web.addr("admin")).await;
    assert!(
        lacewing_tests::client::metric_value(&metrics, "lacewing_sidecar_snapshot_version")
            .is_some_and(|v| v >= 1.0),
        "{metrics}"
    );
    assert!(
        lacewing_tests::client::metric_value(
            &metrics,
            "lacewing_sidecar_snapshot_last_update_seconds"
        )
        .is_some_and(|v| v > 0.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_traffic_split_weights_route_to_the_backends() {
    let mesh = Mesh::start().await;
    let v2_app = servers::http_echo_named("orders-v2").await;
    let v2 = sidecar_process(
        &mesh.plane.addr.to_string(),
        &mesh.dir.path().join("control"),
        "orders-v2",
        v2_app.addr,
        &mesh.dir.path().join("orders-v2"),
    );
    let split = |v1: u32, v2: u32| {
        format!(
            "{}{}{}apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {{name: orders}}\nspec:\n  service: orders\n  backends:\n  - {{service: orders, weight: {v1}}}\n  - {{service: orders-v2, weight: {v2}}}\n",
            service("orders", ""),
            service("orders-v2", ""),
            service("web", "")
        )
    };
    let client = ReusingClient::http1();
    let outbound = mesh.web.addr("outbound");
    let client_ref = &client;
    until_connected(&mesh.plane.client().await, 3).await;
    mesh.apply_and_wait(&split(0, 100)).await;
    for _ in 0..10 {
        assert_eq!(
            call(client_ref, outbound, "orders")
                .await
                .header("x-upstream"),
            Some("orders-v2")
        );
    }
    mesh.apply_and_wait(&split(100, 0)).await;
    for _ in 0..10 {
        assert_eq!(
            call(client_ref, outbound, "orders")
                .await
                .header("x-upstream"),
            Some("orders")
        );
    }
    drop(v2);
}

const LOAD_CLIENTS: usize = 4;
const CHANGE_EVERY: Duration = Duration::from_millis(200);
const CHANGES: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_config_and_module_changes_under_load_fail_no_request() {
    let mesh = Mesh::start().await;
    mesh.both_connected().await;
    let conformance = module("conformance-filter");
    let header_echo = module("header-echo");
    mesh.apply_and_wait(&round(0, &conformance, &header_echo).0)
        .await;
    let outbound = mesh.web.addr("outbound");

    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicUsize::new(0));
    let mut load = Vec::new();
    for _ in 0..LOAD_CLIENTS {
        let (stop, served) = (stop.clone(), served.clone());
        load.push(tokio::spawn(async move {
            let client = ReusingClient::http1();
            let mut seen = std::collections::BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let response = call(&client, outbound, "orders").await;
                assert_eq!(
                    response.status,
                    200,
                    "a request failed: {:?} {}",
                    response.headers,
                    response.text()
                );
                let found = markers(&response);
                assert_eq!(
                    found.len(),
                    1,
                    "a response of exactly one version: {found:?}"
                );
                seen.insert(found[0].clone());
                served.fetch_add(1, Ordering::Relaxed);
            }
            seen
        }));
    }
    let mut client = mesh.plane.client().await;
    let started = Instant::now();
    for n in 1..=CHANGES {
        let (text, _) = round(n, &conformance, &header_echo);
        apply(&mut client, mesh.dir.path(), "mesh.yaml", &text)
            .await
            .unwrap();
        tokio::time::sleep(CHANGE_EVERY).await;
    }
    let (_, last_marker) = round(CHANGES, &conformance, &header_echo);
    let last = &last_marker;
    eventually("the last version serves", || async {
        markers(&call(&ReusingClient::http1(), outbound, "orders").await) == [last.clone()]
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut versions = std::collections::BTreeSet::new();
    for task in load {
        versions.extend(task.await.expect("no request failed"));
    }
    eprintln!(
        "{} requests over {:?}, {} changes, {} versions seen",
        served.load(Ordering::Relaxed),
        started.elapsed(),
        CHANGES,
        versions.len()
    );
    assert!(
        versions.len() > 2,
        "responses came from several versions: {versions:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_modules_that_fail_are_nacked_and_the_previous_version_serves() {
    let mesh = Mesh::start().await;
    mesh.both_connected().await;
    let conformance = module("conformance-filter");
    let header_echo = module("header-echo");
    mesh.apply_and_wait(&round(0, &conformance, &header_echo).0)
        .await;
    let client = ReusingClient::http1();
    let outbound = mesh.web.addr("outbound");
    assert_eq!(
        markers(&call(&client, outbound, "orders").await),
        ["chain:v0"]
    );

    let not_wasm = write(mesh.dir.path(), "broken.wasm", "this is not a wasm module");
    let cases = [
        (
            plugin("tagger", "orders", not_wasm.to_str().unwrap(), "tag=x"),
            "tagger",
        ),
        // header-echo refuses a configuration without `=`: on_configure returns false.
        (
            plugin(
                "tagger",
                "orders",
                header_echo.to_str().unwrap(),
                "no-equals-sign",
            ),
            "tagger",
        ),
    ];
    let mut operator = mesh.plane.client().await;
    for (documents, plugin_name) in cases {
        let text = format!(
            "{}{}{}",
            service("orders", "  timeouts: {request: 5000ms}\n"),
            service("web", ""),
            documents
        );
        let applied = apply(&mut operator, mesh.dir.path(), "mesh.yaml", &text)
            .await
            .unwrap();
        let done = operator
            .wait(applied.version, Duration::from_secs(30), |_| {})
            .await
            .unwrap();
        assert_eq!(done.nacked.len(), 1, "orders NACKs: {done:?}");
        let reason = &done.nacked[0].nack_reason;
        assert!(
            reason.contains(plugin_name),
            "the reason names the plugin: {reason}"
        );
        assert_eq!(done.acked, 1, "web is not selected and takes the version");
        // Still the previous version on orders.
        assert_eq!(
            markers(&call(&client, outbound, "orders").await),
            ["chain:v0"]
        );
    }
    let status = operator.status().await.unwrap();
    let orders = status
        .sidecars
        .iter()
        .find(|s| s.service == "orders")
        .unwrap();
    assert!(orders.nacked_version > orders.acked_version);
    let metrics = mesh.plane.metrics().await;
    assert!(metrics.contains("result=\"nack\""), "{metrics}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_sidecars_serve_through_a_control_plane_sigkill_and_converge_after() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("control");
    let (mut control, addr) = control_process("127.0.0.1:0", &state);
    let orders_app = servers::http_echo_named("orders").await;
    let web_app = servers::http_echo_named("web").await;
    let orders = sidecar_process(
        &addr,
        &state,
        "orders",
        orders_app.addr,
        &dir.path().join("orders"),
    );
    let web = sidecar_process(&addr, &state, "web", web_app.addr, &dir.path().join("web"));
    let token = lacewing_control::token::read(&state.join("operator.token")).unwrap();
    let trust = trust(&state);
    let connect = || lacewing_control::client::Client::connect(&addr, &token, &trust);
    let conformance = module("conformance-filter");
    let header_echo = module("header-echo");
    let mut operator = connect().await.unwrap();
    until_connected(&operator, 2).await;
    let v = apply(
        &mut operator,
        dir.path(),
        "mesh.yaml",
        &round(0, &conformance, &header_echo).0,
    )
    .await
    .unwrap();
    operator
        .wait(v.version, Duration::from_secs(30), |_| {})
        .await
        .unwrap();

    let outbound = web.addr("outbound");
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let client = ReusingClient::http1();
            let mut served = 0;
            while !stop.load(Ordering::Relaxed) {
                let response = call(&client, outbound, "orders").await;
                assert_eq!(response.status, 200);
                assert_eq!(markers(&response), ["chain:v0"]);
                served += 1;
            }
            served
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    control.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let served = load
        .await
        .expect("every request during the outage succeeded");
    assert!(served > 0);

    let (_control, addr) = control_process(&addr, &state);
    let mut operator = lacewing_control::client::Client::connect(&addr, &token, &trust)
        .await
        .unwrap();
    until_connected(&operator, 2).await;
    let (text, marker) = round(1, &conformance, &header_echo);
    let v = apply(&mut operator, dir.path(), "mesh.yaml", &text)
        .await
        .unwrap();
    let done = operator
        .wait(v.version, Duration::from_secs(30), |_| {})
        .await
        .unwrap();
    assert_eq!(done.acked, 2, "{done:?}");
    assert_eq!(
        markers(&call(&ReusingClient::http1(), outbound, "orders").await),
        [marker]
    );
    drop((orders, web));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_sidecars_restarted_while_the_control_plane_is_down_serve_their_saved_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("control");
    let (mut control, addr) = control_process("127.0.0.1:0", &state);
    let orders_app = servers::http_echo_named("orders").await;
    let web_app = servers::http_echo_named("web").await;
    let orders_dir = dir.path().join("orders");
    let mut orders = sidecar_process(&addr, &state, "orders", orders_app.addr, &orders_dir);
    let mut web = sidecar_process(&addr, &state, "web", web_app.addr, &dir.path().join("web"));
    let token = lacewing_control::token::read(&state.join("operator.token")).unwrap();
    let mut operator = lacewing_control::client::Client::connect(&addr, &token, &trust(&state))
        .await
        .unwrap();
    until_connected(&operator, 2).await;
    let conformance = module("conformance-filter");
    let header_echo = module("header-echo");
    let (text, marker) = round(1, &conformance, &header_echo);
    let v = apply(&mut operator, dir.path(), "mesh.yaml", &text)
        .await
        .unwrap();
    operator
        .wait(v.version, Duration::from_secs(30), |_| {})
        .await
        .unwrap();

    control.kill();
    // Both sidecars restart with the control plane away: orders on the same
    // inbound address (its endpoint in web's saved snapshot), web anywhere.
    let inbound = orders.addr("inbound").to_string();
    orders.kill();
    web.kill();
    let _orders = sidecar_process_at(
        &addr,
        &state,
        "orders",
        orders_app.addr,
        &orders_dir,
        &inbound,
    );
    let web = sidecar_process(&addr, &state, "web", web_app.addr, &dir.path().join("web"));
    assert_eq!(
        web.words.last().map(String::as_str),
        Some(v.version.to_string().as_str()),
        "{:?}",
        web.words
    );
    let response = call(&ReusingClient::http1(), web.addr("outbound"), "orders").await;
    assert_eq!(response.status, 200);
    assert_eq!(response.header("x-upstream"), Some("orders"));
    assert_eq!(
        markers(&response),
        [marker],
        "the plugin runs from the module cached on disk"
    );
}

/// A sidecar asks only for the modules its cache lacks: restarted on its
/// state directory it fetches none again, and a module it never had is
/// fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_a_sidecar_fetches_only_the_modules_its_cache_lacks() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("control");
    let plane = Plane::start(&state).await;
    let control = plane.addr.to_string();
    let orders_app = servers::http_echo_named("orders").await;
    let orders_dir = dir.path().join("orders");
    let mut orders = sidecar_process(&control, &state, "orders", orders_app.addr, &orders_dir);
    let mut operator = plane.client().await;
    until_connected(&operator, 1).await;
    let conformance = module("conformance-filter");
    let header_echo = module("header-echo");
    let downloads = |metrics: String| {
        lacewing_tests::client::metric_value(&metrics, "lacewing_control_module_downloads_total")
    };
    let acked =
        |progress: lacewing_control_api::WaitProgress| progress.total == 1 && progress.acked == 1;

    let (text, _) = round(1, &conformance, &header_echo);
    let (_, progress) = apply_and_wait(&mut operator, dir.path(), "mesh.yaml", &text).await;
    assert!(acked(progress));
    // The plugin's module and the default telemetry filter's.
    assert_eq!(downloads(plane.metrics().await), Some(2.0));

    orders.kill();
    until_connected(&operator, 0).await;
    let _orders = sidecar_process(&control, &state, "orders", orders_app.addr, &orders_dir);
    until_connected(&operator, 1).await;
    // The same module under a new configuration: built from the cache.
    let (text, _) = round(3, &conformance, &header_echo);
    let (_, progress) = apply_and_wait(&mut operator, dir.path(), "mesh.yaml", &text).await;
    assert!(acked(progress));
    assert_eq!(
        downloads(plane.metrics().await),
        Some(2.0),
        "the restarted sidecar had the modules"
    );
    // A module it never had.
    let (text, _) = round(2, &conformance, &header_echo);
    let (_, progress) = apply_and_wait(&mut operator, dir.path(), "mesh.yaml", &text).await;
    assert!(acked(progress));
    assert_eq!(downloads(plane.metrics().await), Some(3.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_operator_commands_print_versions_acks_status_and_located_errors() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("control");
    let plane = Plane::start(&state).await;
    let app = servers::http_echo_named("orders").await;
    let _orders = sidecar_process(
        &plane.addr.to_string(),
        &state,
        "orders",
        app.addr,
        &dir.path().join("orders"),
    );
    until_connected(&plane.client().await, 1).await;
    let control = plane.addr.to_string();
    let token = state.join("operator.token");
    let flags = [
        "--control",
        control.as_str(),
        "--token-file",
        token.to_str().unwrap(),
    ];
    let file = write(dir.path(), "mesh.yaml", &service("orders", ""));
    let run = |command: &[&str]| {
        let mut args: Vec<&str> = command.to_vec();
        args.extend(flags);
        lacewing(&args)
    };

    let (ok, out, err) = run(&["apply", "-f", file.to_str().unwrap(), "--wait"]);
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("applied: version 1 (1 changed, 0 unchanged)"),
        "{out}"
    );
    assert!(out.contains("version 1: 1/1 sidecars ACKed"), "{out}");

    let (ok, out, _) = run(&["status"]);
    assert!(ok);
    let line = out
        .lines()
        .find(|l| l.contains("default/orders"))
        .expect("orders in status");
    assert!(
        line.contains("connected") && line.contains("ACK v1"),
        "{out}"
    );
    // Its workload certificate, issued for 24 hours.
    assert!(line.contains("in 23h"), "{out}");

    let (ok, out, _) = run(&["get", "service", "orders"]);
    assert!(ok);
    assert!(
        out.contains("kind: Service") && out.contains("name: orders"),
        "{out}"
    );

    let bad = write(
        dir.path(),
        "bad.yaml",
        &service("orders", "  protocol: quic\n"),
    );
    let (ok, _, err) = run(&["apply", "-f", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        err.contains("bad.yaml:6:") && err.contains("spec.protocol"),
        "{err}"
    );

    let (ok, out, err) = run(&["delete", "-f", file.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(out.contains("deleted: version 2"), "{out}");
    plane.stop().await;
}

/// A sidecar on its first start holds its app back until a snapshot comes:
/// while its way to the control plane is held shut, its inbound answers 503
/// and the app sees nothing; once it opens (nothing applied: an empty
/// snapshot), the inbound reaches the app.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_sidecar_keeps_its_app_unreachable_until_its_first_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("control");
    let (_control, control_addr) = control_process("127.0.0.1:0", &state);
    let control: SocketAddr = control_addr.parse().unwrap();
    // A relay that holds every connection until the gate opens.
    let relay = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap().to_string();
    let (gate, gate_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        while let Ok((mut from_sidecar, _)) = relay.accept().await {
            let mut gate = gate_rx.clone();
            tokio::spawn(async move {
                if gate.wait_for(|open| *open).await.is_ok()
                    && let Ok(mut to_control) = tokio::net::TcpStream::connect(control).await
                {
                    let _ = tokio::io::copy_bidirectional(&mut from_sidecar, &mut to_control).await;
                }
            });
        }
    });
    let app = servers::http_echo_named("orders").await;
    let orders = sidecar_process(
        &relay_addr,
        &state,
        "orders",
        app.addr,
        &dir.path().join("orders"),
    );
    assert_eq!(
        orders.words.last().map(String::as_str),
        Some("0"),
        "{:?}",
        orders.words
    );
    let client = ReusingClient::http1();
    let refused = call(&client, orders.addr("inbound"), "orders").await;
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(app.requests(), 0, "nothing reached the app");

    gate.send(true).unwrap();
    // Within the sidecar's reconnect backoff (its cap is 5 s) and a margin.
    lacewing_tests::eventually_with(
        "the inbound reaches the app after the first snapshot",
        600,
        Duration::from_millis(100),
        || {
            let client = client.clone();
            let inbound = orders.addr("inbound");
            async move { call(&client, inbound, "orders").await.status == 200 }
        },
    )
    .await;
    assert!(app.requests() >= 1);
}
