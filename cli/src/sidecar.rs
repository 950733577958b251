//! `lacewing proxy --control ...`: the sidecar's dynamic mode. The proxy
//! starts from the last good snapshot on disk (or inbound → app alone), then
//! every snapshot from the control plane is published as a new generation.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use lacewing_control_agent::identity::ExpiryCollector;
use lacewing_control_agent::metrics::AgentMetrics;
use lacewing_control_agent::translate::{INBOUND, OUTBOUND, OutboundTcp};
use lacewing_control_agent::{Agent, AgentOptions, Publish, SidecarSpec};
use lacewing_proxy::{Proxy, ProxyHandle, StartOptions};

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
    /// A join token for this service (`lacewing token create --out FILE`),
    /// used once, after which the sidecar authenticates with its workload
    /// certificate; or the shared bootstrap token (STATE_DIR/bootstrap.token
    /// of `lacewing control`).
    #[arg(long)]
    pub token_file: Option<PathBuf>,
    /// The CA certificate (PEM) the control plane's certificate must chain
    /// to; default: ca.pem beside the token file.
    #[arg(long, requires = "control")]
    pub ca_file: Option<PathBuf>,
    /// The time a caller has to complete its TLS handshake on the inbound
    /// listener.
    #[arg(long, default_value = "10s", value_parser = parse_duration, requires = "control")]
    pub tls_handshake_timeout: std::time::Duration,
    /// A `tcp` service the app reaches at ADDRESS through this sidecar
    /// (port 0: any free port); repeat for each service.
    #[arg(long, value_name = "SERVICE[.NAMESPACE]=ADDRESS", requires = "control")]
    pub outbound_tcp: Vec<OutboundTcp>,
    /// The sidecar's name at the control plane (default SERVICE@INBOUND).
    #[arg(long)]
    pub node_id: Option<String>,
    /// Where modules and the last good snapshot are kept
    /// (default $XDG_STATE_HOME/lacewing/NODE, else ~/.local/state/lacewing/NODE).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    lacewing_config::units::Dur::parse(text)
        .map(|d| d.0)
        .map_err(|e| e.to_string())
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

/// A started sidecar: the proxy serving its first generation, and the agent
/// that will keep it in step with the control plane once run.
pub struct Sidecar {
    pub handle: ProxyHandle,
    pub agent: Agent,
    /// Its addresses as bound (a port 0 became a port) and its node id.
    pub spec: SidecarSpec,
    /// The mesh version it started with (0: none saved).
    pub version: u64,
}

