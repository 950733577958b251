//! Fuzz targets for the config loader: any text, and any value in any field
//! of a valid config, loads or fails with an error naming where; the loader
//! never panics. Each runs for about a second under `cargo test`;
//! `BOLERO_RANDOM_TEST_TIME_MS` runs it longer (docs/security.md).

use lacewing_config::load::from_yaml_str;

const ORIGIN: &str = "fuzz.yaml";

/// A valid config whose values are `{0}`..`{N}`, each replaced by a generated
/// string, so the fuzzer reaches validation and not only the YAML parser.
const TEMPLATE: &str = "admin: { address: {0} }
workers: {1}
drain_timeout: {2}
listeners:
  - name: {3}
    address: {4}
    limits: { max_request_headers: {5}, max_connections: {6}, header_read_timeout: {7} }
    routes:
      - name: api
        match: { path: { prefix: {8} }, method: {9}, authority: {10}, headers: [{ name: {11}, exact: {12} }] }
        cluster: backend
        timeout: {13}
        retry: { attempts: {14}, on_status: [{15}] }
      - name: split
        weighted_clusters: [{ cluster: backend, weight: {16} }, { cluster: {17}, weight: 1 }]
  - { name: raw, address: 127.0.0.1:0, protocol: {18}, cluster: backend }
clusters:
  - { name: backend, endpoints: [{19}], protocol: {20}, lb: {21}, connect_timeout: {22} }
plugins:
  - { name: echo, module: {23}, configuration: {24}, fail: {25}, limits: { memory: {26}, callback_timeout: {27} } }
";

/// The template's values in a config that loads.
const VALID: [&str; 28] = [
    "127.0.0.1:0",
    "1",
    "1s",
    "main",
    "127.0.0.1:0",
    "64KiB",
    "100",
    "10s",
    "/api",
    "GET",
    "api.example",
    "x-canary",
    "\"1\"",
    "2s",
    "2",
    "503",
    "3",
    "backend",
    "tcp",
    "\"127.0.0.1:3000\"",
    "http1",
    "least_request",
    "1s",
    "x.wasm",
    "\"x-a=x-b\"",
    "closed",
    "16MiB",
    "50ms",
];

fn fill(values: &[String]) -> String {
    (0..VALID.len())
        .rev()
        .fold(TEMPLATE.to_string(), |text, i| {
            text.replace(&format!("{{{i}}}"), &values[i])
        })
}

#[test]
fn the_template_loads_with_its_valid_values() {
    let values: Vec<String> = VALID.iter().map(|v| v.to_string()).collect();
    if let Err(e) = from_yaml_str(&fill(&values), ORIGIN) {
        panic!("{e}");
    }
}

#[test]
fn fuzz_any_text_loads_or_fails_cleanly() {
    bolero::check!().for_each(|bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        if let Err(e) = from_yaml_str(&text, ORIGIN) {
            assert!(!e.to_string().is_empty());
        }
    });
}

#[test]
fn fuzz_any_field_value_loads_or_fails_with_a_located_error() {
    bolero::check!()
        .with_type::<Vec<(u8, String)>>()
        .for_each(|changes| {
            let mut values: Vec<String> = VALID.iter().map(|v| v.to_string()).collect();
            for (slot, value) in changes {
                values[usize::from(*slot) % VALID.len()] = value.clone();
            }
            if let Err(e) = from_yaml_str(&fill(&values), ORIGIN) {
                let text = e.to_string();
                assert!(text.contains(ORIGIN), "an error names its file: {text}");
            }
        });
}
