//! `protocol: tcp` services in the mesh: a TCP echo app behind the `db`
//! sidecar, reached by `web`'s app through its sidecar's outbound TCP
//! listener (`lacewing proxy --outbound-tcp db=...`). `MeshTLS` decides
//! whether the hop between the two sidecar processes is mutual TLS and
//! whether `db`'s inbound listener takes plaintext.

use std::net::SocketAddr;
use std::time::Duration;

use lacewing_tests::client::{self, metric_value};
use lacewing_tests::servers;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::mesh_support::*;
use crate::tcp::exchange;
use crate::tls_files::{self, Captured};

const WEB_ID: &str = "spiffe://lacewing.local/ns/default/sa/web";
const DB_ID: &str = "spiffe://lacewing.local/ns/default/sa/db";
/// The name of `web`'s listener for `db` (printed by the sidecar with its address).
const TO_DB: &str = "outbound-tcp.default.db";

/// Fields drop in order: sidecars first, the state directory last.
struct TcpMesh {
    db: Process,
    web: Process,
    db_app: servers::TestServer,
    _web_app: servers::TestServer,
    plane: Plane,
    dir: tempfile::TempDir,
}

impl TcpMesh {
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let plane = Plane::start(&dir.path().join("control")).await;
        let control = plane.addr.to_string();
        let state = dir.path().join("control");
        let db_app = servers::tcp_echo().await;
        let web_app = servers::http_echo_named("web").await;
        let db = sidecar_process(&control, &state, "db", db_app.addr, &dir.path().join("db"));
        let web = sidecar_process_with(
            &control,
            &state.join("bootstrap.token"),
            "web",
            web_app.addr,
            &dir.path().join("web"),
            &["--outbound-tcp", "db=127.0.0.1:0"],
        );
        until_connected(&plane.client().await, 2).await;
        Self {
            db,
            web,
            db_app,
            _web_app: web_app,
            plane,
            dir,
        }
    }

    /// Applies `db` (protocol tcp, with `endpoints` besides its sidecar),
    /// `web`, and `MeshTLS` for `db` in `mode`; with `identity`, the
    /// tcp-filter plugin on `db`'s inbound listener, which answers
    /// `IDENTITY?` with what it knows of the caller.
    async fn apply(&self, mode: &str, endpoints: &[SocketAddr], identity: bool) {
        let endpoints = if endpoints.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = endpoints.iter().map(|e| format!("'{e}'")).collect();
            format!("  endpoints: [{}]\n", list.join(", "))
        };
        let plugin_doc = if identity {
            let module = lacewing_tests::wasm::module("tcp-filter");
            plugin("identity", "db", module.to_str().unwrap(), "")
        } else {
            String::new()
        };
        let text = format!(
            "{}{}{plugin_doc}apiVersion: lacewing.dev/v1alpha1\nkind: MeshTLS\nmetadata: {{name: db}}\nspec: {{destination: db, mode: {mode}}}\n",
            service("db", &format!("  protocol: tcp\n{endpoints}")),
            service("web", ""),
        );
        apply_taken(&self.plane, self.dir.path(), &text).await;
    }

    /// A new connection from `web`'s app to `db`, through `web`'s sidecar.
    async fn connect_through_web(&self) -> TcpStream {
        TcpStream::connect(self.web.addr(TO_DB)).await.unwrap()
    }

    /// A new connection through `web`'s sidecar reaches `db` over mTLS as
    /// `web` (the identity plugin must run on `db`).
    async fn assert_web_calls_over_mtls(&self) {
        let mut stream = self.connect_through_web().await;
        let line = Self::identity_on(&mut stream).await;
        assert!(
            line.starts_with(&format!(
                "inbound: source.principal={WEB_ID} connection.mtls=true"
            )),
            "{line}"
        );
    }

    /// The `IDENTITY?` line `db`'s inbound plugin adds on `stream`.
    async fn identity_on(stream: &mut TcpStream) -> String {
        let report = exchange(stream, b"IDENTITY?\n", b"IDENTITY?\n").await;
        report
            .lines()
            .find(|l| l.starts_with("inbound: "))
            .unwrap_or_else(|| panic!("no line from db's inbound listener in {report:?}"))
            .to_string()
    }
}

/// Writes to a plaintext connection straight to `addr` and reads what comes
/// back until the connection closes (or the read bound passes).
async fn plaintext_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut plain = TcpStream::connect(addr).await.unwrap();
    let _ = plain.write_all(bytes).await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(client::RAW_READ_TIMEOUT, plain.read_to_end(&mut answer)).await;
    answer
}

