//! The `lacewing` command: runs the sidecar proxy, validates configuration
//! files, and runs a self-contained demo on loopback.

mod alloc;
mod control;
mod demo;
mod demo_mesh;
mod mesh;
mod root;
mod sidecar;
mod token;
mod watch;

/// mimalloc: the proxy allocates many small, short-lived objects per request
/// across worker threads; measured faster than the system allocator here.
#[global_allocator]
static ALLOCATOR: alloc::MiMalloc = alloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{ArgMatches, CommandFactory, FromArgMatches, Parser, Subcommand};
use lacewing_config::quickstart::{QuickStart, WasmFlag, parse_cluster_flag};
use lacewing_config::{ProxyConfig, UpstreamProtocol, units::Dur};
use lacewing_proxy::{Proxy, Publisher, StartOptions};

#[derive(Debug, Parser)]
#[command(
    name = "lacewing",
    version,
    about = "A WebAssembly-extensible service-mesh sidecar proxy"
)]
struct Cli {
    /// Log filter, e.g. `info`, `lacewing_wasm=debug`.
    #[arg(long, global = true, env = "LACEWING_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the proxy, from a config file or from flags.
    Proxy(Box<ProxyArgs>),
    /// Check a config file; prints every problem with file, line and field.
    Validate {
        /// The YAML config file.
        file: PathBuf,
    },
    /// Start demo services and a proxy with a filter on loopback, send
    /// requests through it and show what they did.
    Demo(demo::DemoArgs),
    /// Run the control plane.
    Control(control::ControlArgs),
    /// Validate a mesh file, upload its modules and store it as a new version.
    Apply(mesh::ApplyArgs),
    /// Delete the documents of a mesh file from the control plane.
    Delete(mesh::DeleteArgs),
    /// Show stored mesh documents.
    Get(mesh::GetArgs),
    /// Show every sidecar: service, addresses, version, last ACK/NACK.
    Status(mesh::StatusArgs),
    /// Rotate the mesh root, both roots trusted during the overlap.
    Root(root::RootArgs),
    /// Create a one-time join token for a sidecar of one service.
    Token(token::TokenArgs),
}

#[derive(Debug, Clone, clap::Args)]
struct ProxyArgs {
    /// YAML config file (see docs/config.md).
    #[arg(long, short = 'c', conflicts_with_all = ["listen", "upstream"])]
    config: Option<PathBuf>,
    /// Also reload the config file when its content changes (looked at every
    /// second), as SIGHUP does.
    #[arg(long, requires = "config")]
    watch: bool,
    /// Quick start: address to listen on.
    #[arg(long, requires = "upstream")]
    listen: Option<SocketAddr>,
    /// Quick start: upstream endpoint HOST:PORT (repeat for more).
    #[arg(long)]
    upstream: Vec<String>,
    /// Quick start: speak HTTP/2 (h2c) to the upstream, e.g. for gRPC.
    #[arg(long)]
    upstream_h2: bool,
    /// Quick start: a proxy-wasm module to run on every request (repeat to chain).
    #[arg(long)]
    wasm: Vec<String>,
    /// Configuration of the `--wasm` before it: a string, or @FILE.
    #[arg(long)]
    wasm_config: Vec<String>,
    /// Root id of the `--wasm` before it (Envoy's root_id).
    #[arg(long)]
    wasm_root_id: Vec<String>,
    /// Quick start: a named cluster filters may call, NAME=HOST:PORT (repeatable).
    #[arg(long)]
    cluster: Vec<String>,
    /// Admin listener address (quick start; overrides the file's).
    #[arg(long)]
    admin: Option<SocketAddr>,
    /// Worker threads (default: one per core; overrides the file's).
    #[arg(long)]
    workers: Option<usize>,
    /// Write a JSON access log line per request to stdout.
    #[arg(long)]
    access_log: bool,
    /// Time in-flight requests get after SIGTERM, e.g. 10s (overrides the file's).
    #[arg(long)]
    drain_timeout: Option<String>,
    /// Directory for compiled wasm modules.
    #[arg(long, env = "LACEWING_CACHE_DIR")]
    wasm_cache_dir: Option<PathBuf>,
    #[command(flatten)]
    sidecar: sidecar::SidecarFlags,
}

