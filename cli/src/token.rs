//! `lacewing token create`: a one-time join token for a sidecar of one
//! service, printed or written to a file (0600) with the mesh CA beside it.

use std::path::PathBuf;

use anyhow::Context;

use crate::mesh::ControlFlags;

#[derive(Debug, clap::Args)]
pub struct TokenArgs {
    #[command(subcommand)]
    pub command: TokenCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum TokenCommand {
    /// Create a join token: one sidecar of the service registers with it
    /// once, then authenticates with its workload certificate.
    Create(CreateArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The only service a sidecar joining with the token may register as.
    #[arg(long)]
    pub service: String,
    #[arg(long, default_value = "default")]
    pub namespace: String,
    /// How long the token may be used, e.g. 10m, 1h (at most 30 days).
    #[arg(long, default_value = "1h", value_parser = crate::control::parse_ttl)]
    pub ttl: std::time::Duration,
    /// Write the token to FILE (0600, which must not exist) instead of
    /// printing it, and the CA certificate the control plane was verified
    /// with beside it as ca.pem (unless one is there), for
    /// `lacewing proxy --control ... --token-file FILE`.
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[command(flatten)]
    pub flags: ControlFlags,
}

pub fn run(args: &TokenArgs) -> anyhow::Result<()> {
    let TokenCommand::Create(create) = &args.command;
    if let Some(out) = &create.out
        && out.exists()
    {
        anyhow::bail!("{} exists: a join token goes to a new file", out.display());
    }
    let token = crate::mesh::runtime()?.block_on(async {
        let mut client = crate::mesh::connect(&create.flags).await?;
        client
            .create_join_token(&create.service, &create.namespace, Some(create.ttl))
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))
    })?;
    let expires = crate::mesh::expires(token.expires_ms);
    let Some(out) = &create.out else {
        println!("{}", token.token);
        eprintln!(
            "join token for {} (one use, expires {expires})",
            token.spiffe_id
        );
        return Ok(());
    };
    lacewing_control::token::write_new(out, format!("{}\n", token.token).as_bytes(), 0o600)
        .with_context(|| format!("{}", out.display()))?;
    let ca = out
        .parent()
        .unwrap_or(std::path::Path::new("."))
        .join(lacewing_control::CA_CERT);
    if !ca.exists() {
        let source = create.flags.ca_file.clone().unwrap_or_else(|| {
            create
                .flags
                .token_file
                .parent()
                .unwrap_or(std::path::Path::new("."))
                .join(lacewing_control::CA_CERT)
        });
        std::fs::copy(&source, &ca)
            .with_context(|| format!("copy {} to {}", source.display(), ca.display()))?;
    }
    println!(
        "join token for {} written to {} (one use, expires {expires}); CA certificate {}",
        token.spiffe_id,
        out.display(),
        ca.display()
    );
    Ok(())
}