/// Asserts that the counter `name_with_labels` in `metrics` counted something.
fn assert_counted(metrics: &str, name_with_labels: &str) {
    assert!(
        metric_value(metrics, name_with_labels).is_some_and(|n| n >= 1.0),
        "{name_with_labels} in {metrics}"
    );
}

/// `web` → `db` under STRICT: the bytes are echoed, the hop between the
/// sidecars is TLS records only (a tap between them), `db`'s plugin sees
/// `web`'s SPIFFE ID, plaintext straight to `db` is refused and counted;
/// then DISABLE and PERMISSIVE hot-reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_between_sidecars_is_mutual_tls_and_strict_refuses_plaintext() {
    let mesh = TcpMesh::start().await;
    let inbound = mesh.db.addr("inbound");
    // The tap is a second endpoint of `db` leading to the same inbound
    // listener: `web` spreads its connections over both.
    let (tap, captured): (SocketAddr, Captured) = tls_files::tap(inbound).await;
    mesh.apply("STRICT", &[tap], true).await;

    let mut tapped = false;
    for _ in 0..6 {
        let mut stream = mesh.connect_through_web().await;
        let echoed = exchange(&mut stream, b"secret bytes\n", b"secret bytes\n").await;
        assert_eq!(echoed, "secret bytes\n");
        assert_eq!(
            TcpMesh::identity_on(&mut stream).await,
            format!(
                "inbound: source.principal={WEB_ID} connection.mtls=true \
                 connection.tls_version=TLSv1.3 connection.uri_san_peer_certificate={WEB_ID} \
                 connection.uri_san_local_certificate={DB_ID} upstream.tls_version=- \
                 upstream.uri_san_peer_certificate=-"
            )
        );
        drop(stream);
        tapped = !captured.lock().unwrap().0.is_empty();
        if tapped {
            break;
        }
    }
    assert!(tapped, "no connection went through the tap endpoint");
    {
        let both = captured.lock().unwrap();
        assert_eq!(&both.0[..2], &[0x16, 0x03], "a TLS handshake record first");
        assert_eq!(&both.1[..2], &[0x16, 0x03]);
        assert!(!tls_files::contains(&both.0, b"secret bytes"));
        assert!(!tls_files::contains(&both.1, b"secret bytes"));
    }

    // Plaintext straight to db's inbound: closed, nothing echoed, counted.
    let echo_before = mesh.db_app.accepted();
    assert!(plaintext_exchange(inbound, b"plaintext\n").await.is_empty());
    let db_metrics = client::metrics(mesh.db.addr("admin")).await;
    assert_counted(
        &db_metrics,
        "lacewing_downstream_tls_handshakes_total{listener=\"inbound\",outcome=\"plaintext_refused\"}",
    );
    assert_counted(
        &db_metrics,
        "lacewing_downstream_connections_by_transport_total{listener=\"inbound\",transport=\"tls\"}",
    );
    assert_eq!(
        mesh.db_app.accepted(),
        echo_before,
        "the refused bytes reached the app"
    );
    let web_metrics = client::metrics(mesh.web.addr("admin")).await;
    assert_counted(
        &web_metrics,
        "lacewing_upstream_tls_handshakes_total{cluster=\"svc.default.db\",outcome=\"ok\"}",
    );

    // DISABLE: plaintext between the sidecars, and plaintext callers served.
    mesh.apply("DISABLE", &[], true).await;
    let mut stream = mesh.connect_through_web().await;
    let line = TcpMesh::identity_on(&mut stream).await;
    assert!(
        line.starts_with("inbound: source.principal=- connection.mtls=false"),
        "{line}"
    );
    assert_eq!(plaintext_exchange_echo(inbound).await, "plaintext\n");

    // PERMISSIVE (every endpoint of db a sidecar): mTLS between the
    // sidecars, plaintext callers still served.
    mesh.apply("PERMISSIVE", &[], true).await;
    mesh.assert_web_calls_over_mtls().await;
    assert_eq!(plaintext_exchange_echo(inbound).await, "plaintext\n");
}

/// A plaintext connection to `addr` that sends `plaintext\n` and reads its echo.
async fn plaintext_exchange_echo(addr: SocketAddr) -> String {
    let mut plain = TcpStream::connect(addr).await.unwrap();
    exchange(&mut plain, b"plaintext\n", b"plaintext\n").await
}

/// Reads `stream` until it ends: panics unless the peer closes (or resets)
/// it without sending anything.
async fn assert_closed(stream: &mut TcpStream, what: &str) {
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut rest)).await;
    assert!(
        matches!(ended, Ok(Ok(0)) | Ok(Err(_))),
        "{what} is still open after STRICT went live: {ended:?}"
    );
    assert!(rest.is_empty(), "{what}: {rest:?}");
}

