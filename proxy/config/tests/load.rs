//! Loading YAML configurations: what parses, and that every rejection names file, line and field.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use lacewing_config::{
    ConfigError, FailPolicy, LbPolicy, ListenerProtocol, PathMatch, ProxyConfig, from_file,
    from_yaml_str, validate,
};

const ORIGIN: &str = "mesh.yaml";

/// The configuration from the project brief: every section used once.
const FULL: &str = r#"admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    filters: [echo]              # plugin names, in order
    routes:
      - name: api
        match: { path: { prefix: /api }, method: GET, headers: [{ name: x-canary, exact: "1" }] }
        cluster: backend         # or weighted_clusters
        timeout: 2s
        retry: { attempts: 2, on_status: [503] }
  - { name: raw, address: 127.0.0.1:0, protocol: tcp, cluster: backend }
clusters:
  - { name: backend, endpoints: ["127.0.0.1:3000"], protocol: http1, lb: least_request, connect_timeout: 1s }
plugins:
  - { name: echo, module: target/wasm32-wasip1/wasm/header_echo.wasm, configuration: "x-a=x-b", fail: closed,
      limits: { memory: 16MiB, callback_timeout: 50ms } }
"#;

fn load(text: &str) -> Result<ProxyConfig, ConfigError> {
    from_yaml_str(text, ORIGIN)
}

/// The error lines of a configuration that must be rejected.
fn error_lines(text: &str) -> Vec<String> {
    match load(text) {
        Ok(config) => panic!("accepted:\n{text}\nas {config:#?}"),
        Err(error) => error.to_string().lines().map(str::to_string).collect(),
    }
}

/// Asserts that one error line is `mesh.yaml:<line>:<column>: <field>: ...<reason>...`.
fn assert_issue(text: &str, line: usize, column: usize, field: &str, reason: &str) {
    let lines = error_lines(text);
    let prefix = format!("{ORIGIN}:{line}:{column}: {field}: ");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with(&prefix) && l[prefix.len()..].contains(reason)),
        "no error `{prefix}...{reason}...` in:\n{}",
        lines.join("\n")
    );
}

