//! `lacewing demo`: first a standalone proxy (a config file, a proxy-wasm
//! filter, demo services on loopback), then the whole mesh (see `demo_mesh`).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};

/// Flags of `lacewing demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// The header-echo filter module; the demo runs without a filter when absent.
    #[arg(long, default_value = "target/wasm32-wasip1/wasm/header_echo.wasm")]
    filter: PathBuf,
    /// After the script, keep traffic flowing through the mesh this many
    /// seconds, printing counts (Ctrl-C stops at any point).
    #[arg(long, value_name = "SECONDS")]
    duration: Option<u64>,
}

/// Starts a demo service that answers with its name and what it received.
async fn service(name: &'static str) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let svc = service_fn(
                    move |req: http::Request<hyper::body::Incoming>| async move {
                        let body = serde_json::json!({
                            "service": name,
                            "method": req.method().as_str(),
                            "path": req.uri().path(),
                            "x-request-id": req.headers().get("x-request-id").and_then(|v| v.to_str().ok()),
                            "x-forwarded-for": req.headers().get("x-forwarded-for").and_then(|v| v.to_str().ok()),
                        });
                        let mut resp =
                            http::Response::new(Full::new(Bytes::from(body.to_string() + "\n")));
                        resp.headers_mut().insert(
                            "content-type",
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(resp)
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn get(url: &str) -> anyhow::Result<(http::StatusCode, http::HeaderMap, String)> {
    let client = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
        .build_http::<Full<Bytes>>();
    let resp = client
        .get(url.parse().context("demo url")?)
        .await
        .with_context(|| format!("GET {url}"))?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&body).into_owned(),
    ))
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: &DemoArgs) -> anyhow::Result<()> {
    let orders_a = service("orders-a").await?;
    let orders_b = service("orders-b").await?;
    let users = service("users").await?;
    let filter = args
        .filter
        .exists()
        .then(|| args.filter.display().to_string());
    let plugins = match &filter {
        Some(path) => format!(
            "plugins:\n  - name: header-echo\n    module: {path}\n    configuration: \"x-request-id=x-echo-request-id\"\n"
        ),
        None => String::new(),
    };
    let filters = if filter.is_some() {
        "[header-echo]"
    } else {
        "[]"
    };
    let yaml = format!(
        r#"admin: {{ address: "127.0.0.1:0" }}
workers: 1
listeners:
  - name: ingress
    address: "127.0.0.1:0"
    filters: {filters}
    routes:
      - {{ name: orders, match: {{ path: {{ prefix: /orders }} }}, cluster: orders }}
      - {{ name: users, match: {{ path: {{ prefix: /users }}, method: GET }}, cluster: users }}
clusters:
  - {{ name: orders, endpoints: ["{orders_a}", "{orders_b}"], lb: round_robin }}
  - {{ name: users, endpoints: ["{users}"] }}
{plugins}"#
    );
    let config = lacewing_config::load::from_yaml_str(&yaml, "demo.yaml")
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let handle = tokio::task::spawn_blocking(move || lacewing_proxy::Proxy::start(config))
        .await?
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let proxy = handle
        .listener_addr("ingress")
        .context("ingress listener")?;
    let admin = handle.admin_addr().context("admin listener")?;

    println!("== Lacewing demo ==");
    println!("services : orders-a {orders_a}, orders-b {orders_b}, users {users}");
    println!("proxy    : http://{proxy}   admin: http://{admin}");
    match &filter {
        Some(p) => {
            println!("filter   : header-echo ({p}) copies x-request-id into x-echo-request-id")
        }
        None => println!(
            "filter   : none ({} not built; `cargo xtask demo` builds it)",
            args.filter.display()
        ),
    }
    println!();
    for path in ["/orders/1", "/orders/2", "/users/7", "/nowhere"] {
        let (status, headers, body) = get(&format!("http://{proxy}{path}")).await?;
        let echo = headers
            .get("x-echo-request-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-");
        println!("GET {path:<10} -> {status}  x-echo-request-id: {echo}");
        println!("    {}", body.trim());
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (_, _, metrics) = get(&format!("http://{admin}/metrics")).await?;
    println!();
    println!("== metrics (from http://{admin}/metrics) ==");
    for line in metrics.lines().filter(|l| !l.ends_with(" 0")).filter(|l| {
        l.starts_with("lacewing_http_requests_total")
            || l.starts_with("lacewing_http_local_replies_total")
            || l.starts_with("lacewing_wasm_callbacks_total")
    }) {
        println!("{line}");
    }
    tokio::task::spawn_blocking(move || handle.shutdown()).await?;
    crate::demo_mesh::run(args.duration.map(Duration::from_secs), service).await
}
