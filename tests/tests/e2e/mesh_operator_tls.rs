//! The control plane's own API over TLS: `lacewing control` as a process,
//! the operator commands and a sidecar as processes, each verifying the
//! control plane with the `ca.pem` beside its token file (or `--ca-file`).
//! On the wire there is only TLS; plaintext, another CA, and bad handshakes
//! are refused with a clear message and counted.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::PoisonError;
use std::time::Duration;

use lacewing_tests::client::metric_sum;
use lacewing_tests::servers;

use crate::mesh_support::*;

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A control plane process and what its clients hold.
pub(crate) struct Control {
    process: Process,
    pub(crate) addr: String,
    pub(crate) state: std::path::PathBuf,
    pub(crate) dir: tempfile::TempDir,
}

impl Control {
    /// `lacewing control` on 127.0.0.1:0 with a fresh state directory and `extra` flags.
    pub(crate) fn start(extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("control");
        let mut args = vec![
            "control",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            path(&state),
        ];
        args.extend_from_slice(extra);
        let process = Process::spawn(&args);
        let addr = process.words.last().unwrap().clone();
        Self {
            process,
            addr,
            state,
            dir,
        }
    }

    pub(crate) fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether `lacewing status` lists a connected sidecar.
    pub(crate) fn has_connected_sidecar(&self) -> bool {
        self.operator("status", &[]).1.contains(" connected ")
    }

    fn token_file(&self) -> std::path::PathBuf {
        self.state.join("operator.token")
    }

    /// `lacewing COMMAND --control ADDR --token-file STATE/operator.token ARGS`.
    pub(crate) fn operator(&self, command: &str, args: &[&str]) -> (bool, String, String) {
        let token_file = self.token_file();
        let mut all = vec![
            command,
            "--control",
            &self.addr,
            "--token-file",
            path(&token_file),
        ];
        all.extend_from_slice(args);
        lacewing(&all)
    }

    async fn metrics(&self) -> String {
        control_metrics(&self.addr, &trust(&self.state)).await
    }

    async fn counted(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric_sum(&self.metrics().await, name, labels).unwrap_or(0.0)
    }

