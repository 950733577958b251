//! `lacewing root`: rotates the mesh root (`rotate`, `finish`, `forget`)
//! and shows where a rotation stands (`status`).

use std::path::PathBuf;

use anyhow::Context;
use lacewing_control_api as api;

use crate::mesh::ControlFlags;

#[derive(Debug, clap::Args)]
pub struct RootArgs {
    #[command(subcommand)]
    pub command: RootCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum RootCommand {
    /// Start a rotation: a new root (generated, or --cert/--key) joins the
    /// trust bundle; once every sidecar holds the bundle it signs, and the
    /// old root leaves after the overlap.
    Rotate(RotateArgs),
    /// End the overlap now: the old root leaves the bundle as soon as no
    /// sidecar may still present a certificate of it.
    Finish {
        #[command(flatten)]
        flags: ControlFlags,
    },
    /// Forget disconnected sidecars known to be gone for good: a rotation
    /// no longer waits for them (it otherwise does until their certificates
    /// expire). A connected sidecar is refused.
    Forget {
        /// The sidecars, by node (as `lacewing status` lists them).
        #[arg(required = true)]
        nodes: Vec<String>,
        #[command(flatten)]
        flags: ControlFlags,
    },
    /// Show the roots in the bundle, the phase and what it waits for.
    Status {
        #[command(flatten)]
        flags: ControlFlags,
    },
}

#[derive(Debug, clap::Args)]
pub struct RotateArgs {
    /// How long both roots stay trusted after the new one signs, e.g. 1h.
    #[arg(long, default_value = "1h")]
    pub overlap: String,
    /// The new root's certificate (PEM); default: one is generated.
    #[arg(long, requires = "key")]
    pub cert: Option<PathBuf>,
    /// The new root's key (PEM).
    #[arg(long, requires = "cert")]
    pub key: Option<PathBuf>,
    #[command(flatten)]
    pub flags: ControlFlags,
}

pub fn run(args: &RootArgs) -> anyhow::Result<()> {
    let (flags, request) = match &args.command {
        RootCommand::Rotate(rotate) => {
            let overlap = lacewing_config::units::Dur::parse(&rotate.overlap)
                .context("--overlap")?
                .0;
            let read = |path: &Option<PathBuf>| -> anyhow::Result<String> {
                match path {
                    Some(path) => {
                        std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))
                    }
                    None => Ok(String::new()),
                }
            };
            let request = api::RotateRootRequest {
                action: api::rotate_root_request::Action::Start as i32,
                overlap_ms: overlap.as_millis().max(1) as u64,
                root_cert_pem: read(&rotate.cert)?,
                root_key_pem: read(&rotate.key)?,
                node_ids: Vec::new(),
            };
            (&rotate.flags, request)
        }
        RootCommand::Finish { flags } => (
            flags,
            api::RotateRootRequest {
                action: api::rotate_root_request::Action::Finish as i32,
                ..Default::default()
            },
        ),
        RootCommand::Forget { nodes, flags } => (
            flags,
            api::RotateRootRequest {
                action: api::rotate_root_request::Action::Forget as i32,
                node_ids: nodes.clone(),
                ..Default::default()
            },
        ),
        RootCommand::Status { flags } => (flags, api::RotateRootRequest::default()),
    };
    crate::mesh::runtime()?.block_on(async {
        let mut client = crate::mesh::connect(flags).await?;
        let reply = client
            .rotate_root(request)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        print_rotation(&reply);
        Ok(())
    })
}

/// The root lines of `lacewing root` and `lacewing status`.
pub fn print_rotation(rotation: &api::RootRotation) {
    println!(
        "mesh root: {} ({} root(s) in the bundle, the signing one first)",
        rotation.phase,
        rotation.roots.len()
    );
    for root in &rotation.roots {
        println!("  sha256 {root}");
    }
    if rotation.overlap_ends_ms > 0 {
        println!(
            "  overlap ends {}",
            crate::mesh::expires(rotation.overlap_ends_ms)
        );
    }
    if !rotation.waiting_for.is_empty() {
        println!("  waiting for {}", rotation.waiting_for);
    }
    for wait in &rotation.waiting_sidecars {
        let state = if wait.connected {
            "connected"
        } else {
            "disconnected"
        };
        let expiry = match wait.cert_not_after_ms {
            0 => "expiry unknown".to_string(),
            ms => format!("expires {}", crate::mesh::expires(ms)),
        };
        println!("    {} ({state}; certificate {expiry})", wait.node_id);
    }
}
