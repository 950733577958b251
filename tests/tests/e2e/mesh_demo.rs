//! `lacewing demo`, the README's main command, run as a user runs it: its
//! output must show `examples/mesh.yaml` applied on every sidecar, calls
//! allowed and denied by the SMI policy with the mTLS identity each
//! destination saw, a plaintext caller refused, policy metrics, a policy
//! change hot-reloaded under load with no failed request, `status` listing
//! every sidecar, steady traffic for `--duration`, and a clean exit.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use lacewing_tests::process::lacewing_binary;
use lacewing_tests::wasm::module;

/// The demo ends by itself; a hung one is killed after this long.
const BOUND: Duration = Duration::from_secs(180);

const FRONTEND_ID: &str = "spiffe://lacewing.local/ns/default/sa/frontend";
const ORDERS_ID: &str = "spiffe://lacewing.local/ns/default/sa/orders";

/// Runs `lacewing demo --filter FILTER --duration 2`; returns its stdout.
fn run_demo(filter: &std::path::Path) -> String {
    let mut child = Command::new(lacewing_binary())
        .args(["demo", "--duration", "2", "--filter"])
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

/// The line of the call `from -> to METHOD PATH`.
fn call<'a>(out: &'a str, from: &str, to: &str, method: &str, path: &str) -> &'a str {
    out.lines()
        .find(|l| {
            let words: Vec<&str> = l.split_whitespace().collect();
            words.len() > 5 && words[..5] == [from, "->", to, method, path]
        })
        .unwrap_or_else(|| panic!("no call {from} -> {to} {method} {path} in:\n{out}"))
}

fn status_of(call: &str) -> &str {
    call.split_whitespace().nth(5).unwrap_or("")
}

#[tokio::test]
async fn the_demo_shows_policy_identities_metrics_and_a_live_policy_change_with_no_failed_request()
{
    let filter = module("header-echo");
    let out = tokio::task::spawn_blocking(move || run_demo(&filter))
        .await
        .expect("demo thread");

    // Both applies (the example mesh, then the changed policy) reached all
    // three sidecars.
    let applies: Vec<&str> = out
        .lines()
        .filter(|l| l.contains("sidecars ACKed"))
        .collect();
    assert_eq!(applies.len(), 2, "{out}");
    let mut versions = Vec::new();
    for apply in applies {
        // `... version V: A/T sidecars ACKed (N documents changed)`
        let [version, acked, total, ..] = numbers(apply)[..] else {
            panic!("{apply}")
        };
        assert_eq!((acked, total), (3, 3), "{apply}");
        versions.push(version);
    }
    assert!(versions[1] > versions[0], "{versions:?}");

    // The policy, with the identity the destination's sidecar saw.
    let read = call(&out, "frontend", "orders", "GET", "/api/orders/42");
    assert_eq!(status_of(read), "200", "{read}");
    assert!(read.contains(FRONTEND_ID), "{read}");
    let charge = call(&out, "orders", "payments", "POST", "/charge");
    assert_eq!(status_of(charge), "200", "{charge}");
    assert!(charge.contains(ORDERS_ID), "{charge}");
    for (from, to, method, path) in [
        ("frontend", "orders", "POST", "/api/orders"),
        ("payments", "orders", "GET", "/api/orders/42"),
        ("frontend", "payments", "POST", "/charge"),
    ] {
        let denied = call(&out, from, to, method, path);
        assert_eq!(status_of(denied), "403", "{denied}");
    }

    // STRICT refuses a plaintext caller; the decisions are counted.
    assert!(
        line(&out, "a plaintext caller").contains("refused"),
        "{out}"
    );
    assert!(
        line(&out, "authz_allowed").contains("lacewing-authz"),
        "{out}"
    );
    assert!(
        line(&out, "authz_denied").contains("lacewing-authz"),
        "{out}"
    );
    assert!(
        line(&out, "telemetry_responses").contains("telemetry"),
        "{out}"
    );

    // The policy change under load: no failed request, then POST is allowed.
    let reload = line(&out, "during the reload");
    let [total, ok, failed] = numbers(reload)[..] else {
        panic!("{reload}")
    };
    assert!(ok > 0 && ok == total, "{reload}");
    assert_eq!(failed, 0, "{reload}");
    let after: Vec<&str> = out
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .take(5)
                .eq(["frontend", "->", "orders", "POST", "/api/orders"])
        })
        .collect();
    assert_eq!(after.len(), 2, "{out}");
    assert_eq!(status_of(after[1]), "200", "{}", after[1]);

    // `lacewing status`: every sidecar, connected, on the last version.
    let header = line(&out, "sidecar(s)");
    assert_eq!(numbers(header), vec![versions[1], 3], "{header}");
    for node in ["frontend", "orders", "payments"] {
        let row = out
            .lines()
            .skip_while(|l| !l.contains("sidecar(s)"))
            .find(|l| l.split_whitespace().next() == Some(node))
            .unwrap_or_else(|| panic!("no status row for {node}:\n{out}"));
        let words: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(words[4], versions[1].to_string(), "{row}");
        assert_eq!(words[5], "connected", "{row}");
    }

    // `--duration 2`: steady traffic with counts, no failure, a clean stop.
    let steady = out
        .lines()
        .rfind(|l| l.ends_with(" failed") && l.contains(" requests, "))
        .unwrap_or_else(|| panic!("no steady-traffic line:\n{out}"));
    let [requests, failed] = numbers(steady)[..] else {
        panic!("{steady}")
    };
    assert!(requests > 0, "{steady}");
    assert_eq!(failed, 0, "{steady}");
    assert!(out.lines().any(|l| l == "mesh stopped"), "{out}");
}
