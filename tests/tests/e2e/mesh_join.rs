//! Sidecars joining the mesh with one-time join tokens: a token made by
//! `lacewing token create` admits one sidecar of its service once; a replay,
//! another service, an expired token and (when turned off) the shared
//! bootstrap token are refused and counted; a joined sidecar comes back
//! after a control-plane restart with its workload certificate, and a
//! certificate registers only the service it names.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lacewing_control_api as api;
use lacewing_tests::client::{ReusingClient, metric_sum};
use lacewing_tests::servers;
use tonic::Code;

use crate::mesh_operator_tls::Control;
use crate::mesh_support::*;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `lacewing token create --service SERVICE --out OUT` against `control`:
/// whether it succeeded, and what it printed.
fn create_token(control: &Control, service: &str, out: &Path) -> (bool, String) {
    let token_file = control.state.join("operator.token");
    let (ok, stdout, stderr) = lacewing(&[
        "token",
        "create",
        "--service",
        service,
        "--out",
        path(out),
        "--control",
        &control.addr,
        "--token-file",
        path(&token_file),
    ]);
    (ok, format!("{stdout}{stderr}"))
}

/// `lacewing_control_token_refusals_total{role, reason}` of `control`.
async fn refusals(control: &Control, role: &str, reason: &str) -> f64 {
    let text = control_metrics(&control.addr, &trust(&control.state)).await;
    metric_sum(
        &text,
        "lacewing_control_token_refusals_total",
        &[("role", role), ("reason", reason)],
    )
    .unwrap_or(0.0)
}

