//! The flags mode: a whole single-proxy configuration from `lacewing proxy --listen ... --upstream ...`.
//!
//! One HTTP listener `main` with one route `default` (matching everything) to
//! the cluster `upstream`; each `--wasm` module becomes a plugin on that
//! listener, in order; each `--cluster NAME=HOST:PORT` a cluster filters may call.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;

use crate::error::ConfigError;
use crate::load::validate;
use crate::model::{
    AccessLogConfig, AdminConfig, ClusterConfig, ListenerConfig, PluginConfig, ProxyConfig,
    RouteConfig, UpstreamProtocol, defaults,
};
use crate::rules::split_host_port;

/// Name of the listener the flags mode creates.
pub const LISTENER_NAME: &str = "main";
/// Name of the route the flags mode creates.
pub const ROUTE_NAME: &str = "default";
/// Name of the cluster made of the `--upstream` endpoints.
pub const UPSTREAM_CLUSTER: &str = "upstream";

/// The quick-start flags, as parsed by the CLI.
#[derive(Debug, Clone, PartialEq)]
pub struct QuickStart {
    /// `--listen`: where the HTTP listener binds.
    pub listen: SocketAddr,
    /// `--upstream HOST:PORT`, repeated: endpoints of the `upstream` cluster.
    pub upstreams: Vec<String>,
    /// The protocol spoken to the `upstream` cluster.
    pub upstream_protocol: UpstreamProtocol,
    /// `--wasm PATH` with its `--wasm-config` and `--wasm-root-id`, in chain order.
    pub wasm: Vec<WasmFlag>,
    /// `--cluster NAME=HOST:PORT`, repeated (see [`parse_cluster_flag`]).
    pub clusters: Vec<(String, String)>,
    /// `--admin`: the admin endpoint; off when absent.
    pub admin: Option<SocketAddr>,
    /// `--workers`: 0 means one per core.
    pub workers: usize,
    /// Access log lines to stdout.
    pub access_log: bool,
}

/// One `--wasm` module and the flags that belong to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WasmFlag {
    /// Path of the `.wasm` file.
    pub path: String,
    /// `--wasm-config`: the configuration string, or `@FILE` to read it from a file.
    pub config: Option<String>,
    /// `--wasm-root-id`.
    pub root_id: Option<String>,
}

impl QuickStart {
    /// Builds and validates the configuration the flags describe.
    pub fn into_config(self) -> Result<ProxyConfig, ConfigError> {
        if self.upstreams.is_empty() {
            return Err(ConfigError::one(
                "--upstream",
                "at least one upstream HOST:PORT is required",
            ));
        }
        for upstream in &self.upstreams {
            split_host_port(upstream).map_err(|reason| ConfigError::one("--upstream", reason))?;
        }
        let mut upstream = ClusterConfig::new(UPSTREAM_CLUSTER, self.upstreams);
        upstream.protocol = self.upstream_protocol;
        let mut clusters = vec![upstream];
        for (name, endpoint) in self.clusters {
            match clusters.iter_mut().find(|c| c.name == name) {
                Some(cluster) => cluster.endpoints.push(endpoint),
                None => clusters.push(ClusterConfig::new(name, vec![endpoint])),
            }
        }

        let mut plugins = Vec::with_capacity(self.wasm.len());
        let mut used_names = HashSet::new();
        for flag in self.wasm {
            plugins.push(plugin_from_flag(flag, &mut used_names)?);
        }

        let mut listener = ListenerConfig::http(
            LISTENER_NAME,
            self.listen,
            vec![RouteConfig::to_cluster(ROUTE_NAME, UPSTREAM_CLUSTER)],
        );
        listener.filters = plugins.iter().map(|p| p.name.clone()).collect();

        let config = ProxyConfig {
            admin: AdminConfig::at(self.admin),
            workers: self.workers,
            drain_timeout: defaults::drain_timeout(),
            access_log: self.access_log.then(|| AccessLogConfig {
                path: defaults::access_log_path(),
            }),
            listeners: vec![listener],
            clusters,
            plugins,
            tls: None,
        };
        match validate(&config) {
            Ok(()) => Ok(config),
            Err(ConfigError::Invalid { mut issues }) => {
                for issue in &mut issues {
                    issue.field = flag_of_field(&config, &issue.field);
                }
                Err(ConfigError::Invalid { issues })
            }
            Err(other) => Err(other),
        }
    }
}

/// The flag that produced a field of the generated configuration, so errors
/// speak of what the operator typed (`--cluster auth` rather than `clusters[1]`).
fn flag_of_field(config: &ProxyConfig, field: &str) -> String {
    let indexed = |list: &str| -> Option<usize> {
        let rest = field.strip_prefix(list)?.strip_prefix('[')?;
        rest.split_once(']')?.0.parse().ok()
    };
    if field.starts_with("listeners[") {
        return "--listen".to_string();
    }
    if field.starts_with("admin") {
        return "--admin".to_string();
    }
    if let Some(i) = indexed("clusters") {
        return match config.clusters.get(i) {
            Some(cluster) if cluster.name != UPSTREAM_CLUSTER => {
                format!("--cluster {}", cluster.name)
            }
            _ => "--upstream".to_string(),
        };
    }
    if let Some(plugin) = indexed("plugins").and_then(|i| config.plugins.get(i)) {
        return format!("--wasm {}", plugin.module);
    }
    field.to_string()
}

/// Parses `--cluster NAME=HOST:PORT`.
pub fn parse_cluster_flag(text: &str) -> Result<(String, String), ConfigError> {
    let Some((name, endpoint)) = text.split_once('=') else {
        return Err(ConfigError::one(
            "--cluster",
            format!("{text:?} is not NAME=HOST:PORT"),
        ));
    };
    let name = name.trim();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return Err(ConfigError::one(
            "--cluster",
            format!("{text:?}: the cluster name must be non-empty, without spaces"),
        ));
    }
    let endpoint = endpoint.trim();
    split_host_port(endpoint).map_err(|reason| ConfigError::one("--cluster", reason))?;
    Ok((name.to_string(), endpoint.to_string()))
}

/// The plugin of one `--wasm` flag, named after the file stem (`-2`, `-3`... when taken).
fn plugin_from_flag(
    flag: WasmFlag,
    used_names: &mut HashSet<String>,
) -> Result<PluginConfig, ConfigError> {
    if flag.path.trim().is_empty() {
        return Err(ConfigError::one("--wasm", "the module path is empty"));
    }
    let stem = Path::new(&flag.path)
        .file_stem()
        .and_then(|stem| stem.to_str())
        .filter(|stem| !stem.is_empty())
        .unwrap_or("plugin");
    let mut name = stem.to_string();
    let mut suffix = 2;
    while used_names.contains(&name) {
        name = format!("{stem}-{suffix}");
        suffix += 1;
    }
    used_names.insert(name.clone());

    let mut plugin = PluginConfig::new(name, flag.path);
    if let Some(config) = flag.config {
        let text = match config.strip_prefix('@') {
            Some(file) => read_config_file(Path::new(file))?,
            None => config,
        };
        plugin.configuration = Some(serde_json::Value::String(text));
    }
    if let Some(root_id) = flag.root_id {
        plugin.root_id = root_id;
    }
    Ok(plugin)
}

fn read_config_file(path: &Path) -> Result<String, ConfigError> {
    let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    String::from_utf8(bytes).map_err(|_| {
        ConfigError::one(
            "--wasm-config",
            format!("{}: not UTF-8 text", path.display()),
        )
    })
}
