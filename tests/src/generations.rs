//! Configurations for tests that publish generations: two echo upstreams,
//! `a` and `b`, and listener `main` whose route goes to one of them through
//! plugin `tagger` (the conformance module), which tags every response
//! `x-response-chain: <tag>`. A response thus names its generation.

use std::path::PathBuf;

use lacewing_config::ProxyConfig;

use crate::client::Response;
use crate::proxy;
use crate::servers::{self, TestServer};
use crate::wasm::{module, yaml_path};

/// The upstreams and module the configurations refer to.
pub struct Generations {
    pub a: TestServer,
    pub b: TestServer,
    pub module: PathBuf,
}

impl Generations {
    /// Starts echo upstreams `a` and `b` and builds the conformance module.
    pub async fn start() -> Self {
        Self {
            a: servers::http_echo_named("a").await,
            b: servers::http_echo_named("b").await,
            module: module("conformance-filter"),
        }
    }

    /// A config with `workers` workers whose route goes to cluster `target`
    /// and whose plugin is configured with `tag=<tag>` (more words may follow
    /// the tag, e.g. `A tick_ms=50`).
    pub fn yaml(&self, target: &str, tag: &str, workers: usize) -> String {
        proxy::fill(
            "admin: { address: 127.0.0.1:0 }
workers: {workers}
drain_timeout: 1s
listeners:
  - name: main
    address: 127.0.0.1:0
    filters: [tagger]
    routes:
      - { name: default, cluster: {target} }
clusters:
  - { name: a, endpoints: ['{a}'] }
  - { name: b, endpoints: ['{b}'] }
plugins:
  - { name: tagger, module: {module}, configuration: 'tag={tag}', limits: { callback_timeout: 5s } }
",
            &[
                ("workers", &workers),
                ("target", &target),
                ("a", &self.a.addr),
                ("b", &self.b.addr),
                ("module", &yaml_path(&self.module)),
                ("tag", &tag),
            ],
        )
    }

    /// [`Generations::yaml`], loaded.
    pub fn config(&self, target: &str, tag: &str, workers: usize) -> ProxyConfig {
        parse(&self.yaml(target, tag, workers))
    }
}

/// Loads a test config; panics with the error and the text when it does not load.
pub fn parse(yaml: &str) -> ProxyConfig {
    lacewing_config::load::from_yaml_str(yaml, proxy::TEST_CONFIG_NAME)
        .unwrap_or_else(|e| panic!("test config does not load: {e}\n{yaml}"))
}

/// The generation a response came from: (upstream that answered, plugin tag).
pub fn generation_of(response: &Response) -> (String, String) {
    (
        response.header("x-upstream").unwrap_or("-").to_string(),
        response
            .header("x-response-chain")
            .unwrap_or("-")
            .to_string(),
    )
}
