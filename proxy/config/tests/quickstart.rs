//! The flags mode: `lacewing proxy --listen ... --upstream ... --wasm ...` as a configuration.

use std::net::SocketAddr;

use lacewing_config::quickstart::{LISTENER_NAME, ROUTE_NAME, UPSTREAM_CLUSTER};
use lacewing_config::{
    ConfigError, ListenerProtocol, QuickStart, RouteMatch, UpstreamProtocol, WasmFlag,
    parse_cluster_flag,
};

fn addr(text: &str) -> SocketAddr {
    text.parse().unwrap()
}

fn flags() -> QuickStart {
    QuickStart {
        listen: addr("127.0.0.1:8080"),
        upstreams: vec!["127.0.0.1:3000".into()],
        upstream_protocol: UpstreamProtocol::Http1,
        wasm: Vec::new(),
        clusters: Vec::new(),
        admin: None,
        workers: 0,
        access_log: false,
    }
}

fn wasm(path: &str) -> WasmFlag {
    WasmFlag {
        path: path.into(),
        config: None,
        root_id: None,
    }
}

#[test]
fn listen_and_upstream_make_one_listener_route_and_cluster() {
    let mut quick = flags();
    quick.upstreams.push("localhost:3001".into());
    quick.upstream_protocol = UpstreamProtocol::H2;
    quick.admin = Some(addr("127.0.0.1:9901"));
    quick.workers = 2;
    quick.access_log = true;
    let config = quick.into_config().unwrap();

    assert_eq!(config.workers, 2);
    assert_eq!(config.admin.address, Some(addr("127.0.0.1:9901")));
    assert_eq!(config.access_log.as_ref().unwrap().path, "stdout");
    assert_eq!(config.listeners.len(), 1);
    let listener = &config.listeners[0];
    assert_eq!(listener.name, LISTENER_NAME);
    assert_eq!(listener.name, "main");
    assert_eq!(listener.address, addr("127.0.0.1:8080"));
    assert_eq!(listener.protocol, ListenerProtocol::Http);
    assert!(listener.filters.is_empty());
    assert_eq!(listener.routes.len(), 1);
    let route = &listener.routes[0];
    assert_eq!(route.name, ROUTE_NAME);
    assert_eq!(route.name, "default");
    assert_eq!(route.matches, RouteMatch::default());
    assert_eq!(route.cluster.as_deref(), Some(UPSTREAM_CLUSTER));
    assert_eq!(config.clusters.len(), 1);
    let upstream = &config.clusters[0];
    assert_eq!(upstream.name, "upstream");
    assert_eq!(upstream.endpoints, ["127.0.0.1:3000", "localhost:3001"]);
    assert_eq!(upstream.protocol, UpstreamProtocol::H2);
    assert!(config.plugins.is_empty());
}

#[test]
fn without_admin_flag_the_admin_endpoint_is_off() {
    let config = flags().into_config().unwrap();
    assert_eq!(config.admin.address, None);
    assert!(config.access_log.is_none());
}

