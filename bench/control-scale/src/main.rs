//! control-scale: how fast a change reaches the mesh.
//!
//! - `sim`: starts a control plane (this binary's `serve`, the same code as
//!   `lacewing control`, so it can be built in release on its own), connects N lightweight simulated
//!   sidecars from this one process (a gRPC stream each, ACKing every
//!   snapshot), applies one change and measures until every sidecar received
//!   it; reports the control plane's RSS and CPU time.
//! - `real`: starts `lacewing control`, M `lacewing proxy --control` sidecars
//!   in front of a small HTTP app, applies K changes and measures, for each,
//!   the time from `apply` returning to every sidecar serving it (a sidecar
//!   ACKs only once the new generation is live).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use lacewing_control::client::Client;
use lacewing_control_api as api;
use tokio::sync::mpsc;
use tokio_stream::{Stream, StreamExt};

#[derive(Debug, Parser)]
struct Args {
    /// The lacewing binary (build it with `cargo build --release -p lacewing`).
    #[arg(long, default_value = "target/release/lacewing")]
    lacewing: PathBuf,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Debug, Subcommand)]
enum Mode {
    /// Run a control plane (what `lacewing control` runs), for `sim`.
    Serve {
        #[arg(long)]
        state_dir: PathBuf,
    },
    /// Simulated sidecars in this process.
    Sim {
        #[arg(long, default_value_t = 1000)]
        sidecars: usize,
        /// Services the sidecars are spread over.
        #[arg(long, default_value_t = 50)]
        services: usize,
        /// Changes to measure.
        #[arg(long, default_value_t = 5)]
        changes: usize,
        /// What each simulated sidecar decodes: the whole snapshot, or only
        /// its version and revision (the 1,000 decodes then do not all run
        /// in this one process, as they would not in a real mesh).
        #[arg(long, value_enum, default_value_t = Decode::Full)]
        decode: Decode,
    },
    /// Real sidecar processes.
    Real {
        #[arg(long, default_value_t = 10)]
        sidecars: usize,
        #[arg(long, default_value_t = 50)]
        changes: usize,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Decode {
    Full,
    Head,
}

/// The first fields of a `Snapshot`; decoding skips the rest.
#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotHead {
    #[prost(uint64, tag = "1")]
    version: u64,
    #[prost(uint64, tag = "2")]
    revision: u64,
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(binary: &Path, args: &[&str]) -> anyhow::Result<(Killed, Vec<String>)> {
    use std::io::BufRead;
    let mut child = Command::new(binary)
        .args(args)
        .env("LACEWING_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("start {}", binary.display()))?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    if line.is_empty() {
        bail!("{} {args:?} exited before serving", binary.display());
    }
    Ok((
        Killed(child),
        line.split_whitespace().map(str::to_string).collect(),
    ))
}

/// RSS (bytes) and CPU time (user + system) of a process, from /proc.
fn usage(pid: u32) -> (u64, Duration) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0)
        * 1024;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat; 12 and 13 after the name.
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
        .sum();
    (rss, Duration::from_millis(ticks * 10))
}

