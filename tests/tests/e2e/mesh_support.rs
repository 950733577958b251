//! Support for the mesh tests: a control plane in this process (or as a
//! `lacewing control` process), sidecar agents whose publish records what it
//! is given, and mesh files written to a scratch directory.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, PoisonError};

use lacewing_config::ProxyConfig;
use lacewing_control::ControlPlane;
use lacewing_control::client::{Applied, Client, ClientError};
use lacewing_control_agent::{Agent, AgentOptions, Publish, SidecarSpec};
use lacewing_control_api as api;
use lacewing_tls::api::ApiTrust;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A control plane serving on a task of the test's runtime.
pub struct Plane {
    pub addr: SocketAddr,
    pub state_dir: PathBuf,
    /// How its CA is set up (kept for a restart).
    ca: lacewing_control::ca::CaOptions,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Plane {
    /// Starts on `listen` with `state_dir` (created if needed).
    pub async fn start_at(listen: SocketAddr, state_dir: &Path) -> Self {
        Self::start_at_with(listen, state_dir, Default::default()).await
    }

    /// Starts on 127.0.0.1:0 with `state_dir`, its CA set up as `ca` says
    /// (e.g. short certificate lifetimes).
    pub async fn start_with(state_dir: &Path, ca: lacewing_control::ca::CaOptions) -> Self {
        Self::start_at_with("127.0.0.1:0".parse().unwrap(), state_dir, ca).await
    }

    async fn start_at_with(
        listen: SocketAddr,
        state_dir: &Path,
        ca: lacewing_control::ca::CaOptions,
    ) -> Self {
        let plane = ControlPlane::bind_with(listen, state_dir, &ca)
            .await
            .expect("control plane binds");
        let addr = plane.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            plane
                .serve(async {
                    let _ = stopped.await;
                })
                .await
                .expect("control plane serves");
        });
        Self {
            addr,
            state_dir: state_dir.to_path_buf(),
            ca,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub async fn start(state_dir: &Path) -> Self {
        Self::start_at("127.0.0.1:0".parse().unwrap(), state_dir).await
    }

    pub fn operator_token(&self) -> String {
        lacewing_control::token::read(&self.state_dir.join("operator.token")).unwrap()
    }

    pub fn bootstrap_token(&self) -> String {
        lacewing_control::token::read(&self.state_dir.join("bootstrap.token")).unwrap()
    }

    /// The mesh root clients verify the control plane with (its `ca.pem`).
    pub fn trust(&self) -> ApiTrust {
        trust(&self.state_dir)
    }

    pub async fn client(&self) -> Client {
        Client::connect(
            &self.addr.to_string(),
            &self.operator_token(),
            &self.trust(),
        )
        .await
        .expect("operator client connects")
    }

    /// A gRPC channel to the control plane (over TLS, verified).
    pub async fn channel(&self) -> tonic::transport::Channel {
        lacewing_control::client::channel(&self.addr.to_string(), &self.trust())
            .await
            .expect("channel to the control plane")
    }

    /// Stops serving (open streams are cut) and waits until it has.
    pub async fn stop(mut self) {
        self.stop_serving().await;
    }

    async fn stop_serving(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(std::time::Duration::from_secs(10), task)
                .await
                .expect("the control plane stops")
                .expect("the control plane task ends cleanly");
        }
    }

    /// Stops serving and starts again on the same address and state
    /// directory, as a restarted control plane would.
    pub async fn restart(&mut self) {
        self.stop_serving().await;
        *self = Self::start_at_with(self.addr, &self.state_dir.clone(), self.ca.clone()).await;
    }

    /// `/metrics` of the control plane.
    pub async fn metrics(&self) -> String {
        control_metrics(&self.addr.to_string(), &self.trust()).await
    }
}

/// `/metrics` of the control plane at `addr` (HTTP/2 over its TLS).
pub async fn control_metrics(addr: &str, trust: &ApiTrust) -> String {
    use http_body_util::BodyExt;
    let tls = trust.connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(format!("http://{addr}/metrics"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200, "GET /metrics");
    let body = response.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec()).unwrap()
}

/// The mesh root of the control plane whose state directory is `state`.
pub fn trust(state: &Path) -> ApiTrust {
    ApiTrust::from_file(&state.join(lacewing_control::CA_CERT)).expect("the control plane's ca.pem")
}

