//! `lacewing control`: runs the control plane until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use lacewing_control::{BOOTSTRAP_TOKEN, ControlPlane, OPERATOR_TOKEN};

#[derive(Debug, clap::Args)]
pub struct ControlArgs {
    /// Address for the gRPC services and /metrics.
    #[arg(long, default_value = "127.0.0.1:15010")]
    pub listen: SocketAddr,
    /// Where the store and the tokens live (created 0700 on first start).
    #[arg(long)]
    pub state_dir: PathBuf,
}

pub fn run(args: &ControlArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("lacewing-control")
        .build()?;
    runtime.block_on(async {
        let plane = ControlPlane::bind(args.listen, &args.state_dir)
            .await
            .context("control plane")?;
        let address = plane.local_addr()?;
        tracing::info!(
            %address,
            version = plane.version(),
            operator_token = %args.state_dir.join(OPERATOR_TOKEN).display(),
            bootstrap_token = %args.state_dir.join(BOOTSTRAP_TOKEN).display(),
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
