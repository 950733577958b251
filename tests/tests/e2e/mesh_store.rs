//! The store under SIGKILL: `lacewing control` killed while applies of many
//! documents are in flight holds, after restart, one whole version.

use crate::mesh_support::*;

/// 20 services, each labelled with the round that wrote it.
fn round(n: usize) -> String {
    (0..20)
        .map(|i| {
            service(
                &format!("svc-{i}"),
                &format!("  endpoints: ['10.0.0.{}:{}']\n", i + 1, 1000 + n),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mesh_sigkill_during_applies_leaves_one_whole_version() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let (mut child, addr) = control_process("127.0.0.1:0", &state);
    let token = lacewing_control::token::read(&state.join("operator.token")).unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let applier = {
        let (addr, token, dir, trust) = (
            addr.clone(),
            token.clone(),
            dir.path().to_path_buf(),
            trust(&state),
        );
        let done = done.clone();
        tokio::spawn(async move {
            let mut client = lacewing_control::client::Client::connect(&addr, &token, &trust)
                .await
                .unwrap();
            let mut last_ok = 0;
            for n in 1.. {
                match apply(&mut client, &dir, &format!("r{n}.yaml"), &round(n)).await {
                    Ok(applied) => {
                        last_ok = applied.version;
                        done.store(last_ok, std::sync::atomic::Ordering::Relaxed);
                    }
                    Err(_) => return last_ok,
                }
            }
            last_ok
        })
    };
    // Kill while applies keep coming, a few versions in.
    lacewing_tests::eventually("a few applies are stored", || {
        let done = done.clone();
        async move { done.load(std::sync::atomic::Ordering::Relaxed) >= 3 }
    })
    .await;
    child.kill();
    let last_ok = applier.await.unwrap();
    assert!(last_ok >= 1, "some applies finished before the kill");

    let listen = addr.clone();
    let (mut child, addr) = control_process(&listen, &state);
    let mut client = lacewing_control::client::Client::connect(&addr, &token, &trust(&state))
        .await
        .unwrap();
    let (version, docs) = client.get(Some("Service"), None, None).await.unwrap();
    assert!(
        version >= last_ok,
        "a version that was acknowledged is kept ({version} < {last_ok})"
    );
    assert_eq!(docs.len(), 20);
    let written: std::collections::BTreeSet<u64> = docs.iter().map(|(_, v)| *v).collect();
    assert_eq!(
        written.len(),
        1,
        "every document comes from the same apply: {written:?}"
    );
    let ports: std::collections::BTreeSet<String> = docs
        .iter()
        .map(|(d, _)| match &d.spec {
            lacewing_mesh::Spec::Service(s) => {
                s.endpoints[0].rsplit(':').next().unwrap().to_string()
            }
            _ => unreachable!(),
        })
        .collect();
    assert_eq!(
        ports.len(),
        1,
        "one round's documents, not a mix: {ports:?}"
    );
    let next = apply(&mut client, dir.path(), "next.yaml", &round(9999))
        .await
        .unwrap();
    assert_eq!(
        next.version,
        version + 1,
        "versions keep growing after the crash"
    );
    child.kill();
}