/// Writes `text` to `dir/name` and returns the path.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Parses `text` as the file `dir/name` and applies it.
pub async fn apply(
    client: &mut Client,
    dir: &Path,
    name: &str,
    text: &str,
) -> Result<Applied, ClientError> {
    let path = write(dir, name, text);
    let docs = lacewing_mesh::parse_file(&path)?;
    client.apply(docs, dir).await
}

/// [`apply`], then waits until the connected sidecars answered: (version, progress).
pub async fn apply_and_wait(
    client: &mut Client,
    dir: &Path,
    name: &str,
    text: &str,
) -> (u64, api::WaitProgress) {
    let version = apply(client, dir, name, text).await.unwrap().version;
    let done = client
        .wait(version, std::time::Duration::from_secs(60), |_| {})
        .await
        .unwrap();
    (version, done)
}

/// Applies `text` as `dir/mesh.yaml`; panics unless every connected sidecar
/// ACKed it. Returns the version.
pub async fn apply_taken(plane: &Plane, dir: &Path, text: &str) -> u64 {
    let mut client = plane.client().await;
    let (version, done) = apply_and_wait(&mut client, dir, "mesh.yaml", text).await;
    assert!(
        done.nacked.is_empty() && done.silent.is_empty(),
        "version {version} not taken: {done:?}"
    );
    version
}

/// A `Service` document.
pub fn service(name: &str, extra: &str) -> String {
    format!(
        "apiVersion: lacewing.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  port: 80\n{extra}---\n"
    )
}

/// A `WasmPlugin` document selecting `service`.
pub fn plugin(name: &str, service: &str, module: &str, configuration: &str) -> String {
    format!(
        "apiVersion: lacewing.dev/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: {name}}}\nspec:\n  module: {module}\n  selector: {{service: {service}}}\n  configuration: {configuration:?}\n---\n"
    )
}

/// What a recording publish was given, or refuses with.
#[derive(Default)]
pub struct Published {
    pub configs: Mutex<Vec<ProxyConfig>>,
    pub refuse: Mutex<Option<String>>,
}

impl Published {
    pub fn last(&self) -> Option<ProxyConfig> {
        self.configs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .last()
            .cloned()
    }

    pub fn refuse_with(&self, reason: Option<&str>) {
        *self.refuse.lock().unwrap_or_else(PoisonError::into_inner) = reason.map(str::to_string);
    }
}

/// A sidecar agent whose publish records configurations instead of serving them.
pub struct RecordingSidecar {
    pub published: Arc<Published>,
    pub spec: SidecarSpec,
    task: JoinHandle<()>,
}

impl Drop for RecordingSidecar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn spec(service: &str, port: u16) -> SidecarSpec {
    SidecarSpec {
        node_id: format!("{service}-{port}"),
        service: service.into(),
        namespace: "default".into(),
        inbound: SocketAddr::from(([127, 0, 0, 1], port)),
        outbound: SocketAddr::from(([127, 0, 0, 1], port + 1)),
        app: SocketAddr::from(([127, 0, 0, 1], port + 2)),
        admin: None,
        workers: 1,
        handshake_timeout: std::time::Duration::from_secs(10),
        outbound_tcp: Vec::new(),
    }
}

impl RecordingSidecar {
    pub fn start(plane: &Plane, spec: SidecarSpec, state_dir: &Path) -> Self {
        Self::start_with_token(
            &plane.addr.to_string(),
            &plane.bootstrap_token(),
            plane.trust(),
            spec,
            state_dir,
        )
    }

    pub fn start_with_token(
        control: &str,
        token: &str,
        trust: ApiTrust,
        spec: SidecarSpec,
        state_dir: &Path,
    ) -> Self {
        let published = Arc::new(Published::default());
        let recorder = published.clone();
        let publish: Publish = Arc::new(move |config| {
            if let Some(reason) = recorder
                .refuse
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
            {
                return Err(reason);
            }
            recorder
                .configs
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(config);
            Ok(())
        });
        let options = AgentOptions {
            control: control.to_string(),
            token: token.to_string(),
            trust,
            spec: spec.clone(),
            state_dir: state_dir.to_path_buf(),
            identity: lacewing_tls::LiveIdentity::new(),
        };
        let (initial, version) = Agent::initial_config(&options).unwrap();
        let registry = prometheus::Registry::new_custom(Some("lacewing".into()), None).unwrap();
        let metrics = lacewing_control_agent::metrics::AgentMetrics::register(&registry).unwrap();
        let agent = Agent::new(options, publish, metrics, &initial, version).unwrap();
        Self {
            published,
            spec,
            task: tokio::spawn(agent.run()),
        }
    }
}

