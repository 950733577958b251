//! The mesh part of `lacewing demo`: a control plane with its embedded
//! store, three services (frontend → orders → payments) with a sidecar
//! each, `examples/mesh.yaml` applied, then what a user wants to see: calls
//! allowed and denied by policy with the mTLS identity each sidecar saw, a
//! plaintext caller refused, golden metrics, and a policy change hot-reloaded
//! under load with no failed request.

use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use lacewing_control::ControlPlane;
use lacewing_control::client::Client;

use crate::sidecar::{self, Placement};

/// The mesh the demo applies: the example users read.
pub const MESH_YAML: &str = include_str!("../../examples/mesh.yaml");

/// The policy change the demo hot-reloads: frontend may now also create orders.
const POLICY_BEFORE: &str = "    matches: [read]\n";
const POLICY_AFTER: &str = "    matches: [read, write]\n";

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// One running sidecar, as the demo knows it.
struct Member {
    service: &'static str,
    outbound: SocketAddr,
    inbound: SocketAddr,
    admin: Option<SocketAddr>,
}

/// What a call through the mesh returned.
struct Answer {
    status: u16,
    peer: Option<String>,
    body: String,
}

/// `method path` to `host` through the outbound listener at `outbound`.
async fn call(
    client: &HttpClient,
    outbound: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
) -> anyhow::Result<Answer> {
    let mut request = http::Request::builder()
        .method(method)
        .uri(format!("http://{outbound}{path}"))
        .header("host", host);
    let body = if method == "POST" {
        request = request.header("content-type", "application/json");
        Bytes::from_static(b"{\"item\":\"book\"}")
    } else {
        Bytes::new()
    };
    let response = client.request(request.body(Full::new(body))?).await?;
    let status = response.status().as_u16();
    let peer = response
        .headers()
        .get("x-peer-identity")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = response.into_body().collect().await?.to_bytes();
    Ok(Answer {
        status,
        peer,
        body: String::from_utf8_lossy(&body).trim().to_string(),
    })
}

