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
