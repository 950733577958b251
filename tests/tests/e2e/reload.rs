//! Live generations: a running proxy takes a whole new configuration, under
//! load, with no failed request; a generation that does not build is rejected
//! with its reason while the live one keeps serving; plugins' VMs run (and
//! tick) from the moment they are published; every listener moves to a new
//! generation at once; SIGHUP re-reads the file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use http::StatusCode;
use lacewing_config::ProxyConfig;
use lacewing_proxy::{ProxyHandle, PublishError};
use lacewing_tests::client::{self, ReusingClient, metric_value};
use lacewing_tests::generations::{Generations, generation_of, parse};
use lacewing_tests::wasm::{get_with, yaml_path};
use lacewing_tests::{eventually, proxy};
use tokio::net::TcpStream;

fn pair(upstream: &str, tag: &str) -> (String, String) {
    (upstream.to_string(), tag.to_string())
}

/// Publishes from a blocking thread (publishing waits for every worker).
async fn publish(
    handle: &ProxyHandle,
    config: ProxyConfig,
) -> Result<lacewing_proxy::Generation, PublishError> {
    let publisher = handle.publisher();
    tokio::task::spawn_blocking(move || publisher.publish(config, "test"))
        .await
        .expect("publish thread")
}

const LOAD_CLIENTS: usize = 6;
const RELOAD_EVERY: Duration = Duration::from_millis(200);
const RELOADS: usize = 50;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reloads_under_load_fail_no_request_and_mix_no_generations() {
    let up = Generations::start().await;
    let configs = [up.config("a", "A", 2), up.config("b", "B", 2)];
    let handle = proxy::start(&up.yaml("a", "A", 2));
    let url = proxy::url(&handle, "main", "/");
    let stop = Arc::new(AtomicBool::new(false));

    // Keep-alive clients, half HTTP/1.1 and half h2, each on its own connection.
    let clients: Vec<_> = (0..LOAD_CLIENTS)
        .map(|i| {
            let client = if i % 2 == 0 {
                ReusingClient::http1()
            } else {
                ReusingClient::h2()
            };
            let (url, stop) = (url.clone(), stop.clone());
            tokio::spawn(async move {
                let mut seen = BTreeMap::<(StatusCode, String, String), usize>::new();
                while !stop.load(Ordering::Relaxed) {
                    let response = client.get(&url).await;
                    let (upstream, tag) = generation_of(&response);
                    *seen.entry((response.status, upstream, tag)).or_default() += 1;
                }
                seen
            })
        })
        .collect();

    let publisher = handle.publisher();
    let to_publish = configs.clone();
    let last = tokio::task::spawn_blocking(move || {
        let mut last = 1;
        for i in 0..RELOADS {
            let generation = publisher
                .publish(to_publish[(i + 1) % 2].clone(), "test")
                .unwrap_or_else(|e| panic!("publish {i} rejected: {e}"));
            assert_eq!(
                generation.number,
                last + 1,
                "generation numbers go up by one"
            );
            last = generation.number;
            std::thread::sleep(RELOAD_EVERY);
        }
        last
    })
    .await
    .expect("publisher thread");
    stop.store(true, Ordering::Relaxed);

    let mut total = BTreeMap::<(StatusCode, String, String), usize>::new();
    for c in clients {
        for (key, count) in c.await.expect("load client") {
            *total.entry(key).or_default() += count;
        }
    }
    let allowed = [pair("a", "A"), pair("b", "B")];
    for ((status, upstream, tag), count) in &total {
        assert_eq!(
            *status,
            StatusCode::OK,
            "{count} responses {status}: {total:?}"
        );
        assert!(
            allowed.contains(&(upstream.clone(), tag.clone())),
            "{count} responses mix generations (upstream {upstream}, plugin tag {tag}): {total:?}"
        );
    }
    for (upstream, tag) in &allowed {
        assert!(
            total.contains_key(&(StatusCode::OK, upstream.clone(), tag.clone())),
            "generation ({upstream}, {tag}) served some requests: {total:?}"
        );
    }

    // The last publish was configs[RELOADS % 2]; a new connection gets it.
    let expected = &allowed[RELOADS % 2];
    let fresh = client::get(&url).await;
    assert_eq!(&generation_of(&fresh), expected);
    let h2 = client::get_h2(&url).await;
    assert_eq!(&generation_of(&h2), expected);

    let admin = proxy::admin_addr(&handle);
    let dump = client::get(&format!("http://{admin}/config_dump"))
        .await
        .json();
    assert_eq!(dump["generation"]["number"], last);
    assert_eq!(dump["generation"]["source"], "test");
    let metrics = client::metrics(admin).await;
    assert_eq!(
        metric_value(&metrics, "lacewing_config_generation"),
        Some(last as f64)
    );
    assert_eq!(
        metric_value(
            &metrics,
            "lacewing_config_reloads_total{result=\"success\"}"
        ),
        Some(RELOADS as f64)
    );
}