    pub(crate) async fn until_counted(&self, name: &str, labels: &[(&str, &str)], at_least: f64) {
        lacewing_tests::eventually(&format!("{name} {labels:?} >= {at_least}"), || async {
            self.counted(name, labels).await >= at_least
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_operator_commands_and_sidecars_reach_the_control_plane_over_tls() {
    let control = Control::start(&[]);
    // Written at first start, beside the tokens; clients find it there.
    let ca = std::fs::read_to_string(control.state.join("ca.pem")).unwrap();
    assert!(ca.starts_with("-----BEGIN CERTIFICATE-----"), "{ca}");

    let app = servers::http_echo_named("orders").await;
    let _orders = sidecar_process(
        &control.addr,
        &control.state,
        "orders",
        app.addr,
        &control.dir.path().join("orders"),
    );
    let mesh = write(control.dir.path(), "mesh.yaml", &service("orders", ""));
    let wait_for_sidecar = || async {
        lacewing_tests::eventually("the orders sidecar is connected", || async {
            control.has_connected_sidecar()
        })
        .await;
    };
    wait_for_sidecar().await;

    let (ok, out, err) = control.operator("apply", &["-f", path(&mesh), "--wait"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("applied: version 1"), "{out}");
    assert!(out.contains("version 1: 1/1 sidecars ACKed"), "{out}");

    let (ok, out, err) = control.operator("status", &[]);
    assert!(ok, "{err}");
    assert!(out.contains("default/orders"), "{out}");
    assert!(out.contains("ACK v1"), "{out}");

    let (ok, out, err) = control.operator("get", &["service", "orders"]);
    assert!(ok, "{err}");
    assert!(out.contains("name: orders"), "{out}");

    // The same with the CA named explicitly and the address as an https URI.
    let https = format!("https://{}", control.addr);
    let ca_file = control.state.join("ca.pem");
    let token_file = control.token_file();
    let (ok, out, err) = lacewing(&[
        "status",
        "--control",
        &https,
        "--token-file",
        path(&token_file),
        "--ca-file",
        path(&ca_file),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("mesh version 1, 1 sidecar(s)"), "{out}");

    let (ok, out, err) = control.operator("delete", &["-f", path(&mesh)]);
    assert!(ok, "{err}");
    assert!(out.contains("deleted: version 2"), "{out}");

    // A plaintext address is refused before anything is sent.
    let http = format!("http://{}", control.addr);
    let (ok, _, err) = lacewing(&[
        "status",
        "--control",
        &http,
        "--token-file",
        path(&token_file),
    ]);
    assert!(!ok);
    assert!(err.contains("served over TLS only"), "{err}");
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Sends `bytes` on a fresh plaintext connection to `addr` and reads until
/// the server closes: what it answered (a reset counts as no answer).
fn plaintext_exchange(addr: &str, bytes: &[u8]) -> Vec<u8> {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    stream.write_all(bytes).unwrap();
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_the_control_port_speaks_only_tls() {
    let control = Control::start(&[]);
    let token = std::fs::read_to_string(control.token_file()).unwrap();
    let target = control.addr.parse().expect("the control plane's address");
    let (relay, captured) = crate::tls_files::tap(target).await;

    // An operator command through the relay works, and what crossed it is TLS:
    // handshake records first both ways, neither the token nor the gRPC path
    // in the clear.
    let relay = relay.to_string();
    let token_file = control.token_file();
    let (ok, out, err) = lacewing(&[
        "status",
        "--control",
        &relay,
        "--token-file",
        path(&token_file),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("mesh version 0"), "{out}");
    let (up, down) = captured
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    assert!(up.len() > 100 && down.len() > 100, "{up:?} {down:?}");
    // A TLS handshake record (22), then the version of the record layer.
    assert_eq!(&up[..2], &[0x16, 0x03]);
    assert_eq!(&down[..2], &[0x16, 0x03]);
    for bytes in [&up, &down] {
        assert!(!contains(bytes, token.trim().as_bytes()));
        assert!(!contains(bytes, b"lacewing.control.v1"));
        assert!(!contains(bytes, b"PRI * HTTP/2.0"));
    }

    // Plaintext HTTP/2 (the preface and an empty SETTINGS frame) and
    // plaintext HTTP/1.1 straight to the port get no answer.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
    let addr = control.addr.clone();
    let answers = tokio::task::spawn_blocking(move || {
        [
            plaintext_exchange(&addr, &h2),
            plaintext_exchange(&addr, b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n"),
        ]
    })
    .await
    .unwrap();
    assert_eq!(answers, [Vec::<u8>::new(), Vec::new()]);
    control
        .until_counted(
            "lacewing_control_tls_handshakes_total",
            &[("outcome", "plaintext_refused")],
            2.0,
        )
        .await;
    assert!(
        control
            .counted(
                "lacewing_control_tls_handshakes_total",
                &[("outcome", "ok")]
            )
            .await
            >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_a_client_trusting_another_ca_is_refused_with_a_clear_message() {
    let control = Control::start(&[]);
    let (other, _) = lacewing_tls::MeshCa::generate("lacewing.local").unwrap();
    let other_ca = write(control.dir.path(), "other-ca.pem", other.root_pem());

    let (ok, _, err) = control.operator("status", &["--ca-file", path(&other_ca)]);
    assert!(!ok);
    assert!(
        err.contains(&format!(
            "presented a certificate not signed by the CA in {}",
            other_ca.display()
        )),
        "{err}"
    );
    // No CA file where one is expected.
    let missing = control.dir.path().join("missing.pem");
    let (ok, _, err) = control.operator("status", &["--ca-file", path(&missing)]);
    assert!(!ok);
    assert!(
        err.contains(&format!("no CA certificate at {}", missing.display())),
        "{err}"
    );
    // A sidecar trusting the other CA never registers: its handshakes end
    // with its alert, counted by the control plane.
    let app = servers::http_echo_named("orders").await;
    let sidecar_state = control.dir.path().join("orders");
    let bootstrap = control.state.join("bootstrap.token");
    let _orders = sidecar_process_with(
        &control.addr,
        &bootstrap,
        "orders",
        app.addr,
        &sidecar_state,
        &["--ca-file", path(&other_ca)],
    );
    control
        .until_counted(
            "lacewing_control_tls_handshakes_total",
            &[("outcome", "alert_received")],
            3.0,
        )
        .await;
    let (ok, out, err) = control.operator("status", &[]);
    assert!(ok, "{err}");
    assert!(out.contains("0 sidecar(s)"), "{out}");
}
