//! Membership through etcd as the router sees it: a node started late joins and gets traffic, a
//! node stopped cleanly leaves at once (well before its lease could lapse), a node killed with
//! SIGKILL leaves within its lease TTL, and streams on a node stopped cleanly complete (drained
//! there, or handed off when the drain deadline passes).

mod common;

use std::time::{Duration, Instant};

use common::*;
use pd_tests::cluster::{Cluster, ClusterSpec, Role};
use pd_tests::golden_cases;

/// `pd_decode_tokens_total` as a node's /metrics reports it.
async fn decode_tokens(metrics_url: &str) -> f64 {
    scrape(metrics_url)
        .await
        .lines()
        .find_map(|l| l.strip_prefix("pd_decode_tokens_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_join_and_leave_the_routers_view() {
    let _serial = SERIAL.lock().await;
    // A long lease: a clean stop must not wait for it.
    let lease = 10;
    let mut cluster = Cluster::start(ClusterSpec {
        lease_ttl_secs: lease,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    let prompt = golden_cases()[0].prompt_ids.clone();
    let mut client = grpc_client(&cluster).await;

    // Each link reports what it carried: bytes and a measured rate, on both ends.
    let params = greedy(4);
    grpc_generate(&mut client, &prompt, &params)
        .await
        .expect("served");
    for (role, direction) in [(Role::Prefill, "sent"), (Role::Decode, "received")] {
        let node = cluster.first_node(role).expect("a node of the role");
        let url = cluster.node(&node.id).expect("node").metrics_url();
        let labels = [
            r#"backend="grpc""#,
            &format!(r#"direction="{direction}""#)[..],
        ];
        let bytes = metric_sum(&url, "pd_kv_link_bytes_total", &labels).await;
        assert!(bytes > 0.0, "{role:?}: no KV bytes on its link");
        let rate = metric_sum(&url, "pd_kv_link_last_gbps", &labels).await;
        assert!(rate > 0.0, "{role:?}: no link rate");
    }

    // A late decode node joins and receives traffic.
    let late = cluster
        .add_node(Role::Decode)
        .await
        .expect("a late node starts");
    cluster
        .wait_for_nodes(1, 2, Duration::from_secs(10))
        .await
        .expect("the late node joins");
    let late_metrics = cluster.node(&late).expect("late node").metrics_url();
    let deadline = Instant::now() + Duration::from_secs(60);
    while decode_tokens(&late_metrics).await == 0.0 {
        assert!(
            Instant::now() < deadline,
            "the late node never got a request"
        );
        // Two at once: the router spreads them over both nodes.
        let (mut c1, mut c2, params) = (client.clone(), client.clone(), greedy(4));
        let (a, b) = tokio::join!(
            grpc_generate(&mut c1, &prompt, &params),
            grpc_generate(&mut c2, &prompt, &params),
        );
        a.expect("served");
        b.expect("served");
    }

    // The first decode node stops cleanly: it leaves at once, not after its 10 s lease.
    let first = cluster
        .nodes()
        .into_iter()
        .find(|n| n.role == Role::Decode && n.id != late)
        .expect("the first decode node")
        .id;
    let stopped = Instant::now();
    cluster.stop_node(&first).await.expect("clean stop");
    cluster
        .wait_for_nodes(1, 1, Duration::from_secs(lease / 2))
        .await
        .expect("a cleanly stopped node leaves before its lease lapses");
    eprintln!("clean stop left the view after {:?}", stopped.elapsed());
    grpc_generate(&mut client, &prompt, &greedy(4))
        .await
        .expect("served by the late node");
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_leaves_within_its_lease() {
    let _serial = SERIAL.lock().await;
    let lease = 2;
    let mut cluster = Cluster::start(ClusterSpec {
        prefill: 2,
        decode: 1,
        lease_ttl_secs: lease,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    let prefill = cluster
        .first_node(Role::Prefill)
        .expect("a prefill node")
        .id;
    let killed = Instant::now();
    cluster.kill_node(&prefill).expect("SIGKILL");
    // etcd expires a lease within its TTL plus the time of one keep-alive round; allow one
    // more second for the watch to deliver the deletion.
    cluster
        .wait_for_nodes(1, 1, Duration::from_secs(lease + 2))
        .await
        .expect("the killed node leaves within its lease");
    eprintln!("SIGKILLed node left the view after {:?}", killed.elapsed());
    let mut client = grpc_client(&cluster).await;
    let prompt = golden_cases()[0].prompt_ids.clone();
    grpc_generate(&mut client, &prompt, &greedy(4))
        .await
        .expect("served");
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_a_decode_node_stopped_cleanly() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(ClusterSpec {
        prefill: 1,
        decode: 2,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    let prompt = golden_cases()[0].prompt_ids.clone();
    let params = pd_common::sampling::SamplingParams {
        ignore_eos: true,
        ..greedy(60)
    };
    let want = reference(&prompt, &params);
    let streams: Vec<_> = (0..4)
        .map(|_| {
            let (prompt, params) = (prompt.clone(), params.clone());
            let url = cluster.grpc_url();
            tokio::spawn(async move {
                let mut client = pd_proto::v1::generation_client::GenerationClient::connect(url)
                    .await
                    .expect("router reachable");
                grpc_generate(&mut client, &prompt, &params).await
            })
        })
        .collect();
    // Stop a decode node while streams run on both.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    let victim = loop {
        let mut busy = None;
        for node in cluster
            .nodes()
            .into_iter()
            .filter(|n| n.role == Role::Decode)
        {
            let mut c = pd_proto::v1::node_client::NodeClient::connect(node.grpc_url())
                .await
                .expect("node reachable");
            let s = c
                .stats(pd_proto::v1::StatsRequest {})
                .await
                .expect("stats")
                .into_inner();
            if s.running_sequences > 0 {
                busy = Some(node.id);
            }
        }
        if let Some(id) = busy {
            break id;
        }
        assert!(Instant::now() < deadline, "no stream ever ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cluster.stop_node(&victim).await.expect("a clean stop");
    for s in streams {
        let got = s.await.expect("task").expect("the stream completes");
        assert_eq!(got.ids, want.ids);
    }
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}
