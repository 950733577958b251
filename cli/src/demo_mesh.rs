//! The mesh part of `lacewing demo`: a control plane, three services with a
//! sidecar each, a mesh file applied, traffic between the services, a plugin
//! swapped live under load, and `lacewing status`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioExecutor;
use lacewing_control::ControlPlane;
use lacewing_control::client::Client;

use crate::sidecar::{self, Placement};

type HttpClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Full<Bytes>,
>;

/// GET / through `outbound` to the service `host`: (status, x-echo-* header, body).
async fn call(
    client: &HttpClient,
    outbound: SocketAddr,
    host: &str,
) -> anyhow::Result<(u16, String, String)> {
    let request = http::Request::get(format!("http://{outbound}/"))
        .header("host", host)
        .header("x-request-id", "demo-1")
        .body(Full::new(Bytes::new()))?;
    let response = client.request(request).await?;
    let status = response.status().as_u16();
    let echo = response
        .headers()
        .iter()
        .find(|(name, _)| name.as_str().starts_with("x-echo-"))
        .map(|(name, _)| name.as_str().to_string())
        .unwrap_or_else(|| "-".into());
    let body = response.into_body().collect().await?.to_bytes();
    Ok((
        status,
        echo,
        String::from_utf8_lossy(&body).trim().to_string(),
    ))
}

fn mesh_file(
    dir: &Path,
    filter: Option<&str>,
    version: &str,
) -> anyhow::Result<std::path::PathBuf> {
    let mut text = String::new();
    for name in ["web", "orders", "users"] {
        text.push_str(&format!(
            "apiVersion: lacewing.dev/v1alpha1\nkind: Service\nmetadata: {{name: {name}}}\nspec:\n  port: 80\n---\n"
        ));
    }
    if let Some(filter) = filter {
        text.push_str(&format!(
            "apiVersion: lacewing.dev/v1alpha1\nkind: WasmPlugin\nmetadata: {{name: echo}}\nspec:\n  module: {filter}\n  selector: {{service: orders}}\n  phase: stats\n  configuration: \"x-request-id=x-echo-{version}\"\n"
        ));
    }
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, text)?;
    Ok(path)
}

async fn apply(client: &mut Client, path: &Path) -> anyhow::Result<u64> {
    let docs = lacewing_mesh::parse_file(path).map_err(|e| anyhow::anyhow!("{e}"))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let applied = client.apply(docs, base).await?;
    let done = client
        .wait(applied.version, Duration::from_secs(30), |_| {})
        .await?;
    println!(
        "lacewing apply -f mesh.yaml --wait  ->  version {}: {}/{} sidecars ACKed",
        applied.version, done.acked, done.total
    );
    Ok(applied.version)
}

/// Runs the mesh demo; `app` starts a demo service answering with its name.
pub async fn run<F, Fut>(filter: Option<&Path>, app: F) -> anyhow::Result<()>
where
    F: Fn(&'static str) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<SocketAddr>>,
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
        "== The mesh: control plane {control}, state {} ==",
        state.display()
    );

    let mut sidecars = Vec::new();
    let mut outbound = std::collections::HashMap::new();
    for (service, app_name) in [
        ("web", "web"),
        ("orders", "orders-1"),
        ("orders", "orders-2"),
        ("users", "users"),
    ] {
        let app_addr = app(app_name).await?;
        let any: SocketAddr = "127.0.0.1:0".parse()?;
        let options = sidecar::options(
            &control,
            token(lacewing_control::BOOTSTRAP_TOKEN)?,
            trust.clone(),
            service,
            [any, app_addr, any],
            Placement {
                namespace: "default".into(),
                node_id: Some(app_name.to_string()),
                state_dir: Some(state.join(app_name)),
                admin: None,
                workers: 1,
            },
        )?;
        let started = tokio::task::spawn_blocking(move || sidecar::start(options, None)).await??;
        let spec = started.spec.clone();
        println!(
            "sidecar {:<9} service {:<7} inbound {}  outbound {}  app {}",
            spec.node_id, spec.service, spec.inbound, spec.outbound, spec.app
        );
        outbound.insert(app_name, spec.outbound);
        tokio::spawn(started.agent.run());
        sidecars.push(started.handle);
    }
    let mut client =
        Client::connect(&control, &token(lacewing_control::OPERATOR_TOKEN)?, &trust).await?;
    for _ in 0..100 {
        if client
            .status()
            .await?
            .sidecars
            .iter()
            .filter(|s| s.connected)
            .count()
            == sidecars.len()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let filter = filter
        .map(std::fs::canonicalize)
        .transpose()?
        .map(|f| f.display().to_string());
    apply(&mut client, &mesh_file(&state, filter.as_deref(), "v1")?).await?;

    let http: HttpClient =
        hyper_util::client::legacy::Client::builder(TokioExecutor::new()).build_http();
    let web = *outbound.get("web").context("web sidecar")?;
    println!();
    println!("web's app calls other services through its sidecar's outbound {web}:");
    for host in ["orders", "orders", "users", "payments"] {
        let (status, echo, body) = call(&http, web, host).await?;
        println!("  Host: {host:<9} -> {status}  {echo:<10} {body}");
    }

    if filter.is_some() {
        println!();
        println!("swapping the orders plugin (x-echo-v1 -> x-echo-v2) live, under load:");
        let stop = Arc::new(AtomicBool::new(false));
        let mut load = Vec::new();
        for _ in 0..4 {
            let (http, stop) = (http.clone(), stop.clone());
            load.push(tokio::spawn(async move {
                let (mut ok, mut failed, mut v1, mut v2) = (0u64, 0u64, 0u64, 0u64);
                while !stop.load(Ordering::Relaxed) {
                    match call(&http, web, "orders").await {
                        Ok((200, echo, _)) => {
                            ok += 1;
                            match echo.as_str() {
                                "x-echo-v1" => v1 += 1,
                                "x-echo-v2" => v2 += 1,
                                _ => {}
                            }
                        }
                        _ => failed += 1,
                    }
                }
                (ok, failed, v1, v2)
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        apply(&mut client, &mesh_file(&state, filter.as_deref(), "v2")?).await?;
        tokio::time::sleep(Duration::from_millis(300)).await;
        stop.store(true, Ordering::Relaxed);
        let (mut ok, mut failed, mut v1, mut v2) = (0, 0, 0, 0);
        for task in load {
            let (a, b, c, d) = task.await?;
            (ok, failed, v1, v2) = (ok + a, failed + b, v1 + c, v2 + d);
        }
        println!("  {ok} requests: {failed} failed; {v1} answered by v1, {v2} by v2");
        let (status, echo, _) = call(&http, web, "orders").await?;
        println!("  now: Host: orders -> {status}  {echo}");
    }

    println!();
    println!("lacewing status:");
    crate::mesh::print_status(&client.status().await?);

    let _ = stop_plane.send(());
    let _ = serving.await;
    tokio::task::spawn_blocking(move || sidecars.into_iter().for_each(|h| h.shutdown())).await?;
    let _ = std::fs::remove_dir_all(&state);
    Ok(())
}
