//! The operator commands: `lacewing apply`, `delete`, `get` and `status`
//! (`lacewing root` is in [`crate::root`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use lacewing_control::client::{Applied, Client, ClientError};
use lacewing_control_api as api;

/// How to reach the control plane.
#[derive(Debug, Clone, clap::Args)]
pub struct ControlFlags {
    /// The control plane's address, HOST:PORT (or https://HOST:PORT): the
    /// API is served over TLS only.
    #[arg(long, env = "LACEWING_CONTROL", default_value = "127.0.0.1:15010")]
    pub control: String,
    /// The operator token (STATE_DIR/operator.token of `lacewing control`).
    #[arg(long, env = "LACEWING_TOKEN_FILE")]
    pub token_file: PathBuf,
    /// The CA certificate (PEM) the control plane's certificate must chain
    /// to; default: ca.pem beside the token file.
    #[arg(long, env = "LACEWING_CA_FILE")]
    pub ca_file: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ApplyArgs {
    /// The mesh file (several documents separated by `---`).
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    #[command(flatten)]
    pub flags: ControlFlags,
    /// Return when every connected sidecar ACKed the new version (or report
    /// those that NACKed or did not answer).
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, e.g. 30s.
    #[arg(long, default_value = "30s")]
    pub timeout: String,
}

#[derive(Debug, clap::Args)]
pub struct DeleteArgs {
    /// Deletes every document (kind, namespace, name) of this file.
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    #[command(flatten)]
    pub flags: ControlFlags,
}

#[derive(Debug, clap::Args)]
pub struct GetArgs {
    /// Service, WasmPlugin, MeshTLS, TrafficSplit, TrafficTarget, HTTPRouteGroup, or `all`.
    pub kind: String,
    pub name: Option<String>,
    #[arg(long, short = 'n')]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub flags: ControlFlags,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub flags: ControlFlags,
}

pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

pub(crate) async fn connect(flags: &ControlFlags) -> anyhow::Result<Client> {
    let token = lacewing_control::token::read(&flags.token_file)
        .with_context(|| format!("token file {}", flags.token_file.display()))?;
    let trust =
        lacewing_control::client::trust_beside(&flags.token_file, flags.ca_file.as_deref())?;
    Ok(Client::connect(&flags.control, &token, &trust).await?)
}

/// Mesh errors are printed as they are: one located line per problem.
fn plain(e: ClientError) -> anyhow::Error {
    anyhow::anyhow!("{e}")
}

fn parse(file: &Path) -> anyhow::Result<Vec<lacewing_mesh::ParsedDocument>> {
    lacewing_mesh::parse_file(file).map_err(|e| anyhow::anyhow!("{e}"))
}

fn summary(what: &str, applied: &Applied) -> String {
    let mut text = format!(
        "{what}: version {} ({} changed, {} unchanged",
        applied.version,
        applied.changed.len(),
        applied.unchanged.len()
    );
    if !applied.uploaded.is_empty() {
        text.push_str(&format!("; {} module(s) uploaded", applied.uploaded.len()));
    }
    text.push(')');
    text
}

pub fn apply(args: &ApplyArgs) -> anyhow::Result<()> {
    let docs = parse(&args.file)?;
    let timeout = lacewing_config::units::Dur::parse(&args.timeout)
        .context("--timeout")?
        .0;
    let base = args
        .file
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    runtime()?.block_on(async {
        let mut client = connect(&args.flags).await?;
        let applied = client.apply(docs, &base).await.map_err(plain)?;
        println!("{}", summary("applied", &applied));
        for key in &applied.changed {
            println!("  changed {key}");
        }
        if args.wait {
            wait(&mut client, applied.version, timeout).await?;
        }
        Ok(())
    })
}

async fn wait(client: &mut Client, version: u64, timeout: Duration) -> anyhow::Result<()> {
    let last = client
        .wait(version, timeout, |p| {
            if !p.done {
                eprintln!(
                    "waiting for version {}: {}/{} sidecars ACKed, {} NACKed",
                    p.version,
                    p.acked,
                    p.total,
                    p.nacked.len()
                );
            }
        })
        .await
        .map_err(plain)?;
    println!(
        "version {}: {}/{} sidecars ACKed",
        last.version, last.acked, last.total
    );
    for s in &last.nacked {
        println!("  NACK {} ({}): {}", s.node_id, s.service, s.nack_reason);
    }
    for s in &last.silent {
        println!(
            "  no answer from {} ({}), last ACKed version {}",
            s.node_id, s.service, s.acked_version
        );
    }
    if !last.nacked.is_empty() || !last.silent.is_empty() {
        bail!(
            "version {version} is not served everywhere: {} NACKed, {} did not answer",
            last.nacked.len(),
            last.silent.len()
        );
    }
    Ok(())
}

pub fn delete(args: &DeleteArgs) -> anyhow::Result<()> {
    let docs = parse(&args.file)?;
    runtime()?.block_on(async {
        let mut client = connect(&args.flags).await?;
        let applied = client.delete(&docs).await.map_err(plain)?;
        println!("{}", summary("deleted", &applied));
        Ok(())
    })
}

pub fn get(args: &GetArgs) -> anyhow::Result<()> {
    let kind = (!args.kind.eq_ignore_ascii_case("all")).then_some(args.kind.as_str());
    if let Some(kind) = kind
        && lacewing_mesh::Kind::parse(kind).is_none()
    {
        bail!("unknown kind `{kind}`");
    }
    runtime()?.block_on(async {
        let mut client = connect(&args.flags).await?;
        let (version, docs) = client
            .get(kind, args.name.as_deref(), args.namespace.as_deref())
            .await
            .map_err(plain)?;
        println!("# mesh version {version}");
        for (doc, written) in docs {
            let value: serde_json::Value = serde_json::from_str(&doc.to_json())?;
            println!("---\n# written at version {written}");
            print!("{}", serde_norway::to_string(&value)?);
        }
        Ok(())
    })
}

fn ago(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let secs = now.saturating_sub(ms) / 1000;
    match secs {
        0..60 => format!("{secs}s ago"),
        60..3600 => format!("{}m{}s ago", secs / 60, secs % 60),
        _ => format!("{}h{}m ago", secs / 3600, secs % 3600 / 60),
    }
}

/// When a certificate expires (Unix ms), from now: `in 23h59m`, or `-`.
pub(crate) fn expires(ms: u64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    if ms <= now {
        return "expired".into();
    }
    let secs = (ms - now) / 1000;
    match secs {
        0..60 => format!("in {secs}s"),
        60..3600 => format!("in {}m{}s", secs / 60, secs % 60),
        _ => format!("in {}h{}m", secs / 3600, secs % 3600 / 60),
    }
}

fn answer(s: &api::SidecarStatus) -> String {
    if s.nacked_version > s.acked_version {
        format!("NACK v{}: {}", s.nacked_version, s.nack_reason)
    } else if s.acked_version > 0 {
        format!("ACK v{}", s.acked_version)
    } else {
        "-".into()
    }
}

pub fn status(args: &StatusArgs) -> anyhow::Result<()> {
    runtime()?.block_on(async {
        let mut client = connect(&args.flags).await?;
        let reply = client.status().await.map_err(plain)?;
        print_status(&reply);
        Ok(())
    })
}

/// The sidecar table of `lacewing status`.
pub fn print_status(reply: &api::StatusReply) {
    println!(
        "mesh version {}, {} sidecar(s)",
        reply.version,
        reply.sidecars.len()
    );
    println!(
        "{:<24} {:<16} {:<22} {:<22} {:<8} {:<14} {:<14} {:<16} LAST ANSWER",
        "NODE", "SERVICE", "INBOUND", "OUTBOUND", "VERSION", "STATE", "SINCE", "CERT EXPIRES"
    );
    for s in &reply.sidecars {
        println!(
            "{:<24} {:<16} {:<22} {:<22} {:<8} {:<14} {:<14} {:<16} {} ({})",
            s.node_id,
            format!("{}/{}", s.namespace, s.service),
            s.inbound,
            s.outbound,
            s.acked_version,
            if s.connected {
                "connected"
            } else {
                "disconnected"
            },
            ago(s.connected_since_ms),
            expires(s.cert_not_after_ms),
            answer(s),
            ago(s.last_answer_ms),
        );
    }
    if let Some(roots) = &reply.roots {
        crate::root::print_rotation(roots);
    }
}