/// A control plane with a fresh state directory: (work dir, process,
/// address). `binary` is `lacewing` (`control`), or this binary (`serve`).
fn start_control(binary: &Path, name: &str) -> anyhow::Result<(PathBuf, Killed, String)> {
    let dir = std::env::temp_dir().join(format!("control-scale-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let state = dir.join("state");
    let state = state.to_str().context("state path")?;
    let args: &[&str] = if binary == std::env::current_exe()?.as_path() {
        &["serve", "--state-dir", state]
    } else {
        &["control", "--listen", "127.0.0.1:0", "--state-dir", state]
    };
    let (control, words) = spawn(binary, args)?;
    let addr = words.last().context("address")?.clone();
    Ok((dir, control, addr))
}

fn mesh(services: usize, change: usize) -> String {
    (0..services)
        .map(|i| {
            format!(
                "apiVersion: lacewing.dev/v1alpha1\nkind: Service\nmetadata: {{name: svc-{i}}}\nspec:\n  port: 80\n  timeouts: {{request: {}ms}}\n---\n",
                10_000 + change
            )
        })
        .collect()
}

async fn apply(client: &mut Client, dir: &Path, text: &str) -> anyhow::Result<u64> {
    let path = dir.join("mesh.yaml");
    std::fs::write(&path, text)?;
    let docs = lacewing_mesh::parse_file(&path)?;
    Ok(client.apply(docs, dir).await?.version)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// One simulated sidecar of the control plane at (address, token): hello,
/// then ACK every snapshot and note when each version arrived.
async fn simulated(
    (control, token, trust): (String, String, lacewing_tls::api::ApiTrust),
    service: String,
    index: usize,
    arrived: Arc<Vec<AtomicU64>>,
    epoch: Instant,
    connected: Arc<AtomicUsize>,
    decode: Decode,
) -> anyhow::Result<()> {
    let channel = lacewing_control::client::channel(&control, &trust).await?;
    let (tx, rx) = mpsc::channel(4);
    tx.send(api::SidecarMessage {
        message: Some(api::sidecar_message::Message::Hello(api::Hello {
            node_id: format!("sim-{index}"),
            service,
            namespace: "default".into(),
            inbound: format!("127.0.0.{}:{}", 1 + index / 60000, 1024 + index % 60000),
            outbound: String::new(),
            serving_version: 0,
            // Simulated sidecars ask for no certificate.
            certificate_request: None,
            certificate_root_sha256: String::new(),
            certificate_not_after_ms: 0,
        })),
    })
    .await?;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
    lacewing_control::token::authorize(&mut request, &token)?;
    let mut snapshots: Pin<Box<dyn Stream<Item = Result<SnapshotHead, tonic::Status>> + Send>> =
        match decode {
            Decode::Full => {
                let mut client = api::discovery_client::DiscoveryClient::new(channel)
                    .max_decoding_message_size(64 * 1024 * 1024);
                Box::pin(client.stream(request).await?.into_inner().map(|s| {
                    s.map(|s| SnapshotHead {
                        version: s.version,
                        revision: s.revision,
                    })
                }))
            }
            Decode::Head => {
                let mut grpc = tonic::client::Grpc::new(channel);
                grpc.ready()
                    .await
                    .map_err(|e| anyhow::anyhow!("not ready: {e}"))?;
                let codec = tonic_prost::ProstCodec::<api::SidecarMessage, SnapshotHead>::default();
                let path =
                    http::uri::PathAndQuery::from_static("/lacewing.control.v1.Discovery/Stream");
                Box::pin(grpc.streaming(request, path, codec).await?.into_inner())
            }
        };
    connected.fetch_add(1, Ordering::Relaxed);
    while let Some(snapshot) = snapshots.next().await {
        let snapshot = snapshot?;
        let at = epoch.elapsed().as_micros() as u64;
        // Latest version seen, and when it first arrived.
        let slot = &arrived[index];
        let packed = (snapshot.version << 40) | at.min((1 << 40) - 1);
        if slot.load(Ordering::Relaxed) >> 40 < snapshot.version {
            slot.store(packed, Ordering::Relaxed);
        }
        tx.send(api::SidecarMessage {
            message: Some(api::sidecar_message::Message::Answer(api::Answer {
                version: snapshot.version,
                revision: snapshot.revision,
                ack: true,
                ..Default::default()
            })),
        })
        .await?;
    }
    Ok(())
}

async fn sim(
    sidecars: usize,
    services: usize,
    changes: usize,
    decode: Decode,
) -> anyhow::Result<()> {
    let (dir, control, addr) = start_control(&std::env::current_exe()?, "sim")?;
    let pid = control.0.id();
    let operator = lacewing_control::token::read(&dir.join("state/operator.token"))?;
    let bootstrap = lacewing_control::token::read(&dir.join("state/bootstrap.token"))?;
    let trust = lacewing_control::client::trust_beside(&dir.join("state/operator.token"), None)?;
    let mut client = Client::connect(&addr, &operator, &trust).await?;
    apply(&mut client, &dir, &mesh(services, 0)).await?;

    let epoch = Instant::now();
    let arrived: Arc<Vec<AtomicU64>> = Arc::new((0..sidecars).map(|_| AtomicU64::new(0)).collect());
    let connected = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let started = Instant::now();
    for i in 0..sidecars {
        let task = simulated(
            (addr.clone(), bootstrap.clone(), trust.clone()),
            format!("svc-{}", i % services),
            i,
            arrived.clone(),
            epoch,
            connected.clone(),
            decode,
        );
        let finished = finished.clone();
        tokio::spawn(async move {
            if let Err(e) = task.await
                && !finished.load(Ordering::Relaxed)
            {
                eprintln!("simulated sidecar {i}: {e}");
            }
        });
    }
    while connected.load(Ordering::Relaxed) < sidecars {
        if started.elapsed() > Duration::from_secs(120) {
            bail!(
                "only {} of {sidecars} sidecars connected",
                connected.load(Ordering::Relaxed)
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let connect_time = started.elapsed();
    // Let the registrations settle: every sidecar has the newest snapshot.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (rss_before, cpu_before) = usage(pid);
    let mut times = Vec::new();
    for change in 1..=changes {
        let t0 = epoch.elapsed().as_micros() as u64;
        let version = apply(&mut client, &dir, &mesh(services, change)).await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let got: Vec<u64> = arrived
                .iter()
                .map(|a| a.load(Ordering::Relaxed))
                .filter(|p| p >> 40 >= version)
                .collect();
            if got.len() == sidecars {
                let last = got.iter().map(|p| p & ((1 << 40) - 1)).max().unwrap_or(t0);
                times.push(Duration::from_micros(last.saturating_sub(t0)));
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "version {version} reached {} of {sidecars} sidecars in 60 s",
                    got.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (rss_after, cpu_after) = usage(pid);
    finished.store(true, Ordering::Relaxed);
    times.sort();
    println!(
        "| simulated sidecars | {sidecars} over {services} services, decoding {decode:?} snapshots |"
    );
    println!("|---|---|");
    println!("| all connected after | {} |", ms(connect_time));
    println!(
        "| one change reaches all (apply sent → last sidecar has it), median of {changes} | {} |",
        ms(percentile(&times, 0.5))
    );
    println!("| worst of {changes} | {} |", ms(percentile(&times, 1.0)));
    println!(
        "| control plane RSS | {:.1} MiB (before the changes {:.1} MiB) |",
        rss_after as f64 / 1048576.0,
        rss_before as f64 / 1048576.0
    );
    println!(
        "| control plane CPU for the {changes} changes | {} |",
        ms(cpu_after.saturating_sub(cpu_before))
    );
    drop(control);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// A tiny HTTP app answering 200 to everything.
async fn app() -> anyhow::Result<SocketAddr> {
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let service = service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(
                        http_body_util::Full::new(hyper::body::Bytes::from_static(b"ok\n")),
                    ))
                });
                let _ = http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn real(binary: &Path, sidecars: usize, changes: usize) -> anyhow::Result<()> {
    let (dir, control, addr) = start_control(binary, "real")?;
    let state = dir.join("state");
    let operator = lacewing_control::token::read(&state.join("operator.token"))?;
    let app = app().await?.to_string();
    let token_file = state.join("bootstrap.token");
    let mut procs = Vec::new();
    for i in 0..sidecars {
        let sidecar_state = dir.join(format!("sidecar-{i}"));
        let service = format!("svc-{}", i % 5);
        let (p, _) = spawn(
            binary,
            &[
                "proxy",
                "--control",
                &addr,
                "--service",
                &service,
                "--inbound",
                "127.0.0.1:0",
                "--outbound",
                "127.0.0.1:0",
                "--app",
                &app,
                "--token-file",
                token_file.to_str().unwrap_or_default(),
                "--state-dir",
                sidecar_state.to_str().unwrap_or_default(),
                "--workers",
                "1",
            ],
        )?;
        procs.push(p);
    }
    let trust = lacewing_control::client::trust_beside(&token_file, None)?;
    let mut client = Client::connect(&addr, &operator, &trust).await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while client
        .status()
        .await?
        .sidecars
        .iter()
        .filter(|s| s.connected)
        .count()
        < sidecars
    {
        if Instant::now() > deadline {
            bail!("not every sidecar connected");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut times = Vec::new();
    for change in 0..=changes {
        let version = apply(&mut client, &dir, &mesh(5, change)).await?;
        let returned = Instant::now();
        let done = client
            .wait(version, Duration::from_secs(30), |_| {})
            .await?;
        let took = returned.elapsed();
        if done.acked as usize != sidecars {
            bail!(
                "version {version}: {}/{sidecars} ACKed: {done:?}",
                done.acked
            );
        }
        // The first apply starts every sidecar's routes; it is not counted.
        if change > 0 {
            times.push(took);
        }
    }
    times.sort();
    println!("| real sidecars | {sidecars} |");
    println!("|---|---|");
    println!(
        "| apply returned → every sidecar serving (ACK after publish), p50 of {changes} | {} |",
        ms(percentile(&times, 0.5))
    );
    println!("| p99 | {} |", ms(percentile(&times, 0.99)));
    println!("| max | {} |", ms(percentile(&times, 1.0)));
    drop(procs);
    drop(control);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

async fn serve(state_dir: &Path) -> anyhow::Result<()> {
    let plane = lacewing_control::ControlPlane::bind("127.0.0.1:0".parse()?, state_dir).await?;
    println!("control plane listening on {}", plane.local_addr()?);
    plane.serve(std::future::pending()).await?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match args.mode {
            Mode::Serve { state_dir } => serve(&state_dir).await,
            Mode::Sim {
                sidecars,
                services,
                changes,
                decode,
            } => sim(sidecars, services, changes, decode).await,
            Mode::Real { sidecars, changes } => real(&args.lacewing, sidecars, changes).await,
        }
    })
}