#[test]
fn wasm_flags_become_a_chain_of_plugins_named_after_files() {
    let mut quick = flags();
    quick.wasm = vec![
        WasmFlag {
            config: Some(r#"{"k":"v"}"#.into()),
            root_id: Some("auth_root".into()),
            ..wasm("./filters/authz.wasm")
        },
        wasm("target/wasm32-wasip1/wasm/header_echo.wasm"),
        wasm("other/authz.wasm"),
        wasm("authz.wasm"),
    ];
    let config = quick.into_config().unwrap();
    let names: Vec<&str> = config.plugins.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["authz", "header_echo", "authz-2", "authz-3"]);
    assert_eq!(config.listeners[0].filters, names);
    let authz = &config.plugins[0];
    assert_eq!(authz.module, "./filters/authz.wasm");
    assert_eq!(authz.root_id, "auth_root");
    assert_eq!(
        authz.configuration,
        Some(serde_json::Value::String(r#"{"k":"v"}"#.into()))
    );
    assert_eq!(authz.configuration_bytes(), br#"{"k":"v"}"#);
    assert_eq!(config.plugins[1].root_id, "");
    assert!(config.plugins[1].configuration_bytes().is_empty());
}

#[test]
fn wasm_config_from_file() {
    let path =
        std::env::temp_dir().join(format!("lacewing-wasm-config-{}.json", std::process::id()));
    std::fs::write(&path, "{\"rules\": [1, 2]}\n").unwrap();
    let mut quick = flags();
    quick.wasm = vec![WasmFlag {
        config: Some(format!("@{}", path.display())),
        ..wasm("f.wasm")
    }];
    let config = quick.into_config().unwrap();
    assert_eq!(
        config.plugins[0].configuration_bytes(),
        b"{\"rules\": [1, 2]}\n"
    );
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn wasm_config_missing_file_names_it() {
    let mut quick = flags();
    quick.wasm = vec![WasmFlag {
        config: Some("@/nonexistent/lacewing/filter.json".into()),
        ..wasm("f.wasm")
    }];
    let error = quick.into_config().unwrap_err();
    assert!(matches!(error, ConfigError::Read { .. }), "{error:?}");
    assert!(
        error
            .to_string()
            .starts_with("/nonexistent/lacewing/filter.json: cannot read:"),
        "{error}"
    );
}

#[test]
fn cluster_flags_add_clusters_and_endpoints() {
    let mut quick = flags();
    quick.clusters = vec![
        parse_cluster_flag("auth=127.0.0.1:7000").unwrap(),
        parse_cluster_flag("ratelimit=[::1]:7001").unwrap(),
        parse_cluster_flag("auth=127.0.0.1:7002").unwrap(),
    ];
    let config = quick.into_config().unwrap();
    let names: Vec<&str> = config.clusters.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["upstream", "auth", "ratelimit"]);
    assert_eq!(
        config.cluster("auth").unwrap().endpoints,
        ["127.0.0.1:7000", "127.0.0.1:7002"]
    );
    assert_eq!(
        config.cluster("ratelimit").unwrap().endpoints,
        ["[::1]:7001"]
    );
}

#[test]
fn parse_cluster_flag_errors_name_the_flag() {
    assert_eq!(
        parse_cluster_flag(" auth = a:1").unwrap(),
        ("auth".to_string(), "a:1".to_string())
    );
    for (bad, reason) in [
        ("auth", "\"auth\" is not NAME=HOST:PORT"),
        ("=a:1", "the cluster name must be non-empty"),
        ("auth=a", "\"a\" is not host:port"),
        ("auth=a:0", "port must be a number from 1 to 65535"),
    ] {
        let message = parse_cluster_flag(bad).unwrap_err().to_string();
        assert!(
            message.starts_with("--cluster: ") && message.contains(reason),
            "{bad}: {message}"
        );
    }
}

#[test]
fn bad_or_missing_upstream_is_rejected() {
    let mut quick = flags();
    quick.upstreams.clear();
    let message = quick.into_config().unwrap_err().to_string();
    assert_eq!(
        message,
        "--upstream: at least one upstream HOST:PORT is required"
    );

    let mut quick = flags();
    quick.upstreams = vec!["127.0.0.1".into()];
    let message = quick.into_config().unwrap_err().to_string();
    assert_eq!(message, "--upstream: \"127.0.0.1\" is not host:port");
}

#[test]
fn listen_address_clashing_with_admin_is_rejected() {
    let mut quick = flags();
    quick.admin = Some(quick.listen);
    let message = quick.into_config().unwrap_err().to_string();
    assert_eq!(
        message,
        "--listen: 127.0.0.1:8080 is already used by the admin endpoint"
    );
}

#[test]
fn validation_errors_name_the_flag() {
    let mut quick = flags();
    quick.clusters = vec![("auth".into(), "127.0.0.1:99999".into())];
    let message = quick.into_config().unwrap_err().to_string();
    assert_eq!(
        message,
        "--cluster auth: \"127.0.0.1:99999\": port must be a number from 1 to 65535"
    );
}
