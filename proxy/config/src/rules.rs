//! Semantic rules of a parsed configuration: names, references, values that
//! parse but make no sense. Each check reports the field path it is about.

use std::collections::HashMap;
use std::net::{Ipv6Addr, SocketAddr};
use std::time::Duration;

use crate::error::ConfigIssue;
use crate::model::{
    ClusterConfig, HeaderMatch, ListenerConfig, ListenerProtocol, MAX_CONNECTION_BUFFER,
    MIN_CONNECTION_BUFFER, MIN_REQUEST_HEADERS, PathMatch, PluginConfig, ProxyConfig, RouteConfig,
};
use crate::units::Dur;

/// One wasm page: the smallest linear memory a module can have.
const WASM_PAGE: u64 = 64 * 1024;

/// Every problem in `config`, in field order (no origin or position yet).
pub(crate) fn issues(config: &ProxyConfig) -> Vec<ConfigIssue> {
    let mut checker = Checker {
        config,
        issues: Vec::new(),
    };
    checker.check();
    checker.issues
}

/// Splits an endpoint `host:port` (IPv6 hosts in brackets: `[::1]:80`) and checks both parts.
///
/// The host is an IP address or a DNS name; the port is 1–65535.
pub fn split_host_port(endpoint: &str) -> Result<(&str, u16), String> {
    let Some((host, port)) = endpoint.rsplit_once(':') else {
        return Err(format!("{endpoint:?} is not host:port"));
    };
    let port: u16 = match port.parse() {
        Ok(port) if port > 0 => port,
        _ => {
            return Err(format!(
                "{endpoint:?}: port must be a number from 1 to 65535"
            ));
        }
    };
    if let Some(inner) = host.strip_prefix('[') {
        let Some(inner) = inner.strip_suffix(']') else {
            return Err(format!(
                "{endpoint:?}: unclosed `[` around the IPv6 address"
            ));
        };
        return match inner.parse::<Ipv6Addr>() {
            Ok(_) => Ok((inner, port)),
            Err(_) => Err(format!("{endpoint:?}: {inner:?} is not an IPv6 address")),
        };
    }
    if host.contains(':') {
        return Err(format!(
            "{endpoint:?}: write IPv6 addresses in brackets, e.g. [::1]:8080"
        ));
    }
    let valid_name = !host.is_empty()
        && host.len() <= 253
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if !valid_name {
        return Err(format!(
            "{endpoint:?}: {host:?} is not a host name or IP address"
        ));
    }
    Ok((host, port))
}

/// The shape of a mesh SPIFFE ID: `spiffe://<trust-domain>/ns/<namespace>/sa/<service>`.
fn check_spiffe_id(id: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{id:?} is not a mesh SPIFFE ID (spiffe://<trust-domain>/ns/<namespace>/sa/<service>)"
        )
    };
    let rest = id.strip_prefix("spiffe://").ok_or_else(bad)?;
    let parts: Vec<&str> = rest.split('/').collect();
    match parts.as_slice() {
        [domain, "ns", namespace, "sa", service]
            if [domain, namespace, service].iter().all(|p| !p.is_empty()) =>
        {
            Ok(())
        }
        _ => Err(bad()),
    }
}

/// An HTTP token (RFC 9110 `tchar`s), as used for methods and header names.
fn is_token(text: &str) -> bool {
    !text.is_empty()
        && text.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// The useful line of a regex error (the crate's syntax errors span several lines).
fn regex_reason(error: &regex::Error) -> String {
    let text = error.to_string();
    text.lines()
        .find_map(|line| line.trim().strip_prefix("error: "))
        .map(str::to_string)
        .unwrap_or(text)
}

fn known_list(kind: &str, names: &[&str]) -> String {
    if names.is_empty() {
        format!("no {kind}s are defined")
    } else {
        format!("known: {}", names.join(", "))
    }
}

struct Checker<'a> {
    config: &'a ProxyConfig,
    issues: Vec<ConfigIssue>,
}