async fn apply(client: &mut Client, path: &Path) -> anyhow::Result<u64> {
    let docs = lacewing_mesh::parse_file(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let applied = client.apply(docs, base).await?;
    let done = client
        .wait(applied.version, Duration::from_secs(60), |_| {})
        .await?;
    println!(
        "lacewing apply -f {} --wait  ->  version {}: {}/{} sidecars ACKed ({} document(s) changed)",
        path.file_name().unwrap_or_default().to_string_lossy(),
        applied.version,
        done.acked,
        done.total,
        applied.changed.len(),
    );
    if !done.nacked.is_empty() {
        anyhow::bail!(
            "sidecars refused version {}: {:?}",
            applied.version,
            done.nacked
        );
    }
    Ok(applied.version)
}

async fn get_text(client: &HttpClient, url: &str) -> anyhow::Result<String> {
    let response = client
        .request(http::Request::get(url).body(Full::new(Bytes::new()))?)
        .await?;
    let body = response.into_body().collect().await?.to_bytes();
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// Runs the mesh demo until its script ends and, with `duration`, for that
/// long with steady traffic; Ctrl-C stops it at any point, cleanly. `app`
/// starts a demo service answering with its name.
pub async fn run<F, Fut>(duration: Option<Duration>, app: F) -> anyhow::Result<()>
where
    F: Fn(&'static str) -> Fut,
    Fut: Future<Output = anyhow::Result<SocketAddr>>,
{
    let state = std::env::temp_dir().join(format!("lacewing-demo-{}", std::process::id()));
    let plane = ControlPlane::bind("127.0.0.1:0".parse()?, &state.join("control")).await?;
    let control = plane.local_addr()?.to_string();
    let (stop_plane, stopped) = tokio::sync::oneshot::channel::<()>();
    let serving = tokio::spawn(plane.serve(async {
        let _ = stopped.await;
    }));
    let token = |name: &str| lacewing_control::token::read(&state.join("control").join(name));
    let trust = lacewing_tls::api::ApiTrust::from_file(&state.join("control/ca.pem"))?;
    println!();
    println!(
        "== The mesh: control plane {control} (embedded store in {}) ==",
        state.join("control").display()
    );

    let mut handles = Vec::new();
    let mut agents = Vec::new();
    let mut members = Vec::new();
    for service in ["frontend", "orders", "payments"] {
        let app_addr = app(service).await?;
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let options = sidecar::options(
            &control,
            token(lacewing_control::BOOTSTRAP_TOKEN)?,
            trust.clone(),
            service,
            [any, app_addr, any],
            Placement {
                namespace: "default".into(),
                node_id: Some(service.to_string()),
                state_dir: Some(state.join(service)),
                admin: Some(any),
                workers: 1,
            },
        )?;
        let started = tokio::task::spawn_blocking(move || sidecar::start(options, None)).await??;
        let spec = started.spec.clone();
        let admin = started.handle.admin_addr();
        println!(
            "sidecar {:<9} inbound {}  outbound {}  admin {}  app {}",
            spec.service,
            spec.inbound,
            spec.outbound,
            admin.map_or_else(|| "-".into(), |a| a.to_string()),
            spec.app
        );
        members.push(Member {
            service,
            outbound: spec.outbound,
            inbound: spec.inbound,
            admin,
        });
        agents.push(tokio::spawn(started.agent.run()));
        handles.push(started.handle);
    }

    let script = script(&control, &state, &members, duration, token);
    let result = tokio::select! {
        result = script => result,
        _ = tokio::signal::ctrl_c() => {
            println!();
            println!("interrupted: stopping the mesh");
            Ok(())
        }
    };

    // Agents first, so none publishes into a sidecar that is stopping.
    for agent in agents {
        agent.abort();
    }
    tokio::task::spawn_blocking(move || handles.into_iter().for_each(|h| h.shutdown())).await?;
    let _ = stop_plane.send(());
    let _ = serving.await;
    let _ = std::fs::remove_dir_all(&state);
    println!("mesh stopped");
    result
}

async fn script(
    control: &str,
    state: &Path,
    members: &[Member],
    duration: Option<Duration>,
    token: impl Fn(&str) -> std::io::Result<String>,
) -> anyhow::Result<()> {
    let member = |service: &str| {
        members
            .iter()
            .find(|m| m.service == service)
            .context("demo sidecar")
    };
    let trust = lacewing_tls::api::ApiTrust::from_file(&state.join("control/ca.pem"))?;
    let mut client =
        Client::connect(control, &token(lacewing_control::OPERATOR_TOKEN)?, &trust).await?;
    for _ in 0..200 {
        let status = client.status().await?;
        if status.sidecars.iter().filter(|s| s.connected).count() == members.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mesh = state.join("mesh.yaml");
    std::fs::write(&mesh, MESH_YAML)?;
    println!();
    apply(&mut client, &mesh).await?;
    let http: HttpClient =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();

    println!();
    println!(
        "calls between the services (each app calls through its own sidecar's outbound listener):"
    );
    let calls = [
        ("frontend", "orders", "GET", "/api/orders/42"),
        ("frontend", "orders", "POST", "/api/orders"),
        ("payments", "orders", "GET", "/api/orders/42"),
        ("orders", "payments", "POST", "/charge"),
        ("frontend", "payments", "POST", "/charge"),
    ];
    for (from, to, method, path) in calls {
        show_call(&http, member(from)?.outbound, from, to, method, path).await?;
    }

    println!();
    let orders = member("orders")?;
    print!(
        "a plaintext caller straight to orders' inbound {} (MeshTLS STRICT): ",
        orders.inbound
    );
    match call(&http, orders.inbound, "orders", "GET", "/api/orders/42").await {
        Ok(answer) => println!("answered {} (not expected under STRICT)", answer.status),
        Err(e) => println!("refused ({})", error_chain(&e)),
    }

    println!();
    println!("policy and golden metrics on orders' sidecar (its /metrics):");
    if let Some(admin) = orders.admin {
        show_metrics(&get_text(&http, &format!("http://{admin}/metrics")).await?);
    }

    println!();
    println!(
        "hot reload under load: frontend may now also create orders (TrafficTarget frontend-to-orders: matches [read] -> [read, write])"
    );
    let frontend = member("frontend")?.outbound;
    let load = Load::start(&http, frontend, 4);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let changed = MESH_YAML.replacen(POLICY_BEFORE, POLICY_AFTER, 1);
    anyhow::ensure!(
        changed != MESH_YAML,
        "examples/mesh.yaml no longer has the demo's rule"
    );
    std::fs::write(&mesh, changed)?;
    apply(&mut client, &mesh).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (ok, failed) = load.stop().await;
    println!(
        "  during the reload: {} calls from frontend to orders: {ok} ok, {failed} failed",
        ok + failed
    );
    show_call(&http, frontend, "frontend", "orders", "POST", "/api/orders").await?;

    println!();
    println!("lacewing status:");
    crate::mesh::print_status(&client.status().await?);

    if let Some(duration) = duration {
        println!();
        println!(
            "steady traffic frontend -> orders for {}s (Ctrl-C stops):",
            duration.as_secs()
        );
        let load = Load::start(&http, frontend, 2);
        let end = Instant::now() + duration;
        while Instant::now() < end {
            tokio::time::sleep(Duration::from_secs(2).min(end - Instant::now())).await;
            println!(
                "  {} requests, {} failed",
                load.ok.load(Ordering::Relaxed),
                load.failed.load(Ordering::Relaxed)
            );
        }
        load.stop().await;
    }
    Ok(())
}

async fn show_call(
    http: &HttpClient,
    outbound: SocketAddr,
    from: &str,
    to: &str,
    method: &str,
    path: &str,
) -> anyhow::Result<()> {
    let answer = call(http, outbound, to, method, path).await?;
    let detail = match (answer.status, &answer.peer) {
        (200, Some(peer)) => format!("allowed; {to} saw mTLS peer {peer}"),
        (200, None) => "allowed".to_string(),
        (_, _) => answer.body.lines().next().unwrap_or("").to_string(),
    };
    println!(
        "  {from:<8} -> {to:<8} {method:<4} {path:<15} {}  {detail}",
        answer.status
    );
    Ok(())
}

fn show_metrics(text: &str) {
    let wanted = |line: &str| {
        line.starts_with("lacewing_wasm_plugin_counter")
            && (line.contains("authz_allowed") || line.contains("authz_denied"))
            || line.starts_with("lacewing_wasm_plugin_counter")
                && line.contains("telemetry_responses")
            || line.starts_with("lacewing_downstream_tls_handshakes_total")
    };
    for line in text.lines().filter(|l| wanted(l) && !l.ends_with(" 0")) {
        println!("  {line}");
    }
}

fn error_chain(e: &anyhow::Error) -> String {
    e.chain()
        .map(|c| c.to_string())
        .collect::<Vec<_>>()
        .join(": ")
}

/// Steady GETs from frontend to orders, counted.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(http: &HttpClient, outbound: SocketAddr, connections: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let tasks = (0..connections)
            .map(|_| {
                let (http, stop, ok, failed) =
                    (http.clone(), stop.clone(), ok.clone(), failed.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        match call(&http, outbound, "orders", "GET", "/api/orders/42").await {
                            Ok(answer) if answer.status == 200 => {
                                ok.fetch_add(1, Ordering::Relaxed)
                            }
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        Self {
            stop,
            ok,
            failed,
            tasks,
        }
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            let _ = task.await;
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