/// `yaml` (a [`Generations`] configuration) with a second listener,
/// `second`, the same as `main` but on a port of its own.
fn two_listeners(yaml: &str) -> String {
    let start = yaml.find("  - name: main").expect("listener main");
    let end = yaml.find("clusters:").expect("clusters");
    let second = yaml[start..end].replace("name: main", "name: second");
    format!("{}{second}{}", &yaml[..end], &yaml[end..])
}

const SWAP_CLIENTS: usize = 4;
const SWAPS: u64 = 20;

/// One publish moves every listener to the new generation at once. Each
/// generation tags its responses with its own number; clients alternate
/// between keep-alive connections to listeners `main` and `second` while
/// generations are published, and none gets, on one listener, a generation
/// older than one the other listener already served it. Each publish waits
/// until a client has seen it, so every generation is observed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn no_listener_serves_an_older_generation_after_another_served_a_newer_one() {
    let up = Generations::start().await;
    let handle = proxy::start(&two_listeners(&up.yaml("a", "1", 2)));
    let urls = [
        proxy::url(&handle, "main", "/"),
        proxy::url(&handle, "second", "/"),
    ];
    let newest = Arc::new(AtomicU64::new(1));
    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<_> = (0..SWAP_CLIENTS)
        .map(|i| {
            let (urls, newest, stop) = (urls.clone(), newest.clone(), stop.clone());
            tokio::spawn(async move {
                // HTTP/1.1 to `main`; HTTP/1.1 or h2 to `second`.
                let second = if i % 2 == 0 {
                    ReusingClient::http1()
                } else {
                    ReusingClient::h2()
                };
                let clients = [ReusingClient::http1(), second];
                let mut last = (1, "main");
                while !stop.load(Ordering::Relaxed) {
                    for (client, (url, listener)) in
                        clients.iter().zip(urls.iter().zip(["main", "second"]))
                    {
                        let response = client.get(url).await;
                        assert_eq!(response.status, StatusCode::OK);
                        let (_, tag) = generation_of(&response);
                        let number: u64 = tag
                            .parse()
                            .unwrap_or_else(|_| panic!("a generation number, not `{tag}`"));
                        assert!(
                            number >= last.0,
                            "listener `{listener}` served generation {number} after `{}` served generation {}",
                            last.1,
                            last.0
                        );
                        last = (number, listener);
                        newest.fetch_max(number, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();

    for number in 2..=SWAPS + 1 {
        let config = parse(&two_listeners(&up.yaml("a", &number.to_string(), 2)));
        let generation = publish(&handle, config).await.expect("publish");
        assert_eq!(generation.number, number);
        let newest = newest.clone();
        eventually(&format!("a client sees generation {number}"), || {
            let newest = newest.clone();
            async move { newest.load(Ordering::Relaxed) >= number }
        })
        .await;
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.expect("every client saw generations in order");
    }
}

/// Asserts that the proxy still answers from cluster `a` with tag `A`.
async fn assert_still_serves_a(handle: &ProxyHandle) {
    let response = client::get(&proxy::url(handle, "main", "/")).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(generation_of(&response), pair("a", "A"));
}

#[tokio::test]
async fn bad_generations_are_rejected_with_their_reason_and_the_live_one_stays() {
    let up = Generations::start().await;
    let handle = proxy::start(&up.yaml("a", "A", 1));
    let live = handle.generation().expect("a live generation").number;

    // A route to a cluster that does not exist.
    let mut unknown = up.config("a", "A", 1);
    unknown.listeners[0].routes[0].cluster = Some("nowhere".into());
    let error = publish(&handle, unknown)
        .await
        .expect_err("an unknown cluster is rejected");
    assert!(
        matches!(error, PublishError::Config(_)) && error.to_string().contains("nowhere"),
        "{error}"
    );
    assert_still_serves_a(&handle).await;

    // A plugin whose on_configure returns false.
    let refusing = up.config("a", "A fail_configure", 1);
    let error = publish(&handle, refusing)
        .await
        .expect_err("a plugin refusing its configuration is rejected");
    let text = error.to_string();
    assert!(
        text.contains("tagger") && text.contains("on_configure returned false"),
        "{text}"
    );
    assert_still_serves_a(&handle).await;

    // A new listener on an address another process holds.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a port");
    let held = taken.local_addr().expect("address");
    let mut bind_fails = up.config("b", "B", 1);
    let mut extra = bind_fails.listeners[0].clone();
    extra.name = "extra".into();
    extra.address = held;
    bind_fails.listeners.push(extra);
    let error = publish(&handle, bind_fails)
        .await
        .expect_err("a listener that cannot bind is rejected");
    assert!(
        matches!(error, PublishError::Bind(_))
            && error.to_string().contains("extra")
            && error.to_string().contains(&held.to_string()),
        "{error}"
    );
    assert_still_serves_a(&handle).await;
    assert_eq!(handle.listener_addr("extra"), None);

    // The worker count is fixed while the proxy runs.
    let error = publish(&handle, up.config("b", "B", 3))
        .await
        .expect_err("a new worker count is rejected");
    assert!(error.to_string().contains("workers"), "{error}");
    assert_still_serves_a(&handle).await;

    assert_eq!(handle.generation().map(|g| g.number), Some(live));
    let running = handle.publisher().config().expect("a live configuration");
    assert_eq!(running.workers, 1);
    assert_eq!(running.clusters[0].name, "a");
    let metrics = client::metrics(proxy::admin_addr(&handle)).await;
    assert_eq!(
        metric_value(
            &metrics,
            "lacewing_config_reloads_total{result=\"failure\"}"
        ),
        Some(4.0)
    );

    // And a good one still goes through.
    let generation = publish(&handle, up.config("b", "B", 1))
        .await
        .expect("a good generation");
    assert_eq!(generation.number, live + 1);
    let response = client::get(&proxy::url(&handle, "main", "/")).await;
    assert_eq!(generation_of(&response), pair("b", "B"));
}

/// A cluster the new generation leaves unchanged is the same cluster: its
/// pooled upstream connection serves the next generation's requests. A
/// host-name endpoint is resolved for the publish that introduces it.
#[tokio::test]
async fn unchanged_clusters_keep_their_connections_and_host_names_resolve() {
    let up = Generations::start().await;
    let handle = proxy::start(&up.yaml("a", "A", 1));
    let url = proxy::url(&handle, "main", "/");
    let client = ReusingClient::http1();
    assert_eq!(generation_of(&client.get(&url).await), pair("a", "A"));
    let connections = up.a.accepted();

    for (i, tag) in ["A1", "A2", "A3"].into_iter().enumerate() {
        publish(&handle, up.config("a", tag, 1))
            .await
            .unwrap_or_else(|e| panic!("publish {i}: {e}"));
        assert_eq!(generation_of(&client.get(&url).await), pair("a", tag));
    }
    assert_eq!(
        up.a.accepted(),
        connections,
        "cluster `a` kept its pooled connection across three generations"
    );

    let by_name = up.yaml("b", "B", 1).replace(
        &format!("'{}'", up.b.addr),
        &format!("'localhost:{}'", up.b.addr.port()),
    );
    publish(&handle, parse(&by_name))
        .await
        .expect("publish a host-name endpoint");
    assert_eq!(generation_of(&client.get(&url).await), pair("b", "B"));
}

#[tokio::test]
async fn listeners_added_moved_and_removed_by_publish_start_and_stop_accepting() {
    let up = Generations::start().await;
    let handle = proxy::start(&up.yaml("a", "A", 2));

    let mut with_extra = up.config("a", "A", 2);
    let mut extra = with_extra.listeners[0].clone();
    extra.name = "extra".into();
    extra.routes[0].cluster = Some("b".into());
    with_extra.listeners.push(extra);
    publish(&handle, with_extra)
        .await
        .expect("publish a new listener");
    let extra_addr = proxy::listener_addr(&handle, "extra");
    let response = client::get(&format!("http://{extra_addr}/")).await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(generation_of(&response).0, "b");
    assert_still_serves_a(&handle).await;

    // Re-bound: the same listener moves to another port.
    let main_before = proxy::listener_addr(&handle, "main");
    let mut moved = up.config("a", "A", 2);
    moved.listeners[0].address =
        SocketAddr::from(([127, 0, 0, 1], lacewing_tests::process::free_port()));
    publish(&handle, moved)
        .await
        .expect("publish a moved listener");
    let main_after = proxy::listener_addr(&handle, "main");
    assert_ne!(main_after, main_before);
    let response = client::get(&format!("http://{main_after}/")).await;
    assert_eq!(generation_of(&response), pair("a", "A"));
    eventually("the old address refuses connections", || async move {
        TcpStream::connect(main_before).await.is_err()
    })
    .await;

    publish(&handle, up.config("a", "A", 2))
        .await
        .expect("publish without the listener");
    assert_eq!(handle.listener_addr("extra"), None);
    eventually("the removed listener refuses connections", || async move {
        TcpStream::connect(extra_addr).await.is_err()
    })
    .await;
    assert_still_serves_a(&handle).await;
}

/// A listener configured with port 0 keeps the port it got across
/// generations, whether the next one says port 0 again or names that port,
/// and a connection opened before each publish keeps being served.
#[tokio::test]
async fn a_port_zero_listener_keeps_its_port_across_generations() {
    let up = Generations::start().await;
    let handle = proxy::start(&up.yaml("a", "A", 2));
    let bound = proxy::listener_addr(&handle, "main");
    let client = ReusingClient::http1();
    let url = format!("http://{bound}/");
    assert_eq!(generation_of(&client.get(&url).await), pair("a", "A"));

    let mut named = up.config("b", "B", 2);
    named.listeners[0].address = bound;
    publish(&handle, named)
        .await
        .expect("publish naming the bound port");
    assert_eq!(proxy::listener_addr(&handle, "main"), bound);
    assert_eq!(generation_of(&client.get(&url).await), pair("b", "B"));

    publish(&handle, up.config("a", "C", 2))
        .await
        .expect("publish with port 0 again");
    assert_eq!(proxy::listener_addr(&handle, "main"), bound);
    assert_eq!(generation_of(&client.get(&url).await), pair("a", "C"));
    let fresh = client::get(&url).await;
    assert_eq!(generation_of(&fresh), pair("a", "C"));
}

/// A plugin that arms a tick timer in `on_configure` ticks, and receives
/// queue items, with no request through it: its VMs exist on every worker
/// from the moment it is published.
#[tokio::test]
async fn plugins_tick_and_take_queue_items_from_publish_with_no_traffic() {
    let up = Generations::start().await;
    // `main` runs the ticking plugin and gets no request; `probe` reads the
    // tick count (process-wide shared data) through a plugin that does not tick.
    let yaml = |ticker: bool| {
        let ticking = if ticker {
            "\n  - { name: ticker, module: {module}, vm_id: ticker-vm, configuration: 'tick_ms=10', limits: { callback_timeout: 5s } }"
        } else {
            ""
        };
        let main = if ticker {
            "
  - name: main
    address: 127.0.0.1:0
    filters: [ticker]
    routes:
      - { name: default, cluster: a }"
        } else {
            ""
        };
        parse(&proxy::fill(
            &format!(
                "admin: {{ address: 127.0.0.1:0 }}
workers: 2
listeners:
  - name: probe
    address: 127.0.0.1:0
    filters: [reader]
    routes:
      - {{ name: default, cluster: a }}{main}
clusters:
  - {{ name: a, endpoints: ['{{a}}'] }}
plugins:
  - {{ name: reader, module: {{module}}, limits: {{ callback_timeout: 5s }} }}{ticking}
"
            ),
            &[("a", &up.a.addr), ("module", &yaml_path(&up.module))],
        ))
    };
    let handle = lacewing_proxy::Proxy::start(yaml(false)).expect("start");
    let probe = proxy::url(&handle, "probe", "/conformance");
    let probe_case = |headers: Vec<(&'static str, String)>| {
        let probe = probe.clone();
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let response = get_with(&probe, &headers).await;
            assert_eq!(response.status, StatusCode::OK);
            response
        }
    };
    // A shared-data value, read through the probe's plugin.
    let shared = |key: &'static str| async move {
        probe_case(vec![
            ("x-test", "shared-get".into()),
            ("x-shared-key", key.into()),
        ])
        .await
        .header("x-shared-value")
        .map(str::to_string)
    };
    let ticks = || async {
        shared("conformance-ticks")
            .await
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    assert_eq!(
        ticks().await,
        0,
        "nothing ticks before the ticker is published"
    );

    publish(&handle, yaml(true))
        .await
        .expect("publish the ticker");
    eventually("the ticker ticks with no request through it", || async {
        ticks().await >= 4
    })
    .await;

    // Its queue has a receiver too: an item enqueued from the probe reaches
    // the ticker's on_queue_ready.
    let enqueued = probe_case(vec![
        ("x-test", "queue".into()),
        ("x-queue-vm-id", "ticker-vm".into()),
        ("x-queue-value", "from-probe".into()),
    ])
    .await;
    assert_eq!(enqueued.header("x-queue-enqueue"), Some("Ok"));
    eventually("the ticker dequeued the item", || async {
        shared("conformance-queue-last").await.as_deref() == Some("from-probe")
    })
    .await;
    handle.shutdown();
}

/// The real binary, started on a configuration file of [`Generations`] with
/// fixed listener and admin ports.
struct FileProxy {
    up: Generations,
    dir: std::path::PathBuf,
    file: std::path::PathBuf,
    port: u16,
    admin: u16,
    /// Set once started.
    child: Option<tokio::process::Child>,
    pid: String,
}

impl FileProxy {
    /// Writes the file for (`target`, `tag`) and starts `lacewing proxy
    /// --config FILE` with `extra` arguments; returns once it serves.
    async fn start(name: &str, extra: &[&str]) -> Self {
        let up = Generations::start().await;
        let dir = std::env::temp_dir().join(format!("lacewing-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let file = dir.join("proxy.yaml");
        let (port, admin) = (
            lacewing_tests::process::free_port(),
            lacewing_tests::process::free_port(),
        );
        let mut proxy = Self {
            up,
            dir,
            file,
            port,
            admin,
            child: None,
            pid: String::new(),
        };
        proxy.write("a", "A");
        let child = tokio::process::Command::new(lacewing_tests::process::lacewing_binary())
            .args(["proxy", "--config"])
            .arg(&proxy.file)
            .args(extra)
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start lacewing");
        proxy.pid = child.id().expect("child pid").to_string();
        proxy.child = Some(child);
        eventually("the proxy serves generation 1", || {
            proxy.serves(pair("a", "A"))
        })
        .await;
        proxy
    }

    /// Writes the configuration whose route goes to `target` with plugin tag `tag`.
    fn write(&self, target: &str, tag: &str) {
        let yaml = self
            .up
            .yaml(target, tag, 1)
            .replace(
                "address: 127.0.0.1:0 }",
                &format!("address: 127.0.0.1:{} }}", self.admin),
            )
            .replace(
                "address: 127.0.0.1:0\n",
                &format!("address: 127.0.0.1:{}\n", self.port),
            );
        std::fs::write(&self.file, yaml).expect("write config");
    }

    /// Writes the live file again with a value that does not parse
    /// (`drain_timeout`, line 3).
    fn write_bad(&self) {
        let good = std::fs::read_to_string(&self.file).expect("read config");
        std::fs::write(
            &self.file,
            good.replace("drain_timeout: 1s", "drain_timeout: soon"),
        )
        .expect("write bad config");
    }

    /// Whether a new connection is answered by generation `expected`.
    async fn serves(&self, expected: (String, String)) -> bool {
        let connected = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(("127.0.0.1", self.port)),
        )
        .await;
        match connected {
            Ok(Ok(_)) => {
                let url = format!("http://127.0.0.1:{}/", self.port);
                generation_of(&client::get(&url).await) == expected
            }
            _ => false,
        }
    }

    fn admin(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin))
    }

    /// Asserts that the live generation is `number`, from the file.
    async fn assert_generation(&self, number: u64) {
        let dump = client::get(&format!("http://{}/config_dump", self.admin()))
            .await
            .json();
        assert_eq!(dump["generation"]["number"], number);
        assert_eq!(
            dump["generation"]["source"],
            format!("file:{}", self.file.display())
        );
    }

    /// Waits until `count` reloads have failed.
    async fn failed_reloads(&self, count: f64) {
        let admin = self.admin();
        eventually("the bad reload is counted", || async move {
            let metrics = client::metrics(admin).await;
            metric_value(
                &metrics,
                "lacewing_config_reloads_total{result=\"failure\"}",
            ) == Some(count)
        })
        .await;
    }

    fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([signal, &self.pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "{signal} delivered");
    }

    /// Stops the proxy (SIGTERM) and returns what it logged; asserts that
    /// the log names the bad file's file, line and field.
    async fn stop_and_check_log(mut self) {
        self.signal("-TERM");
        let child = self.child.take().expect("started");
        let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .expect("the proxy exits")
            .expect("wait for lacewing");
        let log = String::from_utf8_lossy(&output.stderr);
        let file_line = format!("{}:3", self.file.display());
        assert!(
            log.contains(&file_line) && log.contains("drain_timeout"),
            "the log names file, line and field of the bad value:\n{log}"
        );
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The real binary: SIGHUP re-reads the file; a bad file is logged with file,
/// line and field and the live generation stays.
#[tokio::test]
async fn sighup_reloads_the_file_and_a_bad_file_keeps_the_live_generation() {
    let proxy = FileProxy::start("sighup", &[]).await;
    proxy.write("b", "B");
    proxy.signal("-HUP");
    eventually("SIGHUP switched to the new file", || {
        proxy.serves(pair("b", "B"))
    })
    .await;
    proxy.assert_generation(2).await;

    // A file with a bad field: rejected, logged with file, line and field.
    proxy.write_bad();
    proxy.signal("-HUP");
    proxy.failed_reloads(1.0).await;
    assert!(
        proxy.serves(pair("b", "B")).await,
        "generation 2 stays live"
    );
    proxy.stop_and_check_log().await;
}

/// The real binary with `--watch`: a change of the file's content is
/// reloaded with no signal; a bad file is logged with file, line and field,
/// the live generation stays, and the file once fixed is reloaded; a file
/// missing for a while changes nothing.
#[tokio::test]
async fn watch_reloads_the_file_when_it_changes_and_a_bad_file_keeps_the_live_generation() {
    let proxy = FileProxy::start("watch", &["--watch"]).await;
    proxy.write("b", "B");
    eventually("the changed file is live", || proxy.serves(pair("b", "B"))).await;
    proxy.assert_generation(2).await;

    proxy.write_bad();
    proxy.failed_reloads(1.0).await;
    assert!(
        proxy.serves(pair("b", "B")).await,
        "generation 2 stays live"
    );

    proxy.write("a", "C");
    eventually("the fixed file is live", || proxy.serves(pair("a", "C"))).await;
    proxy.assert_generation(3).await;

    // A file missing for a while (two looks) is not a reload: its next
    // content is the next generation and no failure is counted.
    std::fs::remove_file(&proxy.file).expect("remove config");
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.write("b", "D");
    eventually("the file written again is live", || {
        proxy.serves(pair("b", "D"))
    })
    .await;
    proxy.assert_generation(4).await;
    proxy.failed_reloads(1.0).await;
    proxy.stop_and_check_log().await;
}