/// A valid config with one http listener, to which a case appends or changes lines.
const LISTENER_HEAD: &str = "\
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
";
const CLUSTERS: &str = "\
clusters:
  - name: orders
    endpoints: [\"127.0.0.1:3000\"]
  - name: users
    endpoints: [\"127.0.0.1:3001\"]
";

/// `LISTENER_HEAD` + the route lines (starting at line 5) + `CLUSTERS`.
fn with_routes(routes: &str) -> String {
    format!("{LISTENER_HEAD}{routes}{CLUSTERS}")
}

#[test]
fn full_example_loads_with_its_values() {
    let config = load(FULL).unwrap();
    assert_eq!(config.workers, 1);
    assert_eq!(config.admin.address, Some("127.0.0.1:0".parse().unwrap()));
    let main = &config.listeners[0];
    assert_eq!(main.filters, ["echo"]);
    let api = &main.routes[0];
    assert_eq!(api.matches.path, Some(PathMatch::Prefix("/api".into())));
    assert_eq!(api.matches.method.as_deref(), Some("GET"));
    assert_eq!(api.matches.headers[0].exact.as_deref(), Some("1"));
    assert_eq!(api.timeout.0, Duration::from_secs(2));
    assert_eq!(api.retry.attempts, 2);
    assert_eq!(config.listeners[1].protocol, ListenerProtocol::Tcp);
    assert_eq!(config.listeners[1].cluster.as_deref(), Some("backend"));
    let backend = config.cluster("backend").unwrap();
    assert_eq!(backend.lb, LbPolicy::LeastRequest);
    let echo = config.plugin("echo").unwrap();
    assert_eq!(echo.fail, FailPolicy::Closed);
    assert_eq!(echo.limits.memory.0, 16 << 20);
    assert_eq!(echo.limits.callback_timeout.0, Duration::from_millis(50));
    assert_eq!(echo.configuration_bytes(), b"x-a=x-b");
    assert!(validate(&config).is_ok());
}

#[test]
fn minimal_config_takes_defaults() {
    let config = load(&with_routes("      - { name: all, cluster: orders }\n")).unwrap();
    let route = &config.listeners[0].routes[0];
    assert_eq!(route.timeout.0, Duration::from_secs(15));
    assert_eq!(route.retry.on_status, [503]);
    assert_eq!(config.listeners[0].limits.max_request_headers.0, 60 * 1024);
    assert_eq!(
        config.admin.address,
        Some(SocketAddr::from(([127, 0, 0, 1], 9901)))
    );
    assert_eq!(config.clusters[0].connect_timeout.0, Duration::from_secs(1));
}

#[test]
fn config_dump_json_round_trips() {
    let config = load(FULL).unwrap();
    let json = serde_json::to_string(&config).unwrap();
    let back: ProxyConfig = serde_json::from_str(&json).unwrap();
    assert_eq!(back, config);
    let yaml = serde_norway::to_string(&config).unwrap();
    assert_eq!(load(&yaml).unwrap(), config);
}

#[test]
fn path_match_forms() {
    let block = "      - name: a\n        cluster: orders\n        match:\n          path:\n            regex: ^/v[0-9]+/\n";
    let config = load(&with_routes(block)).unwrap();
    assert_eq!(
        config.listeners[0].routes[0].matches.path,
        Some(PathMatch::Regex("^/v[0-9]+/".into()))
    );
    let tagged = "      - { name: a, cluster: orders, match: { path: !exact /healthz } }\n";
    let config = load(&with_routes(tagged)).unwrap();
    assert_eq!(
        config.listeners[0].routes[0].matches.path,
        Some(PathMatch::Exact("/healthz".into()))
    );
    assert_issue(
        &with_routes("      - { name: a, cluster: orders, match: { path: { prefx: /a } } }\n"),
        5,
        54,
        "listeners[0].routes[0].match.path",
        "unknown variant `prefx`",
    );
    assert_issue(
        &with_routes(
            "      - { name: a, cluster: orders, match: { path: { prefix: /a, exact: /b } } }\n",
        ),
        5,
        52,
        "listeners[0].routes[0].match.path",
        "only one of",
    );
}

#[test]
fn plugin_configuration_bytes() {
    let text = "\
plugins:
  - { name: s, module: s.wasm, configuration: \"raw text\" }
  - name: m
    module: m.wasm
    configuration: { limit: 10, paths: [/a, /b] }
    vm_configuration: 42
  - { name: n, module: n.wasm }
  - name: b
    module: b.wasm
    configuration: |
      line one
      line two
";
    let config = load(text).unwrap();
    assert_eq!(config.plugins[0].configuration_bytes(), b"raw text");
    assert_eq!(
        config.plugins[1].configuration_bytes(),
        br#"{"limit":10,"paths":["/a","/b"]}"#
    );
    assert_eq!(config.plugins[1].vm_configuration_bytes(), b"42");
    assert!(config.plugins[2].configuration_bytes().is_empty());
    assert!(config.plugins[2].vm_configuration_bytes().is_empty());
    assert_eq!(
        config.plugins[3].configuration_bytes(),
        b"line one\nline two\n"
    );
}

// ---- parse errors ----

#[test]
fn unknown_field_is_rejected_with_its_line() {
    let text = "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    routs: []\n";
    assert_issue(
        text,
        4,
        5,
        "listeners[0].routs",
        "unknown field `routs`, expected one of",
    );
    assert_issue("wokers: 2\n", 1, 1, "wokers", "unknown field `wokers`");
}

#[test]
fn duration_without_unit_is_rejected() {
    let routes = "      - name: a\n        cluster: orders\n        timeout: 10\n";
    assert_issue(
        &with_routes(routes),
        7,
        18,
        "listeners[0].routes[0].timeout",
        "`10` has no unit",
    );
}

#[test]
fn unparsable_duration_is_rejected() {
    let routes = "      - name: a\n        cluster: orders\n        timeout: ten s\n";
    assert_issue(
        &with_routes(routes),
        7,
        18,
        "listeners[0].routes[0].timeout",
        "`ten s` is not a duration",
    );
    assert_issue(
        "drain_timeout: 1.5\n",
        1,
        16,
        "drain_timeout",
        "is not a duration",
    );
}

#[test]
fn bad_values_name_their_field() {
    assert_issue(
        "listeners:\n  - name: main\n    address: localhost\n",
        3,
        14,
        "listeners[0].address",
        "invalid socket address",
    );
    assert_issue(
        "listeners:\n  - name: main\n",
        2,
        5,
        "listeners[0]",
        "missing field `address`",
    );
    assert_issue(
        "clusters:\n  - { name: c, endpoints: [a:1], lb: random }\n",
        2,
        38,
        "clusters[0].lb",
        "unknown variant `random`",
    );
    assert_issue("workers: -1\n", 1, 10, "workers", "invalid type");
}

#[test]
fn yaml_syntax_error_has_a_position() {
    let lines =
        error_lines("workers: 1\nlisteners:\n  - name: main\n    address: 127.0.0.1:0: oops\n");
    assert_eq!(
        lines,
        ["mesh.yaml:4:25: listeners[0]: mapping values are not allowed in this context"]
    );
    let error = load("listeners: [\n").unwrap_err();
    let issue = &error.issues()[0];
    assert!(issue.line.is_some(), "{issue:?}");
}

#[test]
fn empty_file_is_an_empty_config() {
    let config = load("").unwrap();
    assert!(config.listeners.is_empty());
    assert!(load("# nothing yet\n").is_ok());
}

// ---- from_file ----

#[test]
fn from_file_missing_file_names_the_path() {
    let path = Path::new("/nonexistent/lacewing/mesh.yaml");
    let error = from_file(path).unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
    let message = error.to_string();
    assert!(
        message.starts_with("/nonexistent/lacewing/mesh.yaml: cannot read:"),
        "{message}"
    );
}

#[test]
fn from_file_errors_name_the_file() {
    let dir = std::env::temp_dir().join(format!("lacewing-config-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(&good, FULL).unwrap();
    assert_eq!(from_file(&good).unwrap(), load(FULL).unwrap());

    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "workers: 1\nlisteners: 3\n").unwrap();
    let message = from_file(&bad).unwrap_err().to_string();
    let expected = format!("{}:2:12: listeners: invalid type", bad.display());
    assert!(message.starts_with(&expected), "{message}");
    std::fs::remove_dir_all(&dir).unwrap();
}

// ---- validation rules, one failing case each ----

#[test]
fn unknown_cluster_lists_known_ones() {
    let routes =
        "      - name: a\n        cluster: orders\n      - name: b\n        cluster: ordrs\n";
    let lines = error_lines(&with_routes(routes));
    assert_eq!(
        lines,
        [
            "mesh.yaml:8:9: listeners[0].routes[1].cluster: unknown cluster \"ordrs\" (known: orders, users)"
        ]
    );
}

#[test]
fn unknown_cluster_without_any_clusters() {
    let text = format!("{LISTENER_HEAD}      - {{ name: a, cluster: x }}\n");
    assert_issue(
        &text,
        5,
        20,
        "listeners[0].routes[0].cluster",
        "unknown cluster \"x\" (no clusters are defined)",
    );
}

#[test]
fn duplicate_listener_names() {
    let text = format!(
        "{LISTENER_HEAD}      - {{ name: a, cluster: orders }}\n  - {{ name: main, address: 127.0.0.1:0, protocol: tcp, cluster: orders }}\n{CLUSTERS}"
    );
    assert_issue(
        &text,
        6,
        7,
        "listeners[1].name",
        "duplicate listener name \"main\" (also listeners[0])",
    );
}

#[test]
fn duplicate_cluster_names() {
    let text = format!(
        "{LISTENER_HEAD}      - {{ name: a, cluster: orders }}\n{CLUSTERS}  - {{ name: orders, endpoints: [\"127.0.0.1:1\"] }}\n"
    );
    assert_issue(
        &text,
        11,
        7,
        "clusters[2].name",
        "duplicate cluster name \"orders\"",
    );
}

#[test]
fn duplicate_plugin_names() {
    let text = "plugins:\n  - { name: p, module: a.wasm }\n  - { name: p, module: b.wasm }\n";
    assert_issue(text, 3, 7, "plugins[1].name", "duplicate plugin name \"p\"");
}

#[test]
fn duplicate_route_names() {
    let routes = "      - { name: a, cluster: orders }\n      - { name: a, cluster: users }\n";
    assert_issue(
        &with_routes(routes),
        6,
        11,
        "listeners[0].routes[1].name",
        "duplicate route name \"a\" (also listeners[0].routes[0])",
    );
}

#[test]
fn empty_names_are_rejected() {
    assert_issue(
        &with_routes("      - { name: \"\", cluster: orders }\n"),
        5,
        11,
        "listeners[0].routes[0].name",
        "non-empty name",
    );
}

#[test]
fn route_with_cluster_and_weighted_clusters() {
    let routes = "      - name: a\n        cluster: orders\n        weighted_clusters: [{ cluster: users, weight: 1 }]\n";
    assert_issue(
        &with_routes(routes),
        6,
        9,
        "listeners[0].routes[0].cluster",
        "either `cluster` or `weighted_clusters`, not both",
    );
}

#[test]
fn route_without_destination() {
    let routes = "      - name: a\n        timeout: 1s\n";
    assert_issue(
        &with_routes(routes),
        5,
        7,
        "listeners[0].routes[0]",
        "needs `cluster` or `weighted_clusters`",
    );
}

#[test]
fn weighted_clusters_need_positive_total_and_known_clusters() {
    let routes = "      - name: a\n        weighted_clusters:\n          - { cluster: orders, weight: 0 }\n          - { cluster: userz, weight: 0 }\n";
    let text = with_routes(routes);
    assert_issue(
        &text,
        6,
        9,
        "listeners[0].routes[0].weighted_clusters",
        "the weights add up to 0",
    );
    assert_issue(
        &text,
        8,
        15,
        "listeners[0].routes[0].weighted_clusters[1].cluster",
        "unknown cluster \"userz\"",
    );
    let zero_share = "      - name: a\n        weighted_clusters:\n          - { cluster: orders, weight: 100 }\n          - { cluster: users, weight: 0 }\n";
    assert!(load(&with_routes(zero_share)).is_ok());
}

#[test]
fn unknown_plugins_in_filters() {
    let text = format!(
        "{LISTENER_HEAD}      - {{ name: a, cluster: orders, filters: [authz] }}\n{CLUSTERS}plugins:\n  - {{ name: echo, module: e.wasm }}\n"
    );
    assert_issue(
        &text,
        5,
        47,
        "listeners[0].routes[0].filters[0]",
        "unknown plugin \"authz\" (known: echo)",
    );
    let text = format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    filters: [echo, missing]\n    routes: [{{ name: a, cluster: orders }}]\n{CLUSTERS}plugins:\n  - {{ name: echo, module: e.wasm }}\n"
    );
    assert_issue(
        &text,
        4,
        21,
        "listeners[0].filters[1]",
        "unknown plugin \"missing\"",
    );
}

#[test]
fn tcp_listener_needs_cluster_and_no_routes() {
    let text = format!(
        "listeners:\n  - name: raw\n    address: 127.0.0.1:0\n    protocol: tcp\n    routes: [{{ name: a, cluster: orders }}]\n{CLUSTERS}"
    );
    assert_issue(
        &text,
        2,
        3,
        "listeners[0].cluster",
        "a tcp listener needs the cluster",
    );
    assert_issue(
        &text,
        5,
        5,
        "listeners[0].routes",
        "a tcp listener has no routes",
    );
}

#[test]
fn tcp_listener_cluster_must_exist() {
    let text = format!(
        "listeners:\n  - {{ name: raw, address: 127.0.0.1:0, protocol: tcp, cluster: nope }}\n{CLUSTERS}"
    );
    assert_issue(
        &text,
        2,
        55,
        "listeners[0].cluster",
        "unknown cluster \"nope\"",
    );
}

#[test]
fn http_listener_takes_no_cluster() {
    let text = format!(
        "listeners:\n  - name: web\n    address: 127.0.0.1:0\n    cluster: orders\n{CLUSTERS}"
    );
    assert_issue(
        &text,
        4,
        5,
        "listeners[0].cluster",
        "only tcp listeners take a cluster",
    );
}

#[test]
fn bad_path_regex_reports_the_regex_error() {
    let routes = "      - name: a\n        cluster: orders\n        match:\n          path: { regex: \"^/(api\" }\n";
    assert_issue(
        &with_routes(routes),
        8,
        19,
        "listeners[0].routes[0].match.path.regex",
        "bad regex \"^/(api\": unclosed group",
    );
}

#[test]
fn bad_header_regex_reports_the_regex_error() {
    let routes = "      - name: a\n        cluster: orders\n        match:\n          headers:\n            - name: x-version\n              regex: \"v[0-9\"\n";
    assert_issue(
        &with_routes(routes),
        10,
        15,
        "listeners[0].routes[0].match.headers[0].regex",
        "bad regex \"v[0-9\": unclosed character class",
    );
}

#[test]
fn header_name_must_be_a_lowercase_token() {
    let routes = "      - { name: a, cluster: orders, match: { headers: [{ name: X-Canary, present: true }, { name: \"a b\" }] } }\n";
    let text = with_routes(routes);
    assert_issue(
        &text,
        5,
        58,
        "listeners[0].routes[0].match.headers[0].name",
        "\"X-Canary\" is not a header name",
    );
    assert_issue(
        &text,
        5,
        93,
        "listeners[0].routes[0].match.headers[1].name",
        "\"a b\" is not a header name",
    );
}

#[test]
fn header_match_takes_exact_or_regex() {
    let routes = "      - { name: a, cluster: orders, match: { headers: [{ name: x, exact: a, regex: b }] } }\n";
    assert_issue(
        &with_routes(routes),
        5,
        77,
        "listeners[0].routes[0].match.headers[0].regex",
        "either `exact` or `regex`",
    );
}

#[test]
fn method_must_be_a_token() {
    let routes = "      - { name: a, cluster: orders, match: { method: \"GE T\" } }\n";
    assert_issue(
        &with_routes(routes),
        5,
        46,
        "listeners[0].routes[0].match.method",
        "\"GE T\" is not an HTTP method",
    );
}

#[test]
fn path_prefix_must_start_with_slash() {
    let routes = "      - { name: a, cluster: orders, match: { path: { prefix: api } } }\n";
    assert_issue(
        &with_routes(routes),
        5,
        54,
        "listeners[0].routes[0].match.path.prefix",
        "does not start with `/`",
    );
}

#[test]
fn no_routes_and_no_endpoints_are_valid() {
    let text = "listeners:\n  - name: web\n    address: 127.0.0.1:0\nclusters:\n  - name: c\n    endpoints: []\n";
    let config = load(text).expect("valid");
    assert!(config.listeners[0].routes.is_empty());
    assert!(config.clusters[0].endpoints.is_empty());
}

#[test]
fn endpoints_must_be_host_port() {
    let text = "clusters:\n  - name: c\n    endpoints:\n      - 127.0.0.1:80\n      - 127.0.0.1\n      - \"orders:0\"\n      - \"[::1]:8080\"\n";
    assert_issue(text, 5, 7, "clusters[0].endpoints[1]", "is not host:port");
    assert_issue(
        text,
        6,
        7,
        "clusters[0].endpoints[2]",
        "port must be a number from 1 to 65535",
    );
    assert_eq!(error_lines(text).len(), 2);
}

#[test]
fn zero_durations_are_rejected() {
    let text = format!(
        "{LISTENER_HEAD}      - {{ name: a, cluster: orders, timeout: 0s }}\n{CLUSTERS}  - {{ name: z, endpoints: [\"a:1\"], connect_timeout: 0ms }}\nplugins:\n  - name: p\n    module: p.wasm\n    limits:\n      callback_timeout: 0s\n"
    );
    assert_issue(
        &text,
        5,
        37,
        "listeners[0].routes[0].timeout",
        "longer than zero",
    );
    assert_issue(
        &text,
        11,
        36,
        "clusters[2].connect_timeout",
        "longer than zero",
    );
    assert_issue(
        &text,
        16,
        7,
        "plugins[0].limits.callback_timeout",
        "longer than zero",
    );
}

#[test]
fn outlier_ejection_percent_at_most_100() {
    let text = "clusters:\n  - name: c\n    endpoints: [\"a:1\"]\n    outlier_detection:\n      max_ejection_percent: 101\n";
    assert_issue(
        text,
        5,
        7,
        "clusters[0].outlier_detection.max_ejection_percent",
        "101% is more than 100%",
    );
}

#[test]
fn retry_budget_ratio_between_0_and_1() {
    let text =
        "clusters:\n  - name: c\n    endpoints: [\"a:1\"]\n    retry_budget: { ratio: 1.5 }\n";
    assert_issue(
        text,
        4,
        21,
        "clusters[0].retry_budget.ratio",
        "1.5 is not a share between 0 and 1",
    );
}

#[test]
fn circuit_breaker_limits_at_least_1() {
    let text = "clusters:\n  - name: c\n    endpoints: [\"a:1\"]\n    circuit_breaker: { max_requests: 0 }\n";
    assert_issue(
        text,
        4,
        24,
        "clusters[0].circuit_breaker.max_requests",
        "must be at least 1",
    );
}

#[test]
fn retry_statuses_are_http_statuses() {
    let routes = "      - { name: a, cluster: orders, retry: { on_status: [503, 99] } }\n";
    assert_issue(
        &with_routes(routes),
        5,
        63,
        "listeners[0].routes[0].retry.on_status[1]",
        "99 is not an HTTP status",
    );
}

#[test]
fn plugin_module_must_not_be_empty() {
    assert_issue(
        "plugins:\n  - name: p\n    module: \"\"\n",
        3,
        5,
        "plugins[0].module",
        "must not be empty",
    );
}

#[test]
fn plugin_sha256_is_64_hex_digits() {
    let text = "plugins:\n  - name: p\n    module: p.wasm\n    sha256: abc123\n";
    assert_issue(
        text,
        4,
        5,
        "plugins[0].sha256",
        "\"abc123\" is not a sha256 (64 hex digits)",
    );
    let good = format!(
        "plugins:\n  - {{ name: p, module: p.wasm, sha256: {} }}\n",
        "aB".repeat(32)
    );
    assert!(load(&good).is_ok());
}

#[test]
fn plugin_memory_at_least_one_page() {
    let text = "plugins:\n  - { name: p, module: p.wasm, limits: { memory: 1KiB } }\n";
    assert_issue(
        text,
        2,
        42,
        "plugins[0].limits.memory",
        "less than one wasm page",
    );
}

#[test]
fn plugin_allowed_clusters_must_exist() {
    let text = format!(
        "{CLUSTERS}plugins:\n  - {{ name: p, module: p.wasm, allowed_clusters: [orders, billing] }}\n"
    );
    assert_issue(
        &text,
        7,
        59,
        "plugins[0].allowed_clusters[1]",
        "unknown cluster \"billing\" (known: orders, users)",
    );
}

#[test]
fn max_request_headers_below_what_http1_can_enforce_is_rejected() {
    for (value, shown) in [("512", "512"), ("8191", "8191"), ("4KiB", "4KiB")] {
        let text = format!(
            "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    routes: [{{ name: a, cluster: orders }}]\n    limits:\n      max_request_headers: {value}\n{CLUSTERS}"
        );
        assert_issue(
            &text,
            6,
            7,
            "listeners[0].limits.max_request_headers",
            &format!(
                "{shown} is too small: at least 8KiB (the smallest request head limit HTTP/1.1 can enforce)"
            ),
        );
    }
    let text = format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    routes: [{{ name: a, cluster: orders }}]\n    limits:\n      max_request_headers: 8KiB\n{CLUSTERS}"
    );
    assert!(load(&text).is_ok());
}

#[test]
fn duplicate_listener_addresses() {
    let text = format!(
        "admin: {{ address: 127.0.0.1:9000 }}\nlisteners:\n  - {{ name: a, address: 127.0.0.1:8080, protocol: tcp, cluster: orders }}\n  - {{ name: b, address: 127.0.0.1:8080, protocol: tcp, cluster: orders }}\n  - {{ name: c, address: 127.0.0.1:9000, protocol: tcp, cluster: orders }}\n  - {{ name: d, address: 127.0.0.1:0, protocol: tcp, cluster: orders }}\n  - {{ name: e, address: 127.0.0.1:0, protocol: tcp, cluster: orders }}\n{CLUSTERS}"
    );
    assert_issue(
        &text,
        4,
        16,
        "listeners[1].address",
        "127.0.0.1:8080 is already used by another listener",
    );
    assert_issue(
        &text,
        5,
        16,
        "listeners[2].address",
        "127.0.0.1:9000 is already used by the admin endpoint",
    );
    assert_eq!(error_lines(&text).len(), 2);
}

#[test]
fn all_problems_are_reported_one_per_line_in_document_order() {
    let text = "\
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - { name: a, cluster: nope }
      - { name: b, cluster: orders, timeout: 0s }
clusters:
  - { name: orders, endpoints: [\"127.0.0.1\"] }
";
    assert_eq!(
        error_lines(text),
        [
            "mesh.yaml:5:20: listeners[0].routes[0].cluster: unknown cluster \"nope\" (known: orders)",
            "mesh.yaml:6:37: listeners[0].routes[1].timeout: must be longer than zero",
            "mesh.yaml:8:33: clusters[0].endpoints[0]: \"127.0.0.1\" is not host:port",
        ]
    );
}

#[test]
fn validate_without_a_file_names_fields_only() {
    let mut config = load(FULL).unwrap();
    config.listeners[0].routes[0].cluster = Some("gone".into());
    let message = validate(&config).unwrap_err().to_string();
    assert_eq!(
        message,
        "listeners[0].routes[0].cluster: unknown cluster \"gone\" (known: backend)"
    );
}

/// The YAML blocks of `docs/config.md` that show whole configurations load as they are.
#[test]
fn documented_examples_load() {
    let doc = include_str!("../../../docs/config.md");
    let blocks: Vec<&str> = doc
        .split("```yaml\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(block, _)| block))
        .collect();
    assert!(blocks.len() >= 2, "{blocks:?}");
    let full = from_yaml_str(blocks[0], "docs/config.md").unwrap();
    assert_eq!(full.listeners.len(), 2);
    assert_eq!(
        full.plugin("authz").unwrap().configuration_bytes(),
        br#"{"rules":[{"allow":["ops"],"path":"/admin"}]}"#
    );
    // The flags-mode equivalent, with the placeholder cluster made concrete.
    let flags = blocks[1].replace("\"HOST:PORT\"", "\"127.0.0.1:7000\"");
    from_yaml_str(&flags, "docs/config.md").unwrap();
}

#[test]
fn edge_timers_and_shares_are_checked_where_they_are_written() {
    let text = format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    routes: [{{ name: a, cluster: orders }}]\n    limits:\n      upstream_body_timeout: 0s\n      write_timeout: 0ms\n      max_concurrent_streams: 0\n      max_upstream_share: 1.5\n      max_connection_duration: 0s\n      max_stream_duration: 0s\n{CLUSTERS}"
    );
    assert_issue(
        &text,
        11,
        7,
        "listeners[0].limits.max_stream_duration",
        "longer than zero",
    );
    assert_issue(
        &text,
        10,
        7,
        "listeners[0].limits.max_connection_duration",
        "longer than zero",
    );
    assert_issue(
        &text,
        6,
        7,
        "listeners[0].limits.upstream_body_timeout",
        "longer than zero",
    );
    assert_issue(
        &text,
        7,
        7,
        "listeners[0].limits.write_timeout",
        "longer than zero",
    );
    assert_issue(
        &text,
        8,
        7,
        "listeners[0].limits.max_concurrent_streams",
        "must be at least 1",
    );
    assert_issue(
        &text,
        9,
        7,
        "listeners[0].limits.max_upstream_share",
        "1.5 is not a share: give a number above 0 and at most 1",
    );
    let defaults = load(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    routes: [{{ name: a, cluster: orders }}]\n{CLUSTERS}"
    ))
    .unwrap();
    let limits = &defaults.listeners[0].limits;
    assert_eq!(limits.upstream_body_timeout.0, Duration::from_secs(60));
    assert_eq!(limits.write_timeout.0, Duration::from_secs(60));
    assert_eq!(limits.max_concurrent_streams, 1024);
    assert_eq!(limits.max_upstream_share, 0.5);
    assert_eq!(limits.max_connection_duration, None);
    assert_eq!(limits.max_stream_duration, None);
    assert_eq!(limits.stream_idle_timeout.0, Duration::from_secs(300));
    // Zero turns the stream idle timer off: accepted as written.
    let off = load(&format!(
        "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    routes: [{{ name: a, cluster: orders }}]\n    limits: {{ stream_idle_timeout: 0s }}\n{CLUSTERS}"
    ))
    .unwrap();
    assert!(off.listeners[0].limits.stream_idle_timeout.0.is_zero());
}

#[test]
fn the_connection_buffer_is_an_http2_window_size() {
    let listener = |buffer: &str| {
        format!(
            "listeners:\n  - name: main\n    address: 127.0.0.1:0\n    routes: [{{ name: a, cluster: orders }}]\n    limits:\n      max_connection_buffer: {buffer}\n{CLUSTERS}"
        )
    };
    for buffer in ["1KiB", "2GiB"] {
        assert_issue(
            &listener(buffer),
            6,
            7,
            "listeners[0].limits.max_connection_buffer",
            "is out of range: from 65535 to 2147483647 bytes",
        );
    }
    let config = load(&listener("256KiB")).unwrap();
    assert_eq!(
        config.listeners[0].limits.max_connection_buffer.0,
        256 * 1024
    );
    let defaults = lacewing_config::ListenerLimits::default();
    assert_eq!(defaults.max_connection_buffer.0, 1024 * 1024);
}

#[test]
fn tls_sections_parse_and_bad_values_name_their_line_and_field() {
    let good = "\
listeners:
  - name: inbound
    address: 127.0.0.1:0
    tls: { mode: strict }
    routes: [{ name: all, cluster: orders }]
clusters:
  - name: orders
    endpoints: [\"127.0.0.1:3000\"]
    tls: { peer: \"spiffe://mesh.local/ns/default/sa/orders\" }
";
    let config = load(good).unwrap();
    let tls = config.listeners[0].tls.as_ref().unwrap();
    assert_eq!(tls.mode, lacewing_config::ListenerTlsMode::Strict);
    assert_eq!(tls.handshake_timeout.0, Duration::from_secs(10));
    assert_eq!(
        config.clusters[0].tls.as_ref().unwrap().peer,
        "spiffe://mesh.local/ns/default/sa/orders"
    );

    let bad_peer = good.replace("sa/orders\" }", "orders\" }");
    assert_issue(
        &bad_peer,
        9,
        12,
        "clusters[0].tls.peer",
        "is not a mesh SPIFFE ID",
    );
    let bad_timeout = good.replace("mode: strict }", "mode: strict, handshake_timeout: 0s }");
    assert_issue(
        &bad_timeout,
        4,
        26,
        "listeners[0].tls.handshake_timeout",
        "must be longer than zero",
    );
    let bad_mode = good.replace("mode: strict", "mode: sometimes");
    assert!(error_lines(&bad_mode)[0].contains("listeners[0].tls.mode"));
}

#[test]
fn identity_files_parse_and_an_empty_path_names_its_field() {
    let good = "\
tls:
  cert_file: certs/proxy.pem
  key_file: certs/proxy.key
  trust_file: certs/ca.pem
listeners:
  - { name: inbound, address: 127.0.0.1:0, tls: { mode: strict }, routes: [{ name: all, cluster: orders }] }
clusters:
  - { name: orders, endpoints: [\"127.0.0.1:3000\"] }
";
    let config = load(good).unwrap();
    let files = config.tls.as_ref().unwrap();
    assert_eq!(files.cert_file, std::path::Path::new("certs/proxy.pem"));
    assert_eq!(files.trust_file, std::path::Path::new("certs/ca.pem"));
    let empty = good.replace("certs/proxy.key", "\"\"");
    assert!(
        error_lines(&empty)
            .iter()
            .any(|l| l.contains("tls.key_file") && l.contains("must not be empty")),
        "{:?}",
        error_lines(&empty)
    );
    let unknown = good.replace("trust_file", "ca_file");
    assert!(error_lines(&unknown)[0].contains("ca_file"));
}