/// `db` starts in `mode` (with the network filter when `identity`), a
/// plaintext connection straight to it and one through `web`'s sidecar
/// carry bytes; a change that still allows plaintext keeps them; STRICT
/// closes the plaintext ones and keeps the mTLS one.
async fn plaintext_is_closed_when_strict(mode: &str, identity: bool) {
    let mesh = TcpMesh::start().await;
    mesh.apply(mode, &[], identity).await;
    let inbound = mesh.db.addr("inbound");
    let mut plain = TcpStream::connect(inbound).await.unwrap();
    assert_eq!(exchange(&mut plain, b"one\n", b"one\n").await, "one\n");
    // Over mTLS under PERMISSIVE (db's endpoints are all sidecars), in
    // plaintext under DISABLE.
    let mut through_web = mesh.connect_through_web().await;
    assert_eq!(exchange(&mut through_web, b"a\n", b"a\n").await, "a\n");

    // A new generation that still allows plaintext keeps the connections.
    let more = format!(
        "{}apiVersion: lacewing.dev/v1alpha1\nkind: MeshTLS\nmetadata: {{name: db}}\nspec: {{destination: db, mode: {mode}}}\n",
        service("payments", ""),
    );
    let mut operator = mesh.plane.client().await;
    let (_, done) = apply_and_wait(&mut operator, mesh.dir.path(), "more.yaml", &more).await;
    assert!(done.nacked.is_empty() && done.silent.is_empty(), "{done:?}");
    assert_eq!(exchange(&mut plain, b"two\n", b"two\n").await, "two\n");
    assert_eq!(exchange(&mut through_web, b"b\n", b"b\n").await, "b\n");

    // STRICT: the plaintext connection is closed by db's sidecar...
    mesh.apply("STRICT", &[], identity).await;
    assert_closed(&mut plain, "the plaintext connection to db").await;
    // ...a new plaintext connection is refused...
    assert!(plaintext_exchange(inbound, b"three\n").await.is_empty());
    if mode == "PERMISSIVE" {
        // ...and the mutual TLS connection made before goes on.
        assert_eq!(exchange(&mut through_web, b"c\n", b"c\n").await, "c\n");
    } else {
        // ...and so is the plaintext one web's sidecar had opened; web's
        // next connection goes over mTLS.
        assert_closed(&mut through_web, "web's plaintext connection to db").await;
        let mut again = mesh.connect_through_web().await;
        assert_eq!(exchange(&mut again, b"c\n", b"c\n").await, "c\n");
    }
    if identity {
        mesh.assert_web_calls_over_mtls().await;
    }
}

/// PERMISSIVE → STRICT on a TCP listener without network filters: the
/// plaintext connection (told from TLS by its first byte) is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plaintext_tcp_connection_is_closed_when_its_listener_turns_strict() {
    plaintext_is_closed_when_strict("PERMISSIVE", false).await;
}

/// DISABLE → STRICT on a TCP listener running a network filter: the
/// connections of the plaintext listener, web's sidecar's among them, are
/// closed, and web's sidecar reconnects over mTLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_tcp_connections_through_a_network_filter_are_closed_when_disable_turns_strict() {
    plaintext_is_closed_when_strict("DISABLE", true).await;
}

/// `--outbound-tcp` values that cannot work are refused at start, saying why.
#[test]
fn bad_outbound_tcp_flags_are_refused_with_the_reason() {
    let base = [
        "proxy",
        "--control",
        "127.0.0.1:1",
        "--service",
        "web",
        "--inbound",
        "127.0.0.1:0",
        "--app",
        "127.0.0.1:1",
        "--outbound",
        "127.0.0.1:0",
        "--token-file",
        "/nonexistent/bootstrap.token",
    ];
    for (flags, reason) in [
        (
            &[
                "--outbound-tcp",
                "db=127.0.0.1:0",
                "--outbound-tcp",
                "db.default=127.0.0.1:0",
            ][..],
            "--outbound-tcp names db.default twice",
        ),
        (
            &["--outbound-tcp", "db"][..],
            "\"db\": no `=` (expected SERVICE[.NAMESPACE]=HOST:PORT)",
        ),
        (
            &["--outbound-tcp", "Db=127.0.0.1:1"][..],
            "\"Db\" is not a service or namespace name",
        ),
    ] {
        let args: Vec<&str> = base.iter().chain(flags).copied().collect();
        let (ok, _, stderr) = lacewing(&args);
        assert!(!ok, "{flags:?} accepted");
        assert!(stderr.contains(reason), "{flags:?}: {stderr}");
    }
}
