//! `lacewing demo`, the README's main command, run as a user runs it: its
//! output must show the mesh policy applied on every sidecar, the plugin
//! swapped live under load with no failed request, and `status` listing
//! every sidecar.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lacewing_tests::process::lacewing_binary;
use lacewing_tests::wasm::module;

/// The demo ends by itself; a hung one is killed after this long.
const BOUND: Duration = Duration::from_secs(180);

/// Runs `lacewing demo --filter FILTER`; returns its stdout.
fn run_demo(filter: &std::path::Path) -> String {
    let mut child = Command::new(lacewing_binary())
        .args(["demo", "--filter"])
        .arg(filter)
        .env("LACEWING_LOG", "error")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start lacewing demo");
    let mut stdout = child.stdout.take().expect("stdout");
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).map(|_| out)
    });
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the demo") {
            break status;
        }
        if started.elapsed() > BOUND {
            let _ = child.kill();
            let _ = child.wait();
            panic!("lacewing demo did not end within {BOUND:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = reader
        .join()
        .expect("reader thread")
        .expect("read the demo's output");
    assert!(status.success(), "lacewing demo failed ({status}):\n{out}");
    out
}

/// The numbers among a line's words (`3:` gives 3, `4/4` gives 4 and 4;
/// `v1` gives nothing).
fn numbers(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .flat_map(|w| w.trim_end_matches([':', ',', ';']).split('/'))
        .filter_map(|w| w.parse().ok())
        .collect()
}

fn line<'a>(out: &'a str, needle: &str) -> &'a str {
    out.lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with `{needle}` in:\n{out}"))
}

#[tokio::test]
async fn the_demo_applies_the_mesh_swaps_a_plugin_with_no_failed_request_and_lists_sidecars() {
    let filter = module("header-echo");
    let out = tokio::task::spawn_blocking(move || run_demo(&filter))
        .await
        .expect("demo thread");

    // Both applies (the mesh, then the plugin's new configuration) reached
    // all four sidecars.
    let applies: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("sidecars ACKed"))
        .collect();
    assert_eq!(applies.len(), 2, "{out}");
    let mut versions = Vec::new();
    for apply in applies {
        // `... version V: A/T sidecars ACKed`
        let n = numbers(apply);
        let [version, acked, total] = n[n.len() - 3..] else {
            panic!("{apply}")
        };
        assert_eq!((acked, total), (4, 4), "{apply}");
        versions.push(version);
    }
    assert!(versions[1] > versions[0], "{versions:?}");

    // The policy: `orders` runs the plugin (v1), `users` does not, an
    // unknown service has no route.
    let orders = line(&out, "Host: orders ");
    assert!(
        orders.contains("-> 200") && orders.contains("x-echo-v1"),
        "{orders}"
    );
    let users = line(&out, "Host: users");
    assert!(
        users.contains("-> 200") && !users.contains("x-echo-"),
        "{users}"
    );
    assert!(line(&out, "Host: payments").contains("-> 404"), "{out}");

    // The swap under load: no failed request, each answered by exactly one version.
    let swap = line(&out, "requests:");
    let [ok, failed, v1, v2] = numbers(swap)[..] else {
        panic!("{swap}")
    };
    assert!(ok > 0, "{swap}");
    assert_eq!(failed, 0, "{swap}");
    assert_eq!(v1 + v2, ok, "{swap}");
    assert!(v2 > 0, "{swap}");
    let now = line(&out, "now: Host: orders");
    assert!(now.contains("-> 200") && now.contains("x-echo-v2"), "{now}");

    // `lacewing status`: every sidecar, connected, on the last version.
    let header = line(&out, "sidecar(s)");
    assert_eq!(numbers(header), vec![versions[1], 4], "{header}");
    for node in ["web", "orders-1", "orders-2", "users"] {
        let row = out
            .lines()
            .skip_while(|l| !l.contains("sidecar(s)"))
            .find(|l| l.split_whitespace().next() == Some(node))
            .unwrap_or_else(|| panic!("no status row for {node}:\n{out}"));
        let words: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(words[4], versions[1].to_string(), "{row}");
        assert_eq!(words[5], "connected", "{row}");
    }
}