fn main() -> std::process::ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    init_logging(&cli.log);
    let result = match &cli.command {
        Command::Proxy(args) => {
            let sub = matches.subcommand_matches("proxy");
            run_proxy(args, sub)
        }
        Command::Validate { file } => validate(file),
        Command::Demo(args) => demo::run(args),
        Command::Control(args) => control::run(args),
        Command::Apply(args) => mesh::apply(args),
        Command::Delete(args) => mesh::delete(args),
        Command::Get(args) => mesh::get(args),
        Command::Status(args) => mesh::status(args),
        Command::Root(args) => root::run(args),
        Command::Token(args) => token::run(args),
    };
    lacewing_wasm::plugin_log::flush(std::time::Duration::from_secs(1));
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        // Colours only on a terminal: a log file stays greppable as `key=value`.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
    queue_plugin_lines();
}

/// Plugin log lines (an access-log line per request, for one) go to stderr
/// through a queue: the worker formats the line and its writer thread makes
/// the system call. Other log lines are written as they come.
fn queue_plugin_lines() {
    use lacewing_wasm::LogLevel;
    use lacewing_wasm::plugin_log::TARGET;
    use tracing::Level;
    let queue = lacewing_core::line_queue::LineQueue::spawn(
        "plugin-log",
        Box::new(std::io::stderr()),
        PLUGIN_LOG_QUEUE_LINES,
        // Nothing better can be done with a line stderr refused.
        |_| {},
    );
    let queue = match queue {
        Ok(queue) => queue,
        Err(e) => {
            tracing::warn!("plugin log lines are written as they come: {e}");
            return;
        }
    };
    // The filter is asked once per level: plugin lines then skip `tracing`.
    lacewing_wasm::plugin_log::queue_plugin_lines(queue, |level| match level {
        LogLevel::Trace => tracing::enabled!(target: TARGET, Level::TRACE),
        LogLevel::Debug => tracing::enabled!(target: TARGET, Level::DEBUG),
        LogLevel::Info => tracing::enabled!(target: TARGET, Level::INFO),
        LogLevel::Warn => tracing::enabled!(target: TARGET, Level::WARN),
        LogLevel::Error | LogLevel::Critical => tracing::enabled!(target: TARGET, Level::ERROR),
    });
}

/// Plugin log lines that may wait for the writer; beyond, lines are dropped
/// and counted in `lacewing_wasm_log_lines_dropped_total`.
const PLUGIN_LOG_QUEUE_LINES: usize = 8192;

fn validate(file: &std::path::Path) -> anyhow::Result<()> {
    lacewing_config::load::from_file(file).map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{}: ok", file.display());
    Ok(())
}

/// Pairs each `--wasm-config` / `--wasm-root-id` with the `--wasm` before it.
fn wasm_flags(args: &ProxyArgs, matches: Option<&ArgMatches>) -> anyhow::Result<Vec<WasmFlag>> {
    let mut flags: Vec<WasmFlag> = args
        .wasm
        .iter()
        .map(|path| WasmFlag {
            path: path.clone(),
            config: None,
            root_id: None,
        })
        .collect();
    let Some(m) = matches else { return Ok(flags) };
    let wasm_at: Vec<usize> = m
        .indices_of("wasm")
        .map(|i| i.collect())
        .unwrap_or_default();
    let owner = |index: usize, flag: &str| -> anyhow::Result<usize> {
        wasm_at
            .iter()
            .rposition(|&w| w < index)
            .with_context(|| format!("--{flag} must follow the --wasm it belongs to"))
    };
    for (value, index) in args
        .wasm_config
        .iter()
        .zip(m.indices_of("wasm_config").into_iter().flatten())
    {
        let i = owner(index, "wasm-config")?;
        if flags[i].config.replace(value.clone()).is_some() {
            bail!("--wasm {} has two --wasm-config values", flags[i].path);
        }
    }
    for (value, index) in args
        .wasm_root_id
        .iter()
        .zip(m.indices_of("wasm_root_id").into_iter().flatten())
    {
        let i = owner(index, "wasm-root-id")?;
        if flags[i].root_id.replace(value.clone()).is_some() {
            bail!("--wasm {} has two --wasm-root-id values", flags[i].path);
        }
    }
    Ok(flags)
}

