//! The control plane on its own and with sidecar agents whose publish only
//! records: apply refusals located in the file, tokens, the store across
//! restarts and SIGKILL, snapshots with modules, ACK/NACK, reconnection.

use lacewing_control::client::ClientError;
use lacewing_control_api as api;
use lacewing_tests::eventually;
use tonic::Code;

use crate::mesh_support::*;

fn refused(result: Result<lacewing_control::client::Applied, ClientError>) -> String {
    match result {
        Ok(applied) => panic!("apply was accepted: version {}", applied.version),
        Err(e) => e.to_string(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_apply_refusals_name_file_line_and_field_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(&dir.path().join("state")).await;
    let mut client = plane.client().await;
    let good = service("orders", "");
    let applied = apply(&mut client, dir.path(), "good.yaml", &good)
        .await
        .unwrap();
    assert_eq!(applied.version, 1);

    let invalid_yaml = format!(
        "{good}apiVersion: lacewing.dev/v1alpha1\nkind: Service\nmetadata: {{name: web\nspec: {{port: 80}}\n"
    );
    let text = refused(apply(&mut client, dir.path(), "bad.yaml", &invalid_yaml).await);
    assert!(
        text.starts_with("bad.yaml:") || text.contains("/bad.yaml:"),
        "{text}"
    );
    assert!(text.contains("document 2"), "{text}");

    let unknown_kind =
        "apiVersion: lacewing.dev/v1alpha1\nkind: Gateway\nmetadata: {name: g}\nspec: {}\n";
    let text = refused(apply(&mut client, dir.path(), "kind.yaml", unknown_kind).await);
    assert!(text.contains("kind.yaml:2:"), "{text}");
    assert!(text.contains("kind: unknown kind `Gateway`"), "{text}");

    let unknown_service = "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: s}\nspec:\n  service: orders\n  backends:\n  - {service: orders, weight: 1}\n  - {service: payments, weight: 1}\n";
    let text = refused(apply(&mut client, dir.path(), "split.yaml", unknown_service).await);
    assert!(text.contains("split.yaml:8:"), "{text}");
    assert!(
        text.contains("spec.backends[1].service: no Service `payments`"),
        "{text}"
    );

    let unknown_module = plugin("p", "orders", &format!("sha256:{}", "ab".repeat(32)), "x");
    let text = refused(apply(&mut client, dir.path(), "module.yaml", &unknown_module).await);
    assert!(
        text.contains("spec.module: no module with sha256"),
        "{text}"
    );

    write(dir.path(), "filter.wasm", "\0asm not really");
    let pinned = format!(
        "{}  sha256: {}\n",
        plugin("p", "orders", "filter.wasm", "x").trim_end_matches("---\n"),
        "cd".repeat(32)
    );
    let text = refused(apply(&mut client, dir.path(), "pin.yaml", &pinned).await);
    assert!(text.contains("pin.yaml:"), "{text}");
    assert!(text.contains("spec.sha256: sha256 mismatch"), "{text}");

    let (version, docs) = client.get(None, None, None).await.unwrap();
    assert_eq!(version, 1, "refused applies store nothing");
    assert_eq!(docs.len(), 1);
    let metrics = plane.metrics().await;
    assert!(
        metrics.contains("lacewing_control_applies_total{result=\"refused\"} 2"),
        "{metrics}"
    );
    plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_bad_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(&dir.path().join("state")).await;
    for token in [plane.bootstrap_token(), "guess".to_string()] {
        let mut client = lacewing_control::client::Client::connect(
            &plane.addr.to_string(),
            &token,
            &plane.trust(),
        )
        .await
        .unwrap();
        match client.status().await {
            Err(ClientError::Status(status)) => assert_eq!(status.code(), Code::Unauthenticated),
            other => panic!("operator call with a wrong token: {other:?}"),
        }
    }
    // A sidecar holding the operator token, not the bootstrap one.
    let channel = plane.channel().await;
    let mut discovery = api::discovery_client::DiscoveryClient::new(channel);
    let mut request = tonic::Request::new(tokio_stream::iter(vec![api::SidecarMessage {
        message: Some(api::sidecar_message::Message::Hello(api::Hello {
            node_id: "n".into(),
            service: "web".into(),
            namespace: "default".into(),
            inbound: "127.0.0.1:1".into(),
            ..Default::default()
        })),
    }]));
    lacewing_control::token::authorize(&mut request, &plane.operator_token()).unwrap();
    let status = discovery.stream(request).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_store_keeps_documents_and_versions_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let plane = Plane::start(&state).await;
    let token = plane.operator_token();
    let mut client = plane.client().await;
    apply(&mut client, dir.path(), "a.yaml", &service("orders", ""))
        .await
        .unwrap();
    let v2 = apply(&mut client, dir.path(), "b.yaml", &service("web", ""))
        .await
        .unwrap();
    assert_eq!(v2.version, 2);
    plane.stop().await;

    let plane = Plane::start(&state).await;
    assert_eq!(plane.operator_token(), token, "tokens are kept");
    let mut client = plane.client().await;
    let (version, docs) = client.get(Some("Service"), None, None).await.unwrap();
    assert_eq!(version, 2);
    let names: Vec<_> = docs.iter().map(|(d, _)| d.name().to_string()).collect();
    assert_eq!(names, ["orders", "web"]);
    let unchanged = apply(&mut client, dir.path(), "b.yaml", &service("web", ""))
        .await
        .unwrap();
    assert_eq!(
        unchanged.version, 2,
        "an apply that changes nothing keeps the version"
    );
    let v3 = apply(
        &mut client,
        dir.path(),
        "c.yaml",
        &service("web", "  protocol: h2\n"),
    )
    .await
    .unwrap();
    assert_eq!(v3.version, 3);
    plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_sidecars_get_snapshots_with_modules_and_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(&dir.path().join("state")).await;
    let mut client = plane.client().await;
    let module = b"\0asm\x01\0\0\0 any bytes: the agent checks the digest, the proxy compiles";
    std::fs::write(dir.path().join("filter.wasm"), module).unwrap();
    let mesh = format!(
        "{}{}{}",
        service("orders", "  endpoints: ['10.1.1.1:80']\n"),
        service("web", ""),
        plugin("tag", "orders", "filter.wasm", "x-tag=x-seen")
    );
    let applied = apply(&mut client, dir.path(), "mesh.yaml", &mesh)
        .await
        .unwrap();
    assert_eq!(applied.uploaded.len(), 1);

    let orders = RecordingSidecar::start(&plane, spec("orders", 20001), &dir.path().join("orders"));
    let web = RecordingSidecar::start(&plane, spec("web", 20011), &dir.path().join("web"));
    until_acked(&client, "orders-20001", applied.version).await;
    until_acked(&client, "web-20011", applied.version).await;

    let config = orders.published.last().expect("orders got a configuration");
    let tag = config
        .plugins
        .iter()
        .find(|p| p.name == "default.tag")
        .expect("orders runs the plugin");
    let stored = std::fs::read(&tag.module).unwrap();
    assert_eq!(
        stored, module,
        "the module reached the sidecar's cache intact"
    );
    assert_eq!(
        config.listeners[0].filters,
        ["default.lacewing-telemetry-inbound", "default.tag"],
        "inbound runs the default telemetry (phase stats), then the plugin"
    );
    assert!(
        web.published
            .last()
            .is_none_or(|c| c.plugins.iter().all(|p| p.name != "default.tag")),
        "web is not selected"
    );

    // web's outbound reaches orders at its sidecar's inbound plus the static endpoint.
    eventually("web routes to both orders endpoints", || {
        let web = &web;
        async move {
            web.published.last().is_some_and(|c| {
                c.cluster("svc.default.orders")
                    .is_some_and(|cl| cl.endpoints == ["10.1.1.1:80", "127.0.0.1:20001"])
            })
        }
    })
    .await;

    let metrics = plane.metrics().await;
    assert!(
        metrics.contains("lacewing_control_sidecars_connected 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lacewing_control_answers_total{code=\"\",result=\"ack\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("lacewing_control_push_latency_seconds_count"),
        "{metrics}"
    );
    drop((orders, web));
    plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_a_refused_snapshot_is_nacked_with_its_reason_and_wait_reports_it() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(&dir.path().join("state")).await;
    let mut client = plane.client().await;
    let v1 = apply(&mut client, dir.path(), "a.yaml", &service("orders", ""))
        .await
        .unwrap();
    let orders = RecordingSidecar::start(&plane, spec("orders", 20101), &dir.path().join("orders"));
    until_acked(&client, "orders-20101", v1.version).await;
    let served = orders.published.last().unwrap();

    orders
        .published
        .refuse_with(Some("plugin tag: on_configure returned false"));
    let (_, done) = apply_and_wait(
        &mut client,
        dir.path(),
        "b.yaml",
        &service("orders", "  protocol: h2\n"),
    )
    .await;
    assert_eq!(done.acked, 0);
    assert_eq!(done.nacked.len(), 1);
    assert_eq!(
        done.nacked[0].nack_reason,
        "plugin tag: on_configure returned false"
    );
    assert_eq!(
        done.nacked[0].acked_version, v1.version,
        "the previous version stays"
    );
    assert_eq!(orders.published.last().unwrap(), served);
    let metrics = plane.metrics().await;
    assert!(
        metrics.contains("lacewing_control_answers_total{code=\"publish\",result=\"nack\"} 1"),
        "{metrics}"
    );
    plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_sidecars_reconnect_and_restart_from_their_saved_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let plane = Plane::start(&state).await;
    let addr = plane.addr;
    let mut client = plane.client().await;
    std::fs::write(dir.path().join("f.wasm"), b"module bytes").unwrap();
    let mesh = format!(
        "{}{}",
        service("orders", ""),
        plugin("tag", "orders", "f.wasm", "c")
    );
    let v1 = apply(&mut client, dir.path(), "a.yaml", &mesh)
        .await
        .unwrap();
    let sidecar_dir = dir.path().join("orders");
    let orders = RecordingSidecar::start(&plane, spec("orders", 20201), &sidecar_dir);
    until_acked(&client, "orders-20201", v1.version).await;
    plane.stop().await;

    // The control plane is away: a restarted sidecar starts from disk.
    let options = lacewing_control_agent::AgentOptions {
        control: addr.to_string(),
        token: "unused".into(),
        trust: trust(&state),
        spec: orders.spec.clone(),
        state_dir: sidecar_dir.clone(),
        identity: lacewing_tls::LiveIdentity::new(),
    };
    let (config, version) = lacewing_control_agent::Agent::initial_config(&options).unwrap();
    assert_eq!(version, v1.version);
    assert_eq!(config, orders.published.last().unwrap());

    // It comes back on the same address: the sidecar reconnects and takes the next version.
    let plane = Plane::start_at(addr, &state).await;
    let mut client = plane.client().await;
    until_acked(&client, "orders-20201", 0).await;
    let (_, done) = apply_and_wait(
        &mut client,
        dir.path(),
        "b.yaml",
        &service("orders", "  protocol: h2\n"),
    )
    .await;
    assert_eq!(done.acked, 1);
    drop(orders);
    plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_delete_refuses_to_break_references_and_removes_atomically() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(&dir.path().join("state")).await;
    let mut client = plane.client().await;
    let split = "apiVersion: split.smi-spec.io/v1alpha4\nkind: TrafficSplit\nmetadata: {name: s}\nspec:\n  service: orders\n  backends:\n  - {service: orders, weight: 1}\n";
    let mesh = format!("{}{}", service("orders", ""), split);
    let v1 = apply(&mut client, dir.path(), "mesh.yaml", &mesh)
        .await
        .unwrap();

    let only_service = write(dir.path(), "service.yaml", &service("orders", ""));
    let docs = lacewing_mesh::parse_file(&only_service).unwrap();
    let text = refused(client.delete(&docs).await);
    assert!(text.contains("spec.service: no Service `orders`"), "{text}");
    assert_eq!(client.get(None, None, None).await.unwrap().0, v1.version);

    let both = lacewing_mesh::parse_file(&dir.path().join("mesh.yaml")).unwrap();
    let deleted = client.delete(&both).await.unwrap();
    assert_eq!(deleted.version, v1.version + 1);
    assert!(client.get(None, None, None).await.unwrap().1.is_empty());
    plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_an_upload_whose_bytes_do_not_match_its_sha256_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let plane = Plane::start(&dir.path().join("state")).await;
    let channel = plane.channel().await;
    let mut operator = api::operator_client::OperatorClient::new(channel);
    let claimed = "ab".repeat(32);
    let chunks = vec![api::ModuleChunk {
        sha256: claimed.clone(),
        data: b"these bytes hash to something else".to_vec(),
    }];
    let mut request = tonic::Request::new(tokio_stream::iter(chunks));
    lacewing_control::token::authorize(&mut request, &plane.operator_token()).unwrap();
    let status = operator.upload_module(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("sha256 mismatch"),
        "{}",
        status.message()
    );
    let mut request = tonic::Request::new(api::MissingModulesRequest {
        sha256: vec![claimed.clone()],
    });
    lacewing_control::token::authorize(&mut request, &plane.operator_token()).unwrap();
    let missing = operator
        .missing_modules(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(missing.sha256, [claimed], "nothing was stored");
    plane.stop().await;
}
