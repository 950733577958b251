//! `lacewing control`: runs the control plane until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use lacewing_control::{BOOTSTRAP_TOKEN, ControlPlane, OPERATOR_TOKEN};

#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// Address for the gRPC services and /metrics (TLS only).
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub listen: SocketAddr,
    /// Where the store, the tokens and the mesh CA (ca.pem, ca.key) live
    /// (created 0700 on first start).
    #[arg(long)]
    pub state_dir: PathBuf,
    /// A name (DNS or IP) clients reach the control plane by, added to its
    /// API certificate (which always names localhost, 127.0.0.1, ::1 and the
    /// listen address); repeatable.
    #[arg(long = "server-name")]
    pub server_names: Vec<String>,
    /// The time a client has to complete its TLS handshake with the API.
    #[arg(long, default_value = "10s", value_parser = parse_ttl)]
    pub tls_handshake_timeout: std::time::Duration,
    /// The mesh's trust domain: workload SPIFFE IDs are
    /// spiffe://TRUST_DOMAIN/ns/NAMESPACE/sa/SERVICE.
    #[arg(long, default_value = lacewing_control::ca::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Lifetime of workload certificates (`24h`, `10m`; at least `1m`);
    /// sidecars renew them at two thirds of it.
    #[arg(long, default_value = "24h", value_parser = parse_ttl)]
    pub cert_ttl: std::time::Duration,
    /// A root CA certificate (PEM) to sign with instead of a generated one
    /// (with --ca-key); copied into the state directory.
    #[arg(long, requires = "ca_key")]
    pub ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PEM).
    #[arg(long, requires = "ca_cert")]
    pub ca_key: Option<PathBuf>,
    /// The MeshTLS mode of services no MeshTLS document names.
    #[arg(long, default_value = "PERMISSIVE", value_parser = parse_mode)]
    pub default_tls: lacewing_mesh::kinds::TlsMode,
    /// Refuse the shared bootstrap token: sidecars join only with a
    /// one-time token (`lacewing token create`), then their certificate.
    #[arg(long)]
    pub no_shared_bootstrap: bool,
}

pub(crate) fn parse_ttl(text: &str) -> Result<std::time::Duration, String> {
    lacewing_config::units::Dur::parse(text)
        .map(|d| d.0)
        .map_err(|e| e.to_string())
}

fn parse_mode(text: &str) -> Result<lacewing_mesh::kinds::TlsMode, String> {
    use lacewing_mesh::kinds::TlsMode;
    match text.to_ascii_uppercase().as_str() {
        "STRICT" => Ok(TlsMode::Strict),
        "PERMISSIVE" => Ok(TlsMode::Permissive),
        "DISABLE" => Ok(TlsMode::Disable),
        _ => Err(format!("`{text}` is not STRICT, PERMISSIVE or DISABLE")),
    }
}

pub fn run(args: &ControlArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lacewing-control")
        .build()?;
    runtime.block_on(async {
        let ca = lacewing_control::ca::CaOptions {
            trust_domain: args.trust_domain.clone(),
            lifetime: args.cert_ttl,
            supplied: args.ca_cert.clone().zip(args.ca_key.clone()),
            default_mode: args.default_tls,
            server_names: args.server_names.clone(),
            handshake_timeout: args.tls_handshake_timeout,
        };
        let plane = ControlPlane::bind_with(args.listen, &args.state_dir, &ca)
            .await
            .context("control plane")?
            .with_shared_bootstrap(!args.no_shared_bootstrap);
        let address = plane.local_addr()?;
        tracing::info!(
            %address,
            version = plane.version(),
            operator_token = %args.state_dir.join(OPERATOR_TOKEN).display(),
            bootstrap_token = %args.state_dir.join(BOOTSTRAP_TOKEN).display(),
            ca = %args.state_dir.join(lacewing_control::CA_CERT).display(),
            "control plane listening"
        );
        // The one line scripts and tests read to learn the bound address.
        println!("control plane listening on {address}");
        plane
            .serve(async {
                use tokio::signal::unix::{SignalKind, signal};
                match (
                    signal(SignalKind::terminate()),
                    signal(SignalKind::interrupt()),
                ) {
                    (Ok(mut term), Ok(mut int)) => {
                        tokio::select! {
                            _ = term.recv() => {}
                            _ = int.recv() => {}
                        }
                    }
                    _ => std::future::pending().await,
                }
            })
            .await
            .context("control plane")?;
        tracing::info!("control plane stopped");
        Ok(())
    })
}