/// The status line of one sidecar.
pub async fn sidecar_status(client: &mut Client, node_id: &str) -> Option<api::SidecarStatus> {
    client
        .status()
        .await
        .ok()?
        .sidecars
        .into_iter()
        .find(|s| s.node_id == node_id)
}

/// A `lacewing` process (control plane or sidecar), SIGKILLed when dropped.
pub struct Process {
    child: Child,
    /// Its first stdout line, split on spaces.
    pub words: Vec<String>,
}

impl Process {
    /// Runs `lacewing ARGS` and reads the line it prints when it is serving.
    pub fn spawn(args: &[&str]) -> Self {
        let mut child = Command::new(lacewing_tests::process::lacewing_binary())
            .args(args)
            .env("LACEWING_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start lacewing");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(!line.is_empty(), "lacewing {args:?} exited before serving");
        Self {
            child,
            words: line.split_whitespace().map(str::to_string).collect(),
        }
    }

    /// The word after `key` in the first line, as an address.
    pub fn addr(&self, key: &str) -> SocketAddr {
        let at = self
            .words
            .iter()
            .position(|w| w == key)
            .unwrap_or_else(|| panic!("no `{key}` in {:?}", self.words));
        self.words[at + 1].parse().unwrap()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no chance to finish anything.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `lacewing control` on `listen` with `state`.
pub fn control_process(listen: &str, state: &Path) -> (Process, String) {
    let process = Process::spawn(&[
        "control",
        "--listen",
        listen,
        "--state-dir",
        state.to_str().unwrap(),
    ]);
    let addr = process.words.last().unwrap().clone();
    (process, addr)
}

/// `lacewing proxy --control`: a sidecar for `service` in front of `app`, one worker.
pub fn sidecar_process(
    control: &str,
    control_state: &Path,
    service: &str,
    app: SocketAddr,
    state: &Path,
) -> Process {
    sidecar_process_at(control, control_state, service, app, state, "127.0.0.1:0")
}

/// [`sidecar_process`] with its inbound address.
pub fn sidecar_process_at(
    control: &str,
    control_state: &Path,
    service: &str,
    app: SocketAddr,
    state: &Path,
    inbound: &str,
) -> Process {
    sidecar_process_with(
        control,
        &control_state.join("bootstrap.token"),
        service,
        app,
        state,
        &["--inbound", inbound],
    )
}

/// `lacewing proxy --control`: a sidecar for `service` holding `token_file`,
/// one worker, with `extra` flags (`--inbound` defaults to 127.0.0.1:0).
pub fn sidecar_process_with(
    control: &str,
    token_file: &Path,
    service: &str,
    app: SocketAddr,
    state: &Path,
    extra: &[&str],
) -> Process {
    let app = app.to_string();
    let mut args = vec![
        "proxy",
        "--control",
        control,
        "--service",
        service,
        "--outbound",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--app",
        &app,
        "--token-file",
        token_file.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "--workers",
        "1",
    ];
    if !extra.contains(&"--inbound") {
        args.extend_from_slice(&["--inbound", "127.0.0.1:0"]);
    }
    args.extend_from_slice(extra);
    Process::spawn(&args)
}

/// Waits until `count` sidecars have an open stream.
pub async fn until_connected(client: &Client, count: usize) {
    lacewing_tests::eventually_with(
        &format!("{count} sidecars are connected"),
        300,
        std::time::Duration::from_millis(50),
        || {
            let mut client = client.clone();
            async move {
                client
                    .status()
                    .await
                    .is_ok_and(|s| s.sidecars.iter().filter(|s| s.connected).count() == count)
            }
        },
    )
    .await;
}

/// Waits until the sidecar `node_id` is connected and has ACKed `version` (0: just connected).
pub async fn until_acked(client: &Client, node_id: &str, version: u64) {
    lacewing_tests::eventually(&format!("{node_id} ACKs version {version}"), || {
        let mut client = client.clone();
        async move {
            sidecar_status(&mut client, node_id)
                .await
                .is_some_and(|s| s.connected && s.acked_version >= version)
        }
    })
    .await;
}

/// A control plane and one `lacewing proxy --control` sidecar process per
/// service, each in front of an echo app naming it. Fields drop in order:
/// sidecars first, the state directory last.
pub struct SidecarMesh {
    pub sidecars: Vec<(&'static str, Process)>,
    apps: Vec<lacewing_tests::servers::TestServer>,
    pub plane: Plane,
    pub dir: tempfile::TempDir,
}

impl SidecarMesh {
    pub async fn start(services: &[&'static str]) -> Self {
        Self::start_with(services, Default::default()).await
    }

    /// [`start`](Self::start), the control plane's CA set up as `ca` says.
    pub async fn start_with(
        services: &[&'static str],
        ca: lacewing_control::ca::CaOptions,
    ) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let plane = Plane::start_with(&dir.path().join("control"), ca).await;
        let control = plane.addr.to_string();
        let state = dir.path().join("control");
        let mut apps = Vec::new();
        let mut sidecars = Vec::new();
        for &service in services {
            let app = lacewing_tests::servers::http_echo_named(service).await;
            let sidecar = sidecar_process(
                &control,
                &state,
                service,
                app.addr,
                &dir.path().join(service),
            );
            apps.push(app);
            sidecars.push((service, sidecar));
        }
        until_connected(&plane.client().await, services.len()).await;
        Self {
            sidecars,
            apps,
            plane,
            dir,
        }
    }

    /// The app behind the sidecar of `service`.
    pub fn app(&self, service: &str) -> SocketAddr {
        let at = self
            .sidecars
            .iter()
            .position(|(s, _)| *s == service)
            .expect("a sidecar of the service");
        self.apps[at].addr
    }

    pub fn sidecar_mut(&mut self, service: &str) -> &mut Process {
        &mut self
            .sidecars
            .iter_mut()
            .find(|(s, _)| *s == service)
            .expect("a sidecar of the service")
            .1
    }

    pub fn sidecar(&self, service: &str) -> &Process {
        &self
            .sidecars
            .iter()
            .find(|(s, _)| *s == service)
            .expect("a sidecar of the service")
            .1
    }

    /// Applies `text`; panics unless every sidecar took it.
    pub async fn apply_ok(&self, text: &str) -> u64 {
        apply_taken(&self.plane, self.dir.path(), text).await
    }

    /// `from`'s app calls `to` through `from`'s sidecar.
    pub async fn call(
        &self,
        client: &lacewing_tests::client::ReusingClient,
        from: &str,
        to: &str,
        method: &str,
        path: &str,
    ) -> lacewing_tests::client::Response {
        let outbound = self.sidecar(from).addr("outbound");
        let mut request = http::Request::builder()
            .method(method)
            .uri(format!("http://{outbound}{path}"))
            .header("host", to);
        if method == "POST" {
            request = request.header("content-type", "application/json");
        }
        client
            .request(
                request
                    .body(http_body_util::Full::new(bytes::Bytes::from_static(b"{}")))
                    .unwrap(),
            )
            .await
    }

    pub async fn metrics(&self, service: &str) -> String {
        lacewing_tests::client::metrics(self.sidecar(service).addr("admin")).await
    }
}

/// Runs `lacewing ARGS` to completion (the environment's control-plane
/// settings removed): whether it succeeded, its stdout and its stderr.
pub fn lacewing(args: &[&str]) -> (bool, String, String) {
    let output = Command::new(lacewing_tests::process::lacewing_binary())
        .args(args)
        .env("LACEWING_LOG", "warn")
        .env_remove("LACEWING_CONTROL")
        .env_remove("LACEWING_TOKEN_FILE")
        .env_remove("LACEWING_CA_FILE")
        .output()
        .expect("run lacewing");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// One GET (`host: HOST`) over a new mTLS connection to `addr`, presenting
/// `identity` and verifying the server against `trust` and `expect`: the
/// status and the leaf certificate the server presented, or what failed.
pub async fn mtls_get(
    addr: SocketAddr,
    identity: &lacewing_tls::Identity,
    trust: &lacewing_tls::TrustBundle,
    expect: &lacewing_tls::SpiffeId,
    host: &str,
) -> Result<(u16, Vec<u8>), String> {
    let config = lacewing_tls::client_config(identity, trust, expect).map_err(|e| e.to_string())?;
    let mut config = (*config).clone();
    config.alpn_protocols = vec![lacewing_tls::ALPN_HTTP11.to_vec()];
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(lacewing_tls::server_name_for(expect), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .map(|leaf| leaf.to_vec())
        .unwrap_or_default();
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(connection);
    let request = http::Request::get("/")
        .header("host", host)
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    http_body_util::BodyExt::collect(response.into_body())
        .await
        .map_err(|e| format!("body: {e}"))?;
    Ok((status, leaf))
}