/// GET `http://{to}/` through `outbound` (a sidecar's outbound listener).
async fn call(client: &ReusingClient, outbound: std::net::SocketAddr, to: &str) -> (u16, String) {
    let request = http::Request::get(format!("http://{outbound}/"))
        .header("host", to)
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let response = client.request(request).await;
    (
        response.status.as_u16(),
        response
            .header("x-upstream")
            .unwrap_or_default()
            .to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_join_tokens_admit_one_sidecar_of_their_service_once() {
    // Without the shared bootstrap token: only join tokens admit sidecars.
    let control = Control::start(&["--no-shared-bootstrap"]);
    let dir = control.dir.path();
    let orders_app = servers::http_echo_named("orders").await;
    let frontend_app = servers::http_echo_named("frontend").await;

    // Each sidecar's token in its own directory, with the CA beside it.
    let tokens = dir.join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    let orders_token = tokens.join("orders.token");
    let (ok, out) = create_token(&control, "orders", &orders_token);
    assert!(ok, "{out}");
    assert!(
        out.contains("join token for spiffe://lacewing.local/ns/default/sa/orders written to"),
        "{out}"
    );
    let token = std::fs::read_to_string(&orders_token).unwrap();
    assert!(token.starts_with(api::JOIN_TOKEN_PREFIX), "{token}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&orders_token)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(tokens.join("ca.pem").exists());
    // A second token never overwrites a file.
    let (ok, out) = create_token(&control, "orders", &orders_token);
    assert!(!ok && out.contains("exists"), "{out}");
    let frontend_token = tokens.join("frontend.token");
    assert!(create_token(&control, "frontend", &frontend_token).0);

    let join = |token: &Path, service: &str, app, state: &str| {
        sidecar_process_with(&control.addr, token, service, app, &dir.join(state), &[])
    };
    let orders = join(&orders_token, "orders", orders_app.addr, "orders");
    let frontend = join(&frontend_token, "frontend", frontend_app.addr, "frontend");
    lacewing_tests::eventually("both sidecars are connected", || async {
        control
            .operator("status", &[])
            .1
            .matches(" connected ")
            .count()
            == 2
    })
    .await;

    // STRICT: orders serves only callers with a mesh certificate.
    let mesh = write(
        dir,
        "mesh.yaml",
        &format!(
            "{}{}apiVersion: lacewing.dev/v1alpha1\nkind: MeshTLS\nmetadata: {{name: orders}}\nspec: {{destination: orders, mode: STRICT}}\n",
            service("orders", ""),
            service("frontend", "")
        ),
    );
    let (ok, out, err) = control.operator("apply", &["-f", path(&mesh), "--wait"]);
    assert!(ok && out.contains("2/2 sidecars ACKed"), "{out}{err}");
    let (ok, out, _) = control.operator("status", &[]);
    assert!(
        ok && out.matches(" in 23h").count() == 2,
        "certificates: {out}"
    );
    let client = ReusingClient::http1();
    let (status, upstream) = call(&client, frontend.addr("outbound"), "orders").await;
    assert_eq!((status, upstream.as_str()), (200, "orders"));
    let orders_metrics = lacewing_tests::client::metrics(orders.addr("admin")).await;
    let mtls = metric_sum(
        &orders_metrics,
        "lacewing_downstream_tls_handshakes_total",
        &[("listener", "inbound"), ("outcome", "ok")],
    );
    assert!(mtls.unwrap_or(0.0) >= 1.0, "{orders_metrics}");

    // The same token again, from another sidecar of orders: a replay.
    let replay = join(&orders_token, "orders", orders_app.addr, "replay");
    control
        .until_counted(
            "lacewing_control_token_refusals_total",
            &[("role", "join"), ("reason", "replayed")],
            1.0,
        )
        .await;
    drop(replay);

    // A token for orders, used by a sidecar that says it is payments.
    let second = tokens.join("orders-2.token");
    assert!(create_token(&control, "orders", &second).0);
    let payments = join(&second, "payments", orders_app.addr, "payments");
    control
        .until_counted(
            "lacewing_control_token_refusals_total",
            &[("role", "join"), ("reason", "wrong_service")],
            1.0,
        )
        .await;
    drop(payments);

    // The shared bootstrap token is turned off.
    let shared = join(
        &control.state.join("bootstrap.token"),
        "payments",
        orders_app.addr,
        "shared",
    );
    control
        .until_counted(
            "lacewing_control_token_refusals_total",
            &[("role", "bootstrap"), ("reason", "disabled")],
            1.0,
        )
        .await;
    drop(shared);

    // None of them registered; the token refused for payments is still good for orders.
    let (ok, out, _) = control.operator("status", &[]);
    assert!(ok && out.contains("2 sidecar(s)"), "{out}");
    assert!(!out.contains("payments"), "{out}");
    let _orders_again = join(&second, "orders", orders_app.addr, "orders-2");
    lacewing_tests::eventually("the second orders sidecar joins", || async {
        control
            .operator("status", &[])
            .1
            .matches(" connected ")
            .count()
            == 3
    })
    .await;
    assert_eq!(refusals(&control, "join", "unknown").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_a_joined_sidecar_reconnects_with_its_certificate_and_expired_tokens_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut plane = Plane::start(&dir.path().join("state")).await;
    let mut client = plane.client().await;
    // A module to fetch: after the join, with the certificate.
    std::fs::write(dir.path().join("f.wasm"), b"module bytes").unwrap();
    let mesh = format!(
        "{}{}",
        service("orders", ""),
        plugin("tag", "orders", "f.wasm", "c")
    );
    let v1 = apply(&mut client, dir.path(), "a.yaml", &mesh)
        .await
        .unwrap()
        .version;

    let token = client
        .create_join_token("orders", "", Some(Duration::from_secs(600)))
        .await
        .unwrap();
    assert_eq!(
        token.spiffe_id,
        "spiffe://lacewing.local/ns/default/sa/orders"
    );
    let orders = recording(&plane, &token.token, 20301, dir.path(), "orders");
    until_acked(&client, "orders-20301", v1).await;
    let counted = |text: &str, name: &str, labels: &[(&str, &str)]| {
        metric_sum(text, name, labels).unwrap_or(0.0)
    };
    let registrations = "lacewing_control_registrations_total";
    let metrics = plane.metrics().await;
    assert_eq!(
        counted(&metrics, registrations, &[("credential", "join")]),
        1.0,
        "{metrics}"
    );
    // The module (and the first-party ones every sidecar runs) came over a
    // connection presenting the new certificate: the token was spent.
    assert!(
        counted(&metrics, "lacewing_control_module_downloads_total", &[]) >= 1.0,
        "{metrics}"
    );
    assert_eq!(
        counted(&metrics, "lacewing_control_token_refusals_total", &[]),
        0.0,
        "{metrics}"
    );
    assert!(orders.published.last().is_some());

    // Restarted, the control plane sees the sidecar again: with its certificate.
    plane.restart().await;
    let mut client = plane.client().await;
    until_acked(&client, "orders-20301", 0).await;
    let metrics = plane.metrics().await;
    assert_eq!(
        counted(&metrics, registrations, &[("credential", "certificate")]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        counted(&metrics, registrations, &[("credential", "join")]),
        0.0
    );
    assert_eq!(
        counted(&metrics, "lacewing_control_token_refusals_total", &[]),
        0.0,
        "{metrics}"
    );
    // And it takes the next version.
    let (_, done) = apply_and_wait(
        &mut client,
        dir.path(),
        "b.yaml",
        &service("orders", "  protocol: h2\n"),
    )
    .await;
    assert_eq!(done.acked, 1);

    // A restarted sidecar presents the certificate kept in its state directory.
    drop(orders);
    let orders = recording(&plane, &token.token, 20301, dir.path(), "orders");
    lacewing_tests::eventually(
        "the restarted sidecar registers with its certificate",
        || async {
            let metrics = plane.metrics().await;
            counted(&metrics, registrations, &[("credential", "certificate")]) == 2.0
        },
    )
    .await;
    until_acked(&client, "orders-20301", 0).await;

    // The token was used before the restart: it stays used.
    let replay = recording(&plane, &token.token, 20311, dir.path(), "replay");
    // An expired token.
    let expired = client
        .create_join_token("orders", "default", Some(Duration::from_millis(1)))
        .await
        .unwrap();
    while now_ms() <= expired.expires_ms {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let late = recording(&plane, &expired.token, 20321, dir.path(), "late");
    // A token nobody made.
    let forged_token = format!("{}{}", api::JOIN_TOKEN_PREFIX, "0".repeat(64));
    let forged = recording(&plane, &forged_token, 20331, dir.path(), "forged");
    for reason in ["replayed", "expired", "unknown"] {
        lacewing_tests::eventually(&format!("a `{reason}` join token is refused"), || async {
            let metrics = plane.metrics().await;
            counted(
                &metrics,
                "lacewing_control_token_refusals_total",
                &[("role", "join"), ("reason", reason)],
            ) >= 1.0
        })
        .await;
    }
    let status = client.status().await.unwrap();
    assert_eq!(status.sidecars.len(), 1, "{status:?}");
    for refused in [&replay, &late, &forged] {
        assert!(refused.published.last().is_none());
    }
    drop((orders, replay, late, forged));
    plane.stop().await;
}

/// A recording sidecar of orders on `port` holding `token`, its state in `dir/name`.
fn recording(plane: &Plane, token: &str, port: u16, dir: &Path, name: &str) -> RecordingSidecar {
    RecordingSidecar::start_with_token(
        &plane.addr.to_string(),
        token,
        plane.trust(),
        spec("orders", port),
        &dir.join(name),
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// A hello for `service` on a stream over `channel`, with `token` as bearer
/// when given: the control plane's answer to it.
async fn hello(
    channel: tonic::transport::Channel,
    service: &str,
    token: Option<&str>,
) -> Result<api::Snapshot, tonic::Status> {
    let mut discovery = api::discovery_client::DiscoveryClient::new(channel);
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(api::SidecarMessage {
        message: Some(api::sidecar_message::Message::Hello(api::Hello {
            node_id: format!("{service}-probe"),
            service: service.into(),
            namespace: "default".into(),
            inbound: "127.0.0.1:1".into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    if let Some(token) = token {
        lacewing_control::token::authorize(&mut request, token).unwrap();
    }
    let mut snapshots = discovery.stream(request).await?.into_inner();
    let first = snapshots.message().await?;
    drop(tx);
    first.ok_or_else(|| tonic::Status::aborted("no snapshot"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_a_workload_certificate_registers_only_the_service_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let plane = Plane::start(&state).await;
    let read = |name: &str| std::fs::read_to_string(state.join(name)).unwrap();
    let ca = lacewing_tls::MeshCa::from_pem(&read("ca.pem"), &read("ca.key")).unwrap();
    let workload = |ca: &lacewing_tls::MeshCa| {
        let id = lacewing_tls::SpiffeId::new("lacewing.local", "default", "orders").unwrap();
        let key = lacewing_tls::WorkloadKey::generate().unwrap();
        let issued = ca.sign(&key.csr_pem(&id).unwrap(), &id).unwrap();
        key.identity(&issued.cert_pem).unwrap()
    };
    let orders = workload(&ca);
    let channel = || async {
        let trust = plane.trust().presenting(&orders).unwrap();
        lacewing_control::client::channel(&plane.addr.to_string(), &trust)
            .await
            .unwrap()
    };
    // Its own service: admitted without any token.
    let snapshot = hello(channel().await, "orders", None).await.unwrap();
    assert_eq!(snapshot.trust_domain, "lacewing.local");
    // Another service: refused, whatever token comes with it.
    for token in [None, Some(plane.bootstrap_token())] {
        let refused = hello(channel().await, "payments", token.as_deref())
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated);
        assert_eq!(
            refused.message(),
            "the workload certificate is spiffe://lacewing.local/ns/default/sa/orders: it \
             cannot register as default/payments"
        );
    }
    let metrics = plane.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "lacewing_control_token_refusals_total",
            &[("role", "workload"), ("reason", "wrong_service")],
        ),
        Some(2.0),
        "{metrics}"
    );
    // A certificate of another CA does not get past the handshake.
    let (other, _) = lacewing_tls::MeshCa::generate("lacewing.local").unwrap();
    let stranger = workload(&other);
    let trust = plane.trust().presenting(&stranger).unwrap();
    let refused = match lacewing_control::client::channel(&plane.addr.to_string(), &trust).await {
        Ok(channel) => hello(channel, "orders", None).await.is_err(),
        Err(_) => true,
    };
    assert!(refused, "a certificate of another CA was accepted");

    // A join token registers a sidecar, and does nothing else.
    let mut operator = plane.client().await;
    let token = operator
        .create_join_token("orders", "default", None)
        .await
        .unwrap();
    let mut discovery = api::discovery_client::DiscoveryClient::new(plane.channel().await);
    let mut request = tonic::Request::new(api::FetchModuleRequest {
        sha256: "0".repeat(64),
    });
    lacewing_control::token::authorize(&mut request, &token.token).unwrap();
    let refused = discovery.fetch_module(request).await.unwrap_err();
    assert_eq!(refused.code(), Code::Unauthenticated);
    let metrics = plane.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "lacewing_control_token_refusals_total",
            &[("role", "join"), ("reason", "not_for_modules")],
        ),
        Some(1.0),
        "{metrics}"
    );
    // Tokens are made for a service name, for at most 30 days.
    for (service, ttl) in [
        ("Orders", None),
        ("orders", Some(Duration::from_secs(31 * 86400))),
    ] {
        match operator.create_join_token(service, "default", ttl).await {
            Err(lacewing_control::client::ClientError::Status(status)) => {
                assert_eq!(status.code(), Code::InvalidArgument, "{status:?}")
            }
            other => panic!("a token for {service} / {ttl:?}: {other:?}"),
        }
    }
    plane.stop().await;
}