fn proxy_config(args: &ProxyArgs, matches: Option<&ArgMatches>) -> anyhow::Result<ProxyConfig> {
    let mut config = if let Some(file) = &args.config {
        lacewing_config::load::from_file(file).map_err(|e| anyhow::anyhow!("{e}"))?
    } else {
        let Some(listen) = args.listen else {
            bail!("give --config FILE, or --listen ADDR with --upstream HOST:PORT");
        };
        let clusters = args
            .cluster
            .iter()
            .map(|c| parse_cluster_flag(c).map_err(|e| anyhow::anyhow!("{e}")))
            .collect::<anyhow::Result<_>>()?;
        QuickStart {
            listen,
            upstreams: args.upstream.clone(),
            upstream_protocol: if args.upstream_h2 {
                UpstreamProtocol::H2
            } else {
                UpstreamProtocol::Http1
            },
            wasm: wasm_flags(args, matches)?,
            clusters,
            admin: args.admin,
            workers: args.workers.unwrap_or(0),
            access_log: args.access_log,
        }
        .into_config()
        .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    if let Some(admin) = args.admin {
        config.admin.address = Some(admin);
    }
    if let Some(workers) = args.workers {
        config.workers = workers;
    }
    if let Some(t) = &args.drain_timeout {
        config.drain_timeout = Dur::parse(t).context("--drain-timeout")?;
    }
    if args.access_log && config.access_log.is_none() {
        config.access_log = Some(lacewing_config::AccessLogConfig {
            path: "stdout".into(),
        });
    }
    Ok(config)
}

fn run_proxy(args: &ProxyArgs, matches: Option<&ArgMatches>) -> anyhow::Result<()> {
    if args.sidecar.control.is_some() {
        return sidecar::run(
            &args.sidecar,
            args.admin,
            args.workers,
            args.wasm_cache_dir.clone(),
        );
    }
    // Read before the configuration, so a change made while starting is seen.
    let watched = args
        .config
        .as_ref()
        .filter(|_| args.watch)
        .map(|file| (file.clone(), std::fs::read(file).ok()));
    let config = proxy_config(args, matches)?;
    let signals = Signals::install()?;
    let workers = config.worker_count();
    let source = match &args.config {
        Some(file) => format!("file:{}", file.display()),
        None => "flags".to_string(),
    };
    let handle = Proxy::start_with(
        config,
        StartOptions {
            wasm_cache_dir: args.wasm_cache_dir.clone(),
            source: Some(source.clone()),
            identity: None,
        },
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    if let Some(admin) = handle.admin_addr() {
        tracing::info!(%admin, "admin listening");
    }
    tracing::info!(workers, "lacewing started");
    let reloader = std::sync::Arc::new(Reloader {
        publisher: handle.publisher(),
        args: args.clone(),
        matches: matches.cloned(),
        source,
        one_at_a_time: std::sync::Mutex::new(()),
    });
    let stop_watching = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Some((file, seen)) = watched {
        let reloader = reloader.clone();
        let publisher = handle.publisher();
        let identity_files = move || {
            publisher
                .config()
                .and_then(|c| c.tls.clone())
                .map(|t| vec![t.cert_file, t.key_file, t.trust_file])
                .unwrap_or_default()
        };
        watch::spawn(
            file,
            seen,
            stop_watching.clone(),
            identity_files,
            move || {
                reloader.reload("file change");
            },
        )
        .context("cannot start the file watcher")?;
    }
    signals.wait(move || reloader.reload("SIGHUP"))?;
    stop_watching.store(true, std::sync::atomic::Ordering::Relaxed);
    tracing::info!("draining");
    handle.shutdown();
    tracing::info!("stopped");
    Ok(())
}

/// Reloads the configuration file, on SIGHUP or (with `--watch`) when it changes.
struct Reloader {
    publisher: Publisher,
    args: ProxyArgs,
    matches: Option<ArgMatches>,
    source: String,
    /// A SIGHUP and a file change at once reload one after the other, so an
    /// older read of the file is never published after a newer one.
    one_at_a_time: std::sync::Mutex<()>,
}

impl Reloader {
    /// Reads the file again and publishes it. A file that does not load, or
    /// a generation that does not build, is logged with its reason and the
    /// live generation stays. `trigger` names what asked for it in the log.
    fn reload(&self, trigger: &str) {
        let _one = self.one_at_a_time.lock().unwrap_or_else(|p| p.into_inner());
        let source = &self.source;
        if self.args.config.is_none() {
            tracing::warn!("{trigger}: started from flags, there is no file to reload");
            return;
        }
        match proxy_config(&self.args, self.matches.as_ref()) {
            Ok(config) => {
                // A rejected generation is logged, with its reason, by the publisher.
                if let Ok(generation) = self.publisher.publish(config, source) {
                    tracing::info!(generation = generation.number, %source, "{trigger}: configuration reloaded");
                }
            }
            Err(e) => self.publisher.reload_failed(source, &format_args!("{e:#}")),
        }
    }
}

/// What SIGHUP runs once the proxy is up.
type Reload = std::sync::Arc<dyn Fn() + Send + Sync>;

/// The process's signal handlers, installed before anything starts serving:
/// a SIGHUP or SIGTERM that arrives while the proxy starts must not meet the
/// default action (which ends the process).
pub(crate) struct Signals {
    reload: std::sync::mpsc::Sender<Reload>,
    stopped: std::sync::mpsc::Receiver<anyhow::Result<()>>,
}

impl Signals {
    /// Installs the handlers on a thread of their own; returns once they are in place.
    pub(crate) fn install() -> anyhow::Result<Self> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
        let (reload_tx, reload_rx) = std::sync::mpsc::channel::<Reload>();
        let (stopped_tx, stopped_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("lacewing-signals".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::from(e)));
                        return;
                    }
                };
                rt.block_on(async move {
                    use tokio::signal::unix::{SignalKind, signal};
                    let (mut term, mut int, mut hup) = match (
                        signal(SignalKind::terminate()),
                        signal(SignalKind::interrupt()),
                        signal(SignalKind::hangup()),
                    ) {
                        (Ok(t), Ok(i), Ok(h)) => (t, i, h),
                        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => {
                            let _ = ready_tx.send(Err(e.into()));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let mut reload: Option<Reload> = None;
                    loop {
                        tokio::select! {
                            _ = term.recv() => break,
                            _ = int.recv() => break,
                            _ = hup.recv() => {
                                if reload.is_none() {
                                    reload = reload_rx.try_recv().ok();
                                }
                                let Some(reload) = reload.clone() else {
                                    tracing::warn!("SIGHUP while starting: ignored");
                                    continue;
                                };
                                // Publishing blocks until every worker answered.
                                if let Err(e) = tokio::task::spawn_blocking(move || reload()).await {
                                    tracing::error!(error = %e, "SIGHUP: reload failed");
                                }
                            }
                        }
                    }
                    let _ = stopped_tx.send(Ok(()));
                    tokio::select! {
                        _ = term.recv() => {}
                        _ = int.recv() => {}
                    }
                    eprintln!("second signal: exiting without waiting for the drain");
                    std::process::exit(130);
                });
            })?;
        ready_rx.recv().context("signal thread ended")??;
        Ok(Self {
            reload: reload_tx,
            stopped: stopped_rx,
        })
    }

    /// Blocks until SIGTERM or SIGINT; each SIGHUP from now on runs `reload`
    /// (one at a time, off the signal loop). A second SIGTERM or SIGINT while
    /// draining exits at once.
    pub(crate) fn wait(self, reload: impl Fn() + Send + Sync + 'static) -> anyhow::Result<()> {
        let _ = self.reload.send(std::sync::Arc::new(reload));
        self.stopped.recv().context("signal thread ended")?
    }
}
