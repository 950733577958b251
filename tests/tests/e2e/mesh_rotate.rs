//! Rotating the mesh root under load: `lacewing root rotate`, a control
//! plane restart in the middle, `lacewing root finish`; frontend → orders
//! over STRICT mTLS keeps answering on kept-alive and new connections, and
//! at the end every certificate chains to the new root only.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use lacewing_tests::client::ReusingClient;

use crate::mesh_support::*;

const ORDERS_ID: &str = "spiffe://lacewing.local/ns/default/sa/orders";
const FRONTEND_ID: &str = "spiffe://lacewing.local/ns/default/sa/frontend";

/// Requests that answered 200, and what the others saw.
#[derive(Default)]
struct Tally {
    ok: AtomicU64,
    failed: Mutex<Vec<String>>,
}

impl Tally {
    fn record(&self, what: &str, result: Result<u16, String>) {
        match result {
            Ok(200) => {
                self.ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(status) => self.fail(format!("{what}: status {status}")),
            Err(error) => self.fail(format!("{what}: {error}")),
        }
    }

    fn fail(&self, text: String) {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(text);
    }

    fn failures(&self) -> Vec<String> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// An agent of the mesh (service `probe`) in this process, whose identity
/// the test's own mTLS client presents: it follows the rotation as every
/// sidecar does.
fn probe_agent(plane: &Plane, dir: &std::path::Path) -> Arc<lacewing_tls::LiveIdentity> {
    let live = lacewing_tls::LiveIdentity::new();
    let options = lacewing_control_agent::AgentOptions {
        control: plane.addr.to_string(),
        token: plane.bootstrap_token(),
        trust: plane.trust(),
        spec: spec("probe", 0),
        state_dir: dir.to_path_buf(),
        identity: live.clone(),
    };
    let registry = prometheus::Registry::new();
    let metrics = lacewing_control_agent::metrics::AgentMetrics::register(&registry).unwrap();
    let publish: lacewing_control_agent::Publish = Arc::new(|_| Ok(()));
    let initial = lacewing_control_agent::bootstrap_config(&options.spec);
    let agent = lacewing_control_agent::Agent::new(options, publish, metrics, &initial, 0).unwrap();
    tokio::spawn(agent.run());
    live
}

/// The roots of the rotation status, the signing one first.
async fn rotation(plane: &Plane) -> lacewing_control_api::RootRotation {
    plane
        .client()
        .await
        .status()
        .await
        .unwrap()
        .roots
        .expect("the status names the roots")
}

/// Waits until the rotation is in `phase` and every connected sidecar
/// satisfies `each`.
async fn until_phase(
    plane: &Plane,
    phase: &'static str,
    each: impl Fn(&lacewing_control_api::SidecarStatus, &lacewing_control_api::RootRotation) -> bool
    + Clone,
) {
    let client = plane.client().await;
    lacewing_tests::eventually_with(
        &format!("the rotation reaches {phase}"),
        1200,
        Duration::from_millis(50),
        || {
            let mut client = client.clone();
            let each = each.clone();
            async move {
                let Ok(status) = client.status().await else {
                    return false;
                };
                let Some(roots) = &status.roots else {
                    return false;
                };
                roots.phase == phase
                    && status
                        .sidecars
                        .iter()
                        .filter(|s| s.connected)
                        .all(|s| each(s, roots))
            }
        },
    )
    .await;
}

/// Waits until both loads served more requests after `step`.
async fn flows(kept: &Tally, fresh: &Tally, step: &str) {
    let floor = (
        kept.ok.load(Ordering::Relaxed),
        fresh.ok.load(Ordering::Relaxed),
    );
    lacewing_tests::eventually(&format!("requests flow after {step}"), || async move {
        kept.ok.load(Ordering::Relaxed) > floor.0 + 20
            && fresh.ok.load(Ordering::Relaxed) > floor.1 + 5
    })
    .await;
}

fn cert_count(pem: &str) -> usize {
    pem.matches("-----BEGIN CERTIFICATE-----").count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_root_rotates_under_load_without_a_failed_request() {
    let mut mesh = SidecarMesh::start(&["frontend", "orders"]).await;
    let probe = probe_agent(&mesh.plane, &mesh.dir.path().join("probe"));
    until_connected(&mesh.plane.client().await, 3).await;
    mesh.apply_ok(&format!(
        "{}{}apiVersion: lacewing.dev/v1alpha1\nkind: MeshTLS\nmetadata: {{name: orders}}\nspec: {{destination: orders, mode: STRICT}}\n",
        service("orders", ""),
        service("frontend", ""),
    ))
    .await;
    let state = mesh.plane.state_dir.clone();
    let old_root = std::fs::read_to_string(state.join("ca.pem")).unwrap();
    assert_eq!(cert_count(&old_root), 1);
    let before = rotation(&mesh.plane).await;
    assert_eq!((before.phase.as_str(), before.roots.len()), ("steady", 1));
    lacewing_tests::eventually("every sidecar holds a certificate", || {
        let plane = &mesh.plane;
        let root = before.roots[0].clone();
        async move {
            let status = plane.client().await.status().await.unwrap();
            status
                .sidecars
                .iter()
                .all(|s| s.cert_root_sha256 == root && s.has_trust_bundle)
        }
    })
    .await;

    // Load: frontend's app through its sidecar to orders (kept alive), and
    // the probe's new mTLS connection to orders' STRICT inbound per request.
    let outbound = mesh.sidecar("frontend").addr("outbound");
    let orders_inbound = mesh.sidecar("orders").addr("inbound");
    let orders_id: lacewing_tls::SpiffeId = ORDERS_ID.parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let kept = Arc::new(Tally::default());
    let fresh = Arc::new(Tally::default());
    let kept_alive = tokio::spawn({
        let (stop, tally) = (stop.clone(), kept.clone());
        async move {
            let client = ReusingClient::http1();
            while !stop.load(Ordering::Relaxed) {
                let request = Request::get(format!("http://{outbound}/"))
                    .header("host", "orders")
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                let response = client.request(request).await;
                let what = format!(
                    "kept-alive via frontend ({:?} {})",
                    response
                        .header("x-lacewing-flags")
                        .or(response.header("server")),
                    response.text()
                );
                tally.record(&what, Ok(response.status.as_u16()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    });
    let new_connections = tokio::spawn({
        let (stop, tally, probe, orders_id) = (
            stop.clone(),
            fresh.clone(),
            probe.clone(),
            orders_id.clone(),
        );
        async move {
            while !stop.load(Ordering::Relaxed) {
                let material = probe.current().expect("the probe has a certificate");
                let result = mtls_get(
                    orders_inbound,
                    &material.identity,
                    &material.trust,
                    &orders_id,
                    "orders",
                )
                .await
                .map(|(status, _)| status);
                tally.record("new mTLS connection to orders", result);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    });

    // Start: the new root joins the bundle; the old one still signs.
    let control = mesh.plane.addr.to_string();
    let token_file = state.join("operator.token");
    let flags = [
        "--control",
        control.as_str(),
        "--token-file",
        token_file.to_str().unwrap(),
    ];
    let (ok, out, err) = lacewing(&[&["root", "rotate", "--overlap", "1h"][..], &flags].concat());
    assert!(ok, "lacewing root rotate: {err}");
    assert!(out.contains("mesh root: trusting (2 root(s)"), "{out}");

    flows(&kept, &fresh, "both roots are trusted").await;

    // Issuing: every sidecar ACKed the two-root bundle first, then each gets
    // a certificate of the new root.
    until_phase(&mesh.plane, "issuing", |s, roots| {
        s.has_trust_bundle && s.cert_root_sha256 == roots.roots[0]
    })
    .await;
    let issuing = rotation(&mesh.plane).await;
    assert_eq!(issuing.roots.len(), 2);
    assert_eq!(
        issuing.roots[1], before.roots[0],
        "the old root is still trusted"
    );
    let new_root = issuing.roots[0].clone();
    assert_eq!(
        cert_count(&std::fs::read_to_string(state.join("ca.pem")).unwrap()),
        2,
        "ca.pem holds both roots during the overlap"
    );

    // A restart in the middle resumes the rotation where it was; the
    // sidecars reconnect (the API's certificate now comes from the new root).
    flows(&kept, &fresh, "the new root signs").await;
    mesh.plane.restart().await;
    let resumed = rotation(&mesh.plane).await;
    assert_eq!(resumed.phase, "issuing");
    assert_eq!(resumed.roots, issuing.roots);
    until_connected(&mesh.plane.client().await, 3).await;
    let (ok, out, err) = lacewing(&[&["status"][..], &flags].concat());
    assert!(ok, "lacewing status during the overlap: {err}");
    assert!(out.contains("mesh root: issuing (2 root(s)"), "{out}");

    flows(&kept, &fresh, "the restart").await;
    // Finish: the old root leaves the bundle.
    let (ok, out, err) = lacewing(&[&["root", "finish"][..], &flags].concat());
    assert!(ok, "lacewing root finish: {err}");
    assert!(out.contains("mesh root: issuing"), "{out}");
    until_phase(&mesh.plane, "steady", |s, roots| {
        s.has_trust_bundle && s.cert_root_sha256 == roots.roots[0]
    })
    .await;
    let after = rotation(&mesh.plane).await;
    assert_eq!(after.roots, [new_root]);

    // Some more load on the one-root bundle, then stop.
    flows(&kept, &fresh, "the old root left").await;
    stop.store(true, Ordering::Relaxed);
    kept_alive
        .await
        .expect("the kept-alive load ran to its end");
    new_connections
        .await
        .expect("the new-connection load ran to its end");
    assert_eq!(kept.failures(), Vec::<String>::new());
    assert_eq!(fresh.failures(), Vec::<String>::new());
    assert!(kept.ok.load(Ordering::Relaxed) > 80);
    assert!(fresh.ok.load(Ordering::Relaxed) > 20);

    // Both sidecars now present certificates that chain to the new root
    // only: a client trusting the new root alone verifies them, a client
    // trusting the old root alone does not.
    let new_pem = std::fs::read_to_string(state.join("ca.pem")).unwrap();
    assert_eq!(cert_count(&new_pem), 1);
    assert_ne!(new_pem.trim(), old_root.trim());
    let only_new = lacewing_tls::TrustBundle::from_pem(&new_pem).unwrap();
    let only_old = lacewing_tls::TrustBundle::from_pem(&old_root).unwrap();
    let material = probe.current().unwrap();
    let frontend_id: lacewing_tls::SpiffeId = FRONTEND_ID.parse().unwrap();
    for (addr, id, host) in [
        (orders_inbound, &orders_id, "orders"),
        (
            mesh.sidecar("frontend").addr("inbound"),
            &frontend_id,
            "frontend",
        ),
    ] {
        let verified = mtls_get(addr, &material.identity, &only_new, id, host).await;
        assert!(matches!(verified, Ok((200, _))), "{id}: {verified:?}");
        let refused = mtls_get(addr, &material.identity, &only_old, id, host).await;
        assert!(
            refused.as_ref().is_err_and(|e| e.contains("handshake")),
            "{id} chains to the old root: {refused:?}"
        );
    }

    let metrics = mesh.plane.metrics().await;
    assert!(
        metrics.contains("lacewing_control_trust_bundle_roots 1\n"),
        "{metrics}"
    );
    // Counted by the control plane that finished it (the restarted one).
    assert!(
        metrics.contains("lacewing_control_root_rotations_total 1\n"),
        "{metrics}"
    );
}

/// The status of the one sidecar of `service`.
async fn sidecar_of(plane: &Plane, service: &str) -> lacewing_control_api::SidecarStatus {
    let status = plane.client().await.status().await.unwrap();
    status
        .sidecars
        .into_iter()
        .find(|s| s.service == service)
        .unwrap_or_else(|| panic!("a sidecar of {service}"))
}

fn waiting_nodes(rotation: &lacewing_control_api::RootRotation) -> Vec<String> {
    let mut nodes: Vec<String> = rotation
        .waiting_sidecars
        .iter()
        .map(|w| w.node_id.clone())
        .collect();
    nodes.sort();
    nodes
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Sidecars stopped before the trusting phase hold the rotation there:
/// orders until it comes back and ACKs the two-root bundle, billing (never
/// back) until its certificate expires, ledger until the operator forgets
/// it. Certificates live two minutes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_off_sidecar_holds_the_rotation_until_it_acks_or_its_certificate_expires() {
    let lifetime = Duration::from_secs(120);
    let mut mesh = SidecarMesh::start_with(
        &["frontend", "orders", "billing", "ledger"],
        lacewing_control::ca::CaOptions {
            lifetime,
            ..Default::default()
        },
    )
    .await;
    let state = mesh.plane.state_dir.clone();
    let control = mesh.plane.addr.to_string();
    mesh.apply_ok(&format!(
        "{}{}{}{}apiVersion: lacewing.dev/v1alpha1\nkind: MeshTLS\nmetadata: {{name: orders}}\nspec: {{destination: orders, mode: STRICT}}\n",
        service("frontend", ""),
        service("orders", ""),
        service("billing", ""),
        service("ledger", ""),
    ))
    .await;
    lacewing_tests::eventually("every sidecar holds a certificate", || {
        let plane = &mesh.plane;
        async move {
            let status = plane.client().await.status().await.unwrap();
            status.sidecars.len() == 4 && status.sidecars.iter().all(|s| s.cert_not_after_ms > 0)
        }
    })
    .await;
    let orders_inbound = mesh.sidecar("orders").addr("inbound");
    let orders = sidecar_of(&mesh.plane, "orders").await;
    let billing = sidecar_of(&mesh.plane, "billing").await;
    let ledger = sidecar_of(&mesh.plane, "ledger").await;
    let old_root = rotation(&mesh.plane).await.roots[0].clone();

    // Cut off: orders, billing and ledger stop (SIGKILL), their
    // certificates valid.
    for service in ["orders", "billing", "ledger"] {
        mesh.sidecar_mut(service).kill();
    }
    let killed = tokio::time::Instant::now();
    let flags = [
        "--control".to_string(),
        control.clone(),
        "--token-file".to_string(),
        state.join("operator.token").to_str().unwrap().to_string(),
    ];
    let run = |args: &[&str]| {
        let mut all: Vec<&str> = args.to_vec();
        all.extend(flags.iter().map(String::as_str));
        lacewing(&all)
    };
    let (ok, out, err) = run(&["root", "rotate", "--overlap", "1s"]);
    assert!(ok, "lacewing root rotate: {err}");
    assert!(out.contains("mesh root: trusting"), "{out}");

    // Past the reconnect grace the two are still waited for, by name, the
    // one connected sidecar having ACKed the two-root bundle.
    lacewing_tests::eventually("frontend ACKs the two-root bundle", || {
        let plane = &mesh.plane;
        async move { sidecar_of(plane, "frontend").await.has_trust_bundle }
    })
    .await;
    tokio::time::sleep_until(
        killed + lacewing_control::state::RECONNECT_GRACE + Duration::from_secs(2),
    )
    .await;
    let held = rotation(&mesh.plane).await;
    assert!(
        unix_ms() < orders.cert_not_after_ms.min(billing.cert_not_after_ms),
        "the test is too slow for {lifetime:?} certificates"
    );
    assert_eq!(held.phase, "trusting", "{held:?}");
    assert_eq!(
        waiting_nodes(&held),
        [
            billing.node_id.clone(),
            ledger.node_id.clone(),
            orders.node_id.clone()
        ]
    );
    assert!(held.waiting_sidecars.iter().all(|w| !w.connected
        && w.cert_root_sha256 == old_root
        && w.cert_not_after_ms > unix_ms()));
    let (ok, out, err) = run(&["root", "status"]);
    assert!(ok, "lacewing root status: {err}");
    assert!(
        out.contains("waiting for sidecars to ACK the two-root bundle")
            && out.contains(&format!(
                "    {} (disconnected; certificate expires in",
                orders.node_id
            )),
        "{out}"
    );
    let (ok, out, err) = run(&["status"]);
    assert!(ok, "lacewing status: {err}");
    assert!(out.contains(&billing.node_id), "{out}");
    // ledger is gone for good: the operator forgets it. A connected
    // sidecar, or one never known, cannot be forgotten.
    let frontend = sidecar_of(&mesh.plane, "frontend").await;
    let (ok, _, err) = run(&["root", "forget", &frontend.node_id]);
    assert!(!ok && err.contains("is connected"), "{err}");
    let (ok, _, err) = run(&["root", "forget", "nobody@127.0.0.1:1"]);
    assert!(!ok && err.contains("no sidecar is known"), "{err}");
    let (ok, out, err) = run(&["root", "forget", &ledger.node_id]);
    assert!(ok, "lacewing root forget: {err}");
    assert!(!out.contains(&ledger.node_id), "{out}");
    let status = mesh.plane.client().await.status().await.unwrap();
    assert!(status.sidecars.iter().all(|s| s.service != "ledger"));
    assert_eq!(
        waiting_nodes(status.roots.as_ref().unwrap()),
        [billing.node_id.clone(), orders.node_id.clone()]
    );

    // orders comes back (same state directory, same inbound: same node,
    // same certificate) and gets the bundle: only billing is waited for.
    let orders_app = mesh.app("orders");
    *mesh.sidecar_mut("orders") = sidecar_process_at(
        &control,
        &state,
        "orders",
        orders_app,
        &mesh.dir.path().join("orders"),
        &orders_inbound.to_string(),
    );
    lacewing_tests::eventually("orders is back with the two-root bundle", || {
        let plane = &mesh.plane;
        async move {
            let s = sidecar_of(plane, "orders").await;
            s.connected && s.has_trust_bundle
        }
    })
    .await;
    let waiting = rotation(&mesh.plane).await;
    let billing_expiry = match waiting.waiting_sidecars.as_slice() {
        [billing_wait] => billing_wait.cert_not_after_ms,
        _ => billing.cert_not_after_ms,
    };
    if unix_ms() < billing_expiry {
        assert_eq!(waiting.phase, "trusting", "{waiting:?}");
        assert_eq!(waiting_nodes(&waiting), [billing.node_id.as_str()]);
    }

    // billing's certificate expires: the new root signs, and orders (which
    // trusts it now) takes a certificate of it.
    tokio::time::sleep(Duration::from_millis(
        billing_expiry.saturating_sub(unix_ms()),
    ))
    .await;
    until_phase(&mesh.plane, "issuing", |s, roots| {
        s.cert_root_sha256 == roots.roots[0]
    })
    .await;
    assert!(
        unix_ms() >= billing.cert_not_after_ms,
        "issuing began before billing's certificate expired"
    );
    // frontend → orders over STRICT mTLS, both on certificates of the new root.
    let client = ReusingClient::http1();
    let outbound = mesh.sidecar("frontend").addr("outbound");
    lacewing_tests::eventually("frontend reaches orders over mTLS", || {
        let client = &client;
        async move {
            let request = Request::get(format!("http://{outbound}/"))
                .header("host", "orders")
                .body(Full::new(Bytes::new()))
                .unwrap();
            client.request(request).await.status == 200
        }
    })
    .await;

    // billing never took a certificate of the new root, but the one of the
    // old root it had expired: the old root leaves.
    until_phase(&mesh.plane, "steady", |s, roots| {
        s.has_trust_bundle && s.cert_root_sha256 == roots.roots[0]
    })
    .await;
    let after = rotation(&mesh.plane).await;
    assert_eq!(after.roots.len(), 1);
    assert_ne!(after.roots[0], old_root);
    assert!(after.waiting_sidecars.is_empty());
}