impl Checker<'_> {
    fn report(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.issues.push(ConfigIssue::new(field, reason));
    }

    fn check(&mut self) {
        let config = self.config;
        self.unique_names(
            "listener",
            "listeners",
            config.listeners.iter().map(|l| l.name.as_str()),
        );
        self.unique_names(
            "cluster",
            "clusters",
            config.clusters.iter().map(|c| c.name.as_str()),
        );
        self.unique_names(
            "plugin",
            "plugins",
            config.plugins.iter().map(|p| p.name.as_str()),
        );
        self.listener_addresses();
        self.admin();
        if let Some(log) = &config.access_log
            && log.path.trim().is_empty()
        {
            self.report(
                "access_log.path",
                "must not be empty (stdout, stderr or a file path)",
            );
        }
        if let Some(tls) = &config.tls {
            for (field, path) in [
                ("tls.cert_file", &tls.cert_file),
                ("tls.key_file", &tls.key_file),
                ("tls.trust_file", &tls.trust_file),
            ] {
                if path.as_os_str().is_empty() {
                    self.report(field, "must not be empty (a PEM file path)");
                }
            }
        }
        for (i, listener) in config.listeners.iter().enumerate() {
            self.listener(&format!("listeners[{i}]"), listener);
        }
        for (i, cluster) in config.clusters.iter().enumerate() {
            self.cluster(&format!("clusters[{i}]"), cluster);
        }
        for (i, plugin) in config.plugins.iter().enumerate() {
            self.plugin(&format!("plugins[{i}]"), plugin);
        }
    }

    /// Names must be non-empty and unique within `list` (a field path).
    fn unique_names<'n>(&mut self, kind: &str, list: &str, names: impl Iterator<Item = &'n str>) {
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for (i, name) in names.enumerate() {
            let field = format!("{list}[{i}].name");
            if name.trim().is_empty() {
                self.report(field, format!("a {kind} needs a non-empty name"));
            } else if let Some(first) = seen.get(name) {
                self.report(
                    field,
                    format!("duplicate {kind} name {name:?} (also {list}[{first}])"),
                );
            } else {
                seen.insert(name, i);
            }
        }
    }

    fn admin(&mut self) {
        let admin = &self.config.admin;
        if let Some(address) = admin.address
            && !address.ip().is_loopback()
            && !admin.allow_remote
        {
            self.report(
                "admin.address",
                format!(
                    "{address} is not a loopback address: the admin endpoint has no \
                     authentication; set `admin.allow_remote: true` to serve it there anyway"
                ),
            );
        }
        self.positive(
            "admin.header_read_timeout".into(),
            admin.header_read_timeout,
        );
    }

    fn listener_addresses(&mut self) {
        let mut seen: HashMap<SocketAddr, &str> = HashMap::new();
        if let Some(admin) = self.config.admin.address
            && admin.port() != 0
        {
            seen.insert(admin, "the admin endpoint");
        }
        for (i, listener) in self.config.listeners.iter().enumerate() {
            if listener.address.port() == 0 {
                continue;
            }
            if let Some(owner) = seen.get(&listener.address) {
                let reason = format!("{} is already used by {owner}", listener.address);
                self.report(format!("listeners[{i}].address"), reason);
            } else {
                seen.insert(listener.address, "another listener");
            }
        }
    }

    fn cluster_exists(&mut self, field: String, name: &str) {
        if self.config.cluster(name).is_none() {
            let names: Vec<&str> = self
                .config
                .clusters
                .iter()
                .map(|c| c.name.as_str())
                .collect();
            let known = known_list("cluster", &names);
            self.report(field, format!("unknown cluster {name:?} ({known})"));
        }
    }

    fn plugins_exist(&mut self, list: &str, filters: &[String]) {
        for (k, name) in filters.iter().enumerate() {
            if self.config.plugin(name).is_none() {
                let names: Vec<&str> = self
                    .config
                    .plugins
                    .iter()
                    .map(|p| p.name.as_str())
                    .collect();
                let known = known_list("plugin", &names);
                self.report(
                    format!("{list}[{k}]"),
                    format!("unknown plugin {name:?} ({known})"),
                );
            }
        }
    }

    fn positive(&mut self, field: String, value: Dur) {
        if value.0 == Duration::ZERO {
            self.report(field, "must be longer than zero");
        }
    }

    fn listener(&mut self, path: &str, listener: &ListenerConfig) {
        match listener.protocol {
            ListenerProtocol::Tcp => {
                match &listener.cluster {
                    None => self.report(
                        format!("{path}.cluster"),
                        "a tcp listener needs the cluster its connections go to",
                    ),
                    Some(cluster) => self.cluster_exists(format!("{path}.cluster"), cluster),
                }
                if !listener.routes.is_empty() {
                    self.report(
                        format!("{path}.routes"),
                        "a tcp listener has no routes (set `cluster` instead)",
                    );
                }
            }
            ListenerProtocol::Http => {
                // No routes is allowed: every request gets 404 (flag NR).
                if listener.cluster.is_some() {
                    self.report(
                        format!("{path}.cluster"),
                        "only tcp listeners take a cluster; http listeners send to the cluster of a route",
                    );
                }
            }
        }
        self.plugins_exist(&format!("{path}.filters"), &listener.filters);
        if let Some(tls) = &listener.tls {
            self.positive(
                format!("{path}.tls.handshake_timeout"),
                tls.handshake_timeout,
            );
        }

        let limits = &listener.limits;
        if limits.max_request_headers.0 < MIN_REQUEST_HEADERS {
            self.report(
                format!("{path}.limits.max_request_headers"),
                format!(
                    "{} is too small: at least {} (the smallest request head limit HTTP/1.1 can enforce)",
                    limits.max_request_headers,
                    crate::units::Size(MIN_REQUEST_HEADERS)
                ),
            );
        }
        if limits.max_header_count == 0 {
            self.report(
                format!("{path}.limits.max_header_count"),
                "must be at least 1",
            );
        }
        if limits.max_connections == 0 {
            self.report(
                format!("{path}.limits.max_connections"),
                "must be at least 1",
            );
        }
        self.positive(
            format!("{path}.limits.header_read_timeout"),
            limits.header_read_timeout,
        );
        self.positive(
            format!("{path}.limits.upstream_body_timeout"),
            limits.upstream_body_timeout,
        );
        self.positive(format!("{path}.limits.write_timeout"), limits.write_timeout);
        if let Some(duration) = limits.max_connection_duration {
            self.positive(format!("{path}.limits.max_connection_duration"), duration);
        }
        if let Some(duration) = limits.max_stream_duration {
            self.positive(format!("{path}.limits.max_stream_duration"), duration);
        }
        if limits.max_concurrent_streams == 0 {
            self.report(
                format!("{path}.limits.max_concurrent_streams"),
                "must be at least 1",
            );
        }
        let buffer = limits.max_connection_buffer.0;
        if !(MIN_CONNECTION_BUFFER..=MAX_CONNECTION_BUFFER).contains(&buffer) {
            self.report(
                format!("{path}.limits.max_connection_buffer"),
                format!(
                    "{} is out of range: from {MIN_CONNECTION_BUFFER} to {MAX_CONNECTION_BUFFER} bytes (HTTP/2 window sizes)",
                    limits.max_connection_buffer
                ),
            );
        }
        let share = limits.max_upstream_share;
        if !(share > 0.0 && share <= 1.0) {
            self.report(
                format!("{path}.limits.max_upstream_share"),
                format!("{share} is not a share: give a number above 0 and at most 1"),
            );
        }

        let routes = listener.routes.iter().map(|r| r.name.as_str());
        self.unique_names("route", &format!("{path}.routes"), routes);
        for (r, route) in listener.routes.iter().enumerate() {
            self.route(&format!("{path}.routes[{r}]"), route);
        }
    }

    fn route(&mut self, path: &str, route: &RouteConfig) {
        match (&route.cluster, route.weighted_clusters.is_empty()) {
            (Some(cluster), true) => self.cluster_exists(format!("{path}.cluster"), cluster),
            (None, false) => self.weighted_clusters(path, route),
            (Some(_), false) => self.report(
                format!("{path}.cluster"),
                "give either `cluster` or `weighted_clusters`, not both",
            ),
            (None, true) => self.report(
                path.to_string(),
                "a route needs `cluster` or `weighted_clusters`",
            ),
        }
        self.positive(format!("{path}.timeout"), route.timeout);
        for (s, status) in route.retry.on_status.iter().enumerate() {
            if !(100..=599).contains(status) {
                self.report(
                    format!("{path}.retry.on_status[{s}]"),
                    format!("{status} is not an HTTP status (100-599)"),
                );
            }
        }
        self.plugins_exist(&format!("{path}.filters"), &route.filters);

        let matches = &route.matches;
        if let Some(authority) = &matches.authority
            && authority.trim().is_empty()
        {
            self.report(format!("{path}.match.authority"), "must not be empty");
        }
        match &matches.path {
            Some(PathMatch::Exact(p)) if !p.starts_with('/') => self.report(
                format!("{path}.match.path.exact"),
                format!("{p:?} does not start with `/`"),
            ),
            Some(PathMatch::Prefix(p)) if !p.starts_with('/') => self.report(
                format!("{path}.match.path.prefix"),
                format!("{p:?} does not start with `/`"),
            ),
            Some(PathMatch::Regex(pattern)) => {
                if let Err(error) = regex::Regex::new(pattern) {
                    self.report(
                        format!("{path}.match.path.regex"),
                        format!("bad regex {pattern:?}: {}", regex_reason(&error)),
                    );
                }
            }
            _ => {}
        }
        if let Some(method) = &matches.method
            && !is_token(method)
        {
            self.report(
                format!("{path}.match.method"),
                format!("{method:?} is not an HTTP method"),
            );
        }
        for (h, header) in matches.headers.iter().enumerate() {
            self.header_match(&format!("{path}.match.headers[{h}]"), header);
        }
    }

    fn weighted_clusters(&mut self, path: &str, route: &RouteConfig) {
        let mut total: u64 = 0;
        for (w, weighted) in route.weighted_clusters.iter().enumerate() {
            let field = format!("{path}.weighted_clusters[{w}].cluster");
            self.cluster_exists(field, &weighted.cluster);
            total += u64::from(weighted.weight);
        }
        if total == 0 {
            self.report(
                format!("{path}.weighted_clusters"),
                "the weights add up to 0: at least one must be positive",
            );
        } else if total > u64::from(u32::MAX) {
            self.report(
                format!("{path}.weighted_clusters"),
                format!("the weights add up to {total}, more than {}", u32::MAX),
            );
        }
    }

    fn header_match(&mut self, path: &str, header: &HeaderMatch) {
        let lowercase_token =
            is_token(&header.name) && !header.name.bytes().any(|b| b.is_ascii_uppercase());
        if !lowercase_token {
            self.report(
                format!("{path}.name"),
                format!(
                    "{:?} is not a header name (lowercase letters, digits and -_.!#$%&'*+^`|~)",
                    header.name
                ),
            );
        }
        if header.exact.is_some() && header.regex.is_some() {
            self.report(
                format!("{path}.regex"),
                "give either `exact` or `regex`, not both",
            );
        }
        if let Some(pattern) = &header.regex
            && let Err(error) = regex::Regex::new(pattern)
        {
            self.report(
                format!("{path}.regex"),
                format!("bad regex {pattern:?}: {}", regex_reason(&error)),
            );
        }
    }

    fn cluster(&mut self, path: &str, cluster: &ClusterConfig) {
        // No endpoints is allowed: every request to the cluster gets 503 (flag UH).
        for (e, endpoint) in cluster.endpoints.iter().enumerate() {
            if let Err(reason) = split_host_port(endpoint) {
                self.report(format!("{path}.endpoints[{e}]"), reason);
            }
        }
        self.positive(format!("{path}.connect_timeout"), cluster.connect_timeout);
        if let Some(tls) = &cluster.tls
            && let Err(reason) = check_spiffe_id(&tls.peer)
        {
            self.report(format!("{path}.tls.peer"), reason);
        }

        let breaker = &cluster.circuit_breaker;
        for (field, value) in [
            ("max_connections", breaker.max_connections),
            ("max_pending_requests", breaker.max_pending_requests),
            ("max_requests", breaker.max_requests),
        ] {
            if value == 0 {
                self.report(
                    format!("{path}.circuit_breaker.{field}"),
                    "must be at least 1 (0 would refuse every request)",
                );
            }
        }

        let ratio = cluster.retry_budget.ratio;
        if !(0.0..=1.0).contains(&ratio) {
            self.report(
                format!("{path}.retry_budget.ratio"),
                format!("{ratio} is not a share between 0 and 1"),
            );
        }

        let outlier = &cluster.outlier_detection;
        if outlier.max_ejection_percent > 100 {
            self.report(
                format!("{path}.outlier_detection.max_ejection_percent"),
                format!("{}% is more than 100%", outlier.max_ejection_percent),
            );
        }
        if outlier.consecutive_failures > 0 {
            self.positive(
                format!("{path}.outlier_detection.base_ejection_time"),
                outlier.base_ejection_time,
            );
        }
    }

    fn plugin(&mut self, path: &str, plugin: &PluginConfig) {
        if plugin.module.trim().is_empty() {
            self.report(
                format!("{path}.module"),
                "the path of the .wasm module must not be empty",
            );
        }
        if let Some(sha256) = &plugin.sha256 {
            let hex = sha256.len() == 64 && sha256.bytes().all(|b| b.is_ascii_hexdigit());
            if !hex {
                self.report(
                    format!("{path}.sha256"),
                    format!("{sha256:?} is not a sha256 (64 hex digits)"),
                );
            }
        }
        self.positive(
            format!("{path}.limits.callback_timeout"),
            plugin.limits.callback_timeout,
        );
        if plugin.limits.memory.0 < WASM_PAGE {
            self.report(
                format!("{path}.limits.memory"),
                format!(
                    "{} is less than one wasm page (64KiB)",
                    plugin.limits.memory
                ),
            );
        }
        for name in plugin.env.keys() {
            if name.is_empty() || name.contains(['=', '\0']) {
                self.report(
                    format!("{path}.env.{name}"),
                    format!("{name:?} is not an environment variable name"),
                );
            }
        }
        for (c, cluster) in plugin.allowed_clusters.iter().enumerate() {
            self.cluster_exists(format!("{path}.allowed_clusters[{c}]"), cluster);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(split_host_port("127.0.0.1:80"), Ok(("127.0.0.1", 80)));
        assert_eq!(split_host_port("orders.svc:8080"), Ok(("orders.svc", 8080)));
        assert_eq!(split_host_port("[::1]:9"), Ok(("::1", 9)));
        for bad in [
            "",
            "127.0.0.1",
            ":80",
            "a:0",
            "a:65536",
            "a:x",
            "::1:80",
            "[::1:80",
            "[zz]:80",
            "a b:80",
        ] {
            assert!(split_host_port(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn tokens() {
        assert!(is_token("GET"));
        assert!(is_token("x-canary"));
        assert!(!is_token(""));
        assert!(!is_token("GE T"));
        assert!(!is_token("x:y"));
    }
}
