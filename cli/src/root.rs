//! `lacewing root`: rotates the mesh root (`rotate`, `finish`) and shows
//! where a rotation stands (`status`).

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
    /// End the overlap now: the old root leaves the bundle as soon as every
    /// sidecar holds a certificate of the new one.
    Finish {
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
}
