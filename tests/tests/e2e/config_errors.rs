//! Config mistakes are reported as `<file>:<line>:<col>: <field>: <reason>`,
//! both by the loader and by `lacewing validate`.

use std::path::PathBuf;
use std::process::Command;

use lacewing_config::load::from_yaml_str;
use lacewing_tests::process::lacewing_binary;

/// A config with a YAML syntax error on line 5.
const BAD_SYNTAX: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0: oops
    routes: [{ name: r, cluster: c }]
clusters:
  - { name: c, endpoints: ['127.0.0.1:9'] }
";
const BAD_SYNTAX_LINE: usize = 5;

/// A config whose `workers` (line 2) has the wrong type.
const BAD_TYPE: &str = "admin: { address: 127.0.0.1:0 }
workers: many
listeners: []
";
const BAD_TYPE_LINE: usize = 2;

/// A config whose route (line 8) names a cluster that does not exist.
const UNKNOWN_CLUSTER: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - name: r
        cluster: nowhere
clusters:
  - { name: c, endpoints: ['127.0.0.1:9'] }
";
const UNKNOWN_CLUSTER_LINE: usize = 8;

/// A config whose path regex (line 8) does not compile.
const BAD_REGEX: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - name: r
        match: { path: { regex: '/items/([0-9' } }
        cluster: c
clusters:
  - { name: c, endpoints: ['127.0.0.1:9'] }
";
const BAD_REGEX_LINE: usize = 8;

const GOOD: &str = "admin: { address: 127.0.0.1:0 }
workers: 1
listeners:
  - name: main
    address: 127.0.0.1:0
    routes:
      - { name: r, cluster: c }
clusters:
  - { name: c, endpoints: ['127.0.0.1:9'] }
";

/// Asserts that one line of `message` starts with `<origin>:<line>:<col>:` and mentions every word.
fn assert_positioned(message: &str, origin: &str, line: usize, words: &[&str]) {
    let prefix = format!("{origin}:{line}:");
    let positioned = message.lines().find(|l| {
        l.find(&prefix).is_some_and(|at| {
            let rest = &l[at + prefix.len()..];
            // A column follows the line: `<col>: `.
            rest.split_once(':')
                .is_some_and(|(col, _)| !col.is_empty() && col.chars().all(|c| c.is_ascii_digit()))
        })
    });
    let Some(positioned) = positioned else {
        panic!("no `{prefix}<col>:` in the error:\n{message}");
    };
    for word in words {
        assert!(
            positioned.contains(word),
            "the error line should mention `{word}`: {positioned}"
        );
    }
}

fn load_error(yaml: &str) -> String {
    match from_yaml_str(yaml, "bad.yaml") {
        Ok(_) => panic!("config should be rejected:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn yaml_syntax_error_names_file_and_line() {
    assert_positioned(&load_error(BAD_SYNTAX), "bad.yaml", BAD_SYNTAX_LINE, &[]);
}

#[test]
fn wrong_type_names_file_line_and_field() {
    assert_positioned(
        &load_error(BAD_TYPE),
        "bad.yaml",
        BAD_TYPE_LINE,
        &["workers"],
    );
}

#[test]
fn unknown_cluster_names_file_line_and_cluster() {
    assert_positioned(
        &load_error(UNKNOWN_CLUSTER),
        "bad.yaml",
        UNKNOWN_CLUSTER_LINE,
        &["listeners[0].routes[0].cluster", "nowhere"],
    );
}

#[test]
fn bad_regex_names_file_line_and_field() {
    assert_positioned(
        &load_error(BAD_REGEX),
        "bad.yaml",
        BAD_REGEX_LINE,
        &["regex"],
    );
}

#[test]
fn good_config_loads() {
    let config = from_yaml_str(GOOD, "good.yaml").expect("the good config loads");
    assert_eq!(config.listeners[0].name, "main");
}

/// A scratch directory for config files, unique to this test process.
fn scratch_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lacewing-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// Runs `lacewing validate <file>`; returns (success, stdout + stderr).
fn validate_file(name: &str, yaml: &str) -> (bool, String) {
    let path = scratch_dir().join(name);
    std::fs::write(&path, yaml).expect("write the config file");
    let output = Command::new(lacewing_binary())
        .arg("validate")
        .arg(&path)
        .output()
        .expect("run lacewing validate");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

#[test]
fn lacewing_validate_rejects_bad_files_with_file_and_line() {
    let cases = [
        ("syntax.yaml", BAD_SYNTAX, BAD_SYNTAX_LINE),
        (
            "unknown-cluster.yaml",
            UNKNOWN_CLUSTER,
            UNKNOWN_CLUSTER_LINE,
        ),
        ("bad-regex.yaml", BAD_REGEX, BAD_REGEX_LINE),
    ];
    for (name, yaml, line) in cases {
        let (ok, output) = validate_file(name, yaml);
        assert!(!ok, "`lacewing validate {name}` should fail:\n{output}");
        assert_positioned(&output, name, line, &[]);
    }
}

#[test]
fn lacewing_validate_accepts_a_good_file() {
    let (ok, output) = validate_file("good.yaml", GOOD);
    assert!(
        ok,
        "`lacewing validate good.yaml` should succeed:\n{output}"
    );
}
