//! Starting a proxy in this process from a YAML string.

use std::fmt::Display;
use std::net::SocketAddr;

use lacewing_proxy::{Proxy, ProxyHandle};

/// Origin named in config error messages of test configs.
pub const TEST_CONFIG_NAME: &str = "test.yaml";

/// Loads `yaml` and starts a proxy; returns once every listener is bound.
///
/// An admin address left at its default (a fixed port) is moved to
/// `127.0.0.1:0`, so tests never collide on ports. Panics with the error text
/// when the config does not load or the proxy does not start.
pub fn start(yaml: &str) -> ProxyHandle {
    let mut config = lacewing_config::load::from_yaml_str(yaml, TEST_CONFIG_NAME)
        .unwrap_or_else(|e| panic!("test config does not load: {e}\n--- config ---\n{yaml}"));
    if config.admin.address == lacewing_config::defaults::admin_address() {
        config.admin.address = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
    }
    Proxy::start(config)
        .unwrap_or_else(|e| panic!("proxy did not start: {e}\n--- config ---\n{yaml}"))
}

/// Replaces each `{name}` in `template` with its value, e.g.
/// `fill(yaml, &[("upstream", &server.addr)])`; unlike `format!`, YAML braces need no escaping.
pub fn fill(template: &str, values: &[(&str, &dyn Display)]) -> String {
    values
        .iter()
        .fold(template.to_string(), |text, (name, value)| {
            text.replace(&format!("{{{name}}}"), &value.to_string())
        })
}

/// The bound address of listener `name`; panics when there is none.
pub fn listener_addr(handle: &ProxyHandle, name: &str) -> SocketAddr {
    handle
        .listener_addr(name)
        .unwrap_or_else(|| panic!("the proxy has no listener named `{name}`"))
}

/// The bound admin address; panics when the admin endpoint is off.
pub fn admin_addr(handle: &ProxyHandle) -> SocketAddr {
    handle
        .admin_addr()
        .expect("the proxy's admin endpoint is on")
}

/// `http://<listener addr><path>`.
pub fn url(handle: &ProxyHandle, listener: &str, path: &str) -> String {
    format!("http://{}{path}", listener_addr(handle, listener))
}

/// A config with one HTTP listener `main` (route `default`, every request) to
/// one cluster `upstream` of `endpoints` speaking `protocol` (`http1` or `h2`),
/// one worker, admin on `127.0.0.1:0`, and a 1 s drain timeout.
pub fn simple_yaml(endpoints: &[SocketAddr], protocol: &str) -> String {
    let endpoints: Vec<String> = endpoints.iter().map(|e| format!("\"{e}\"")).collect();
    format!(
        "admin: {{ address: 127.0.0.1:0 }}
workers: 1
drain_timeout: 1s
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - name: default
        cluster: upstream
clusters:
  - name: upstream
    endpoints: [{}]
    protocol: {protocol}
",
        endpoints.join(", ")
    )
}