/// Starts the proxy from the saved snapshot (or the bootstrap configuration)
/// and prepares its agent. Blocks while the proxy starts. Listeners
/// configured with port 0 keep the port they got: the agent's generations
/// name it, and the control plane learns it from the hello.
pub fn start(
    mut options: AgentOptions,
    wasm_cache_dir: Option<PathBuf>,
) -> anyhow::Result<Sidecar> {
    let (initial, version) = Agent::initial_config(&options).context("sidecar state")?;
    let source = if version > 0 {
        format!("control:{} (saved version {version})", options.control)
    } else {
        "sidecar bootstrap".to_string()
    };
    let handle = Proxy::start_with(
        initial.clone(),
        StartOptions {
            wasm_cache_dir,
            source: Some(source),
            identity: Some(options.identity.clone()),
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let bound = |name: &str| {
        handle
            .listener_addr(name)
            .with_context(|| format!("the `{name}` listener is not bound"))
    };
    options.spec.inbound = bound(INBOUND)?;
    options.spec.outbound = bound(OUTBOUND)?;
    let namespace = options.spec.namespace.clone();
    for target in &mut options.spec.outbound_tcp {
        target.address = bound(&target.listener(&namespace))?;
    }
    if options.spec.node_id.is_empty() {
        options.spec.node_id = format!("{}@{}", options.spec.service, options.spec.inbound);
    }
    let spec = options.spec.clone();
    let metrics = AgentMetrics::register(&handle.metrics().registry)?;
    handle
        .metrics()
        .registry
        .register(Box::new(ExpiryCollector::new(options.identity.clone())?))?;
    let publisher = handle.publisher();
    let source = format!("control:{}", options.control);
    let publish: Publish = Arc::new(move |config| {
        publisher
            .publish(config, source.clone())
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let agent = Agent::new(options, publish, metrics, &initial, version)?;
    Ok(Sidecar {
        handle,
        agent,
        spec,
        version,
    })
}

/// Where a sidecar runs, beyond its service and addresses.
#[derive(Debug, Clone)]
pub struct Placement {
    pub namespace: String,
    /// Default `SERVICE@INBOUND` (the bound address when its port is 0).
    pub node_id: Option<String>,
    /// Default under `$XDG_STATE_HOME/lacewing`.
    pub state_dir: Option<PathBuf>,
    pub admin: Option<SocketAddr>,
    /// 0: one per core.
    pub workers: usize,
}

/// The sidecar's options. An address with port 0 stays so until [`start`]
/// binds it; so does an empty node id.
pub fn options(
    control: &str,
    token: String,
    trust: lacewing_tls::api::ApiTrust,
    service: &str,
    [inbound, app, outbound]: [SocketAddr; 3],
    placement: Placement,
) -> anyhow::Result<AgentOptions> {
    let Placement {
        namespace,
        node_id,
        state_dir,
        admin,
        workers,
    } = placement;
    // With port 0 the default directory is per service: what is kept there
    // (the service's snapshot, modules by sha256) is the same for all of them.
    let state_dir = state_dir.unwrap_or_else(|| {
        default_state_dir(
            node_id
                .as_deref()
                .unwrap_or(&format!("{service}@{inbound}")),
        )
    });
    Ok(AgentOptions {
        control: control.to_string(),
        token,
        trust,
        state_dir,
        identity: lacewing_tls::LiveIdentity::new(),
        spec: SidecarSpec {
            node_id: node_id.unwrap_or_default(),
            service: service.to_string(),
            namespace,
            inbound,
            outbound,
            app,
            admin,
            workers,
            handshake_timeout: lacewing_config::defaults::tls_handshake_timeout().0,
            outbound_tcp: Vec::new(),
        },
    })
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
    let mut names = std::collections::BTreeSet::new();
    for target in &flags.outbound_tcp {
        anyhow::ensure!(
            names.insert(target.listener(&flags.namespace)),
            "--outbound-tcp names {}.{} twice",
            target.service,
            target.namespace(&flags.namespace)
        );
    }
    let token = lacewing_control::token::read(token_file)
        .with_context(|| format!("token file {}", token_file.display()))?;
    let placement = Placement {
        namespace: flags.namespace.clone(),
        node_id: flags.node_id.clone(),
        state_dir: flags.state_dir.clone(),
        admin,
        workers: workers.unwrap_or(0),
    };
    let trust = lacewing_control::client::trust_beside(token_file, flags.ca_file.as_deref())?;
    let mut options = options(
        control,
        token,
        trust,
        service,
        [inbound, app, outbound],
        placement,
    )?;
    options.spec.handshake_timeout = flags.tls_handshake_timeout;
    options.spec.outbound_tcp = flags.outbound_tcp.clone();
    let signals = crate::Signals::install()?;
    let sidecar = start(options, wasm_cache_dir)?;
    let spec = sidecar.spec.clone();
    let admin = sidecar
        .handle
        .admin_addr()
        .map_or_else(|| "none".to_string(), |a| a.to_string());
    // The one line scripts and tests read to learn the addresses: each
    // outbound TCP listener's name followed by its address.
    let tcp: String = spec
        .outbound_tcp
        .iter()
        .map(|t| format!(" {} {}", t.listener(&spec.namespace), t.address))
        .collect();
    println!(
        "sidecar {} inbound {} outbound {} admin {admin} serving version {}{tcp}",
        spec.node_id, spec.inbound, spec.outbound, sidecar.version
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("lacewing-agent")
        .enable_all()
        .build()?;
    runtime.spawn(sidecar.agent.run());
    signals.wait(|| tracing::info!("SIGHUP: configuration comes from the control plane"))?;
    tracing::info!("draining");
    runtime.shutdown_background();
    sidecar.handle.shutdown();
    tracing::info!("stopped");
    Ok(())
}
