//! Clusters across configuration generations: an unchanged cluster is carried
//! over with its state, and a cluster's endpoint set changes in place while
//! the endpoints it keeps keep their pooled connections.

mod support;

use std::time::Duration;

use lacewing_upstream::Upstreams;
use support::*;

/// Sends one request and reads its body, so the connection goes back to the pool.
async fn exchange(cluster: &lacewing_upstream::Cluster) -> std::net::SocketAddr {
    let answer = cluster.send(get("/"), &policy(0)).await.unwrap();
    let endpoint = answer.endpoint;
    assert_eq!(body_text(answer.response).await, "ok");
    eventually("the connection is back in the pool", || {
        cluster.idle_connections() > 0
    })
    .await;
    endpoint
}

#[tokio::test(flavor = "current_thread")]
async fn endpoints_change_in_place_and_kept_ones_keep_their_connections() {
    let a = http1(|_| async { reply(200, "ok") }).await;
    let b = http1(|_| async { reply(200, "ok") }).await;
    let (cluster, _metrics) = build(config("web", &[a.addr]));

    assert_eq!(exchange(&cluster).await, a.addr);
    assert_eq!(a.accepted(), 1);

    cluster.set_endpoints(&[a.addr, b.addr]);
    assert_eq!(cluster.endpoints(), [a.addr, b.addr]);
    let mut seen = Vec::new();
    for _ in 0..4 {
        seen.push(exchange(&cluster).await);
    }
    assert!(seen.contains(&a.addr) && seen.contains(&b.addr), "{seen:?}");
    assert_eq!(
        a.accepted(),
        1,
        "the kept endpoint reused its pooled connection"
    );

    cluster.set_endpoints(&[b.addr]);
    for _ in 0..3 {
        assert_eq!(exchange(&cluster).await, b.addr);
    }
    assert_eq!(b.accepted(), 1);
}

#[tokio::test(flavor = "current_thread")]
async fn the_next_generation_carries_clusters_over_and_changes_endpoints_on_activate() {
    let a = http1(|_| async { reply(200, "ok") }).await;
    let b = http1(|_| async { reply(200, "ok") }).await;
    let metrics = lacewing_core::metrics::Metrics::new();
    let first = Upstreams::new(
        &[config("web", &[a.addr]), config("other", &[a.addr])],
        &metrics,
    )
    .unwrap();
    let web = first.cluster("web").unwrap().clone();

    // Same cluster, one more endpoint; `other` gets a new timeout.
    let mut other = config("other", &[a.addr]);
    other.connect_timeout = lacewing_config::units::Dur(Duration::from_secs(7));
    let next = Upstreams::build(
        &[config("web", &[a.addr, b.addr]), other],
        &metrics,
        Some(&first),
        None,
        None,
    )
    .unwrap();
    assert!(std::sync::Arc::ptr_eq(next.cluster("web").unwrap(), &web));
    assert!(!std::sync::Arc::ptr_eq(
        next.cluster("other").unwrap(),
        first.cluster("other").unwrap()
    ));
    assert_eq!(
        web.endpoints(),
        [a.addr],
        "nothing changes before activation"
    );

    next.activate(None);
    assert_eq!(web.endpoints(), [a.addr, b.addr]);
}
