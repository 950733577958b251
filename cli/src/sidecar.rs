//! `lacewing proxy --control ...`: the sidecar's dynamic mode. The proxy
//! starts from the last good snapshot on disk (or inbound → app alone), then
//! every snapshot from the control plane is published as a new generation.

use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use lacewing_control_agent::metrics::AgentMetrics;
use lacewing_control_agent::{Agent, AgentOptions, Publish, SidecarSpec};
use lacewing_proxy::{Proxy, StartOptions};

/// Flags of the sidecar's dynamic mode (with `--control`).
#[derive(Debug, Clone, clap::Args)]
pub struct SidecarFlags {
    /// Control plane address: run as a sidecar configured by it.
    #[arg(long, conflicts_with_all = ["config", "listen", "upstream", "wasm"], requires_all = ["service", "inbound", "app", "outbound", "token_file"])]
    pub control: Option<String>,
    /// The service this sidecar stands beside.
    #[arg(long)]
    pub service: Option<String>,
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// Where other sidecars reach this service (port 0: any free port).
    #[arg(long)]
    pub inbound: Option<SocketAddr>,
    /// The local app the inbound listener forwards to.
    #[arg(long)]
    pub app: Option<SocketAddr>,
    /// Where the app sends its calls to other services.
    #[arg(long)]
    pub outbound: Option<SocketAddr>,
    /// The bootstrap token (STATE_DIR/bootstrap.token of `lacewing control`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The sidecar's name at the control plane (default SERVICE@INBOUND).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Where modules and the last good snapshot are kept
    /// (default $XDG_STATE_HOME/lacewing/NODE, else ~/.local/state/lacewing/NODE).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// A concrete address for `address`: port 0 becomes a free port now, so that
/// every generation names the same address.
fn concrete(address: SocketAddr) -> anyhow::Result<SocketAddr> {
    if address.port() != 0 {
        return Ok(address);
    }
    Ok(TcpListener::bind(address)?.local_addr()?)
}

fn default_state_dir(node: &str) -> PathBuf {
    let base = std::env::var_os("XDG_STATE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))
        .unwrap_or_else(std::env::temp_dir);
    let safe: String = node
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    base.join("lacewing").join(safe)
}

pub fn run(
    flags: &SidecarFlags,
    admin: Option<SocketAddr>,
    workers: Option<usize>,
    wasm_cache_dir: Option<PathBuf>,
) -> anyhow::Result<()> {
    let (Some(control), Some(service), Some(inbound), Some(app), Some(outbound), Some(token_file)) = (
        &flags.control,
        &flags.service,
        flags.inbound,
        flags.app,
        flags.outbound,
        &flags.token_file,
    ) else {
        anyhow::bail!("--control needs --service, --inbound, --app, --outbound and --token-file");
    };
    let token = lacewing_control::token::read(token_file)
        .with_context(|| format!("token file {}", token_file.display()))?;
    let inbound = concrete(inbound).context("--inbound")?;
    let outbound = concrete(outbound).context("--outbound")?;
    let admin = admin.map(concrete).transpose().context("--admin")?;
    let node_id = flags
        .node_id
        .clone()
        .unwrap_or_else(|| format!("{service}@{inbound}"));
    let options = AgentOptions {
        control: control.clone(),
        token,
        state_dir: flags
            .state_dir
            .clone()
            .unwrap_or_else(|| default_state_dir(&node_id)),
        spec: SidecarSpec {
            node_id: node_id.clone(),
            service: service.clone(),
            namespace: flags.namespace.clone(),
            inbound,
            outbound,
            app,
            admin,
            workers: workers.unwrap_or(0),
        },
    };
    let (initial, version) = Agent::initial_config(&options).context("sidecar state")?;
    let source = if version > 0 {
        format!("control:{control} (saved version {version})")
    } else {
        "sidecar bootstrap".to_string()
    };
    let handle = Proxy::start_with(
        initial.clone(),
        StartOptions {
            wasm_cache_dir,
            source: Some(source),
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let metrics = AgentMetrics::register(&handle.metrics().registry)?;
    let publisher = handle.publisher();
    let source = format!("control:{control}");
    let publish: Publish = Arc::new(move |config| {
        publisher
            .publish(config, source.clone())
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let agent = Agent::new(options, publish, metrics, &initial, version)?;
    // The one line scripts and tests read to learn the addresses.
    let admin = handle
        .admin_addr()
        .map_or_else(|| "none".to_string(), |a| a.to_string());
    println!(
        "sidecar {node_id} inbound {inbound} outbound {outbound} admin {admin} serving version {version}"
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("lacewing-agent")
        .enable_all()
        .build()?;
    runtime.spawn(agent.run());
    crate::wait_for_signal(|| {
        tracing::info!("SIGHUP: configuration comes from the control plane")
    })?;
    tracing::info!("draining");
    runtime.shutdown_background();
    handle.shutdown();
    tracing::info!("stopped");
    Ok(())
}
