//! Faults injected into a real cluster: a decode node killed while streams run on it (speculating
//! or not), the last
//! decode node killed, a prefill node killed or frozen mid-transfer, etcd restarted. Streams
//! continue without a token lost or repeated, or end with a clear error; nothing hangs; every
//! KV block comes back.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pd_proto::v1 as pb;
use pd_proto::v1::node_client::NodeClient;
use pd_tests::cluster::{Cluster, ClusterSpec, Role};
use pd_tests::golden_cases;
use tokio::sync::mpsc;

async fn running_on(node_grpc: &str) -> u32 {
    let Ok(mut c) = NodeClient::connect(format!("http://{node_grpc}")).await else {
        return 0;
    };
    c.stats(pb::StatsRequest {})
        .await
        .map(|s| s.into_inner().running_sequences)
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_decode_node_mid_stream_resumes_every_stream_elsewhere() {
    let _serial = SERIAL.lock().await;
    kill_a_decode_node_mid_stream(Vec::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_speculating_decode_node_mid_stream_keeps_the_output_exact() {
    let _serial = SERIAL.lock().await;
    kill_a_decode_node_mid_stream(vec![
        "--speculative-config".into(),
        r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}"#.into(),
    ])
    .await;
}

/// Streams run on two decode nodes (started with `decode_args`); the busier one is killed;
/// every stream ends with the single engine's output.
async fn kill_a_decode_node_mid_stream(decode_args: Vec<String>) {
    let work = workload(40);
    let want: Vec<Generated> = work.iter().map(|(p, s)| reference(p, s)).collect();
    let mut cluster = Cluster::start(ClusterSpec {
        prefill: 1,
        decode: 2,
        decode_args,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");

    let (tx, mut progress) = mpsc::unbounded_channel();
    let streams = start_streams(&cluster.grpc_url(), &work, tx);
    wait_progress(&mut progress, work.len(), 3).await;
    // Kill the decode node running the most sequences.
    let mut victim = None;
    let mut most = 0;
    for node in cluster
        .nodes()
        .into_iter()
        .filter(|n| n.role == Role::Decode)
    {
        let running = running_on(&node.grpc).await;
        if victim.is_none() || running > most {
            most = running;
            victim = Some(node.id.clone());
        }
    }
    let victim = victim.expect("a decode node");
    assert!(most > 0, "no stream was running on a decode node");
    cluster.kill_node(&victim).expect("SIGKILL");

    for (i, (stream, want)) in streams.into_iter().zip(&want).enumerate() {
        let got = stream
            .await
            .expect("task")
            .unwrap_or_else(|s| panic!("stream {i}: {s}"));
        assert_eq!(
            got.ids, want.ids,
            "stream {i}: tokens lost, repeated or changed"
        );
        assert_eq!(got.text, want.text, "stream {i}");
        assert_eq!(got.completion_tokens, want.ids.len() as u32, "stream {i}");
    }
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_last_decode_node_ends_streams_with_a_clear_error() {
    let _serial = SERIAL.lock().await;
    let work = workload(200);
    let mut cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster starts");
    let (tx, mut progress) = mpsc::unbounded_channel();
    let streams = start_streams(&cluster.grpc_url(), &work[..4], tx);
    wait_progress(&mut progress, 4, 2).await;
    let decode = cluster.first_node(Role::Decode).expect("a decode node");
    cluster.kill_node(&decode.id).expect("SIGKILL");
    for stream in streams {
        let status = tokio::time::timeout(REQUEST_TIMEOUT, stream)
            .await
            .expect("the stream ends instead of hanging")
            .expect("task")
            .expect_err("no decode node is left");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(status.message().contains("decode node"), "{status:?}");
    }
    // New requests are refused at once, and the router says why it is not ready.
    cluster
        .wait_for_nodes(1, 0, Duration::from_secs(10))
        .await
        .expect("the node leaves");
    let mut client = grpc_client(&cluster).await;
    let status = grpc_generate(&mut client, &work[0].0, &greedy(4))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(cluster.health().await.unwrap().http_status, 503);
    cluster.shutdown().await.expect("clean shutdown");
}

/// A long prompt, so that its prefill takes a while on a CPU.
fn long_prompt() -> Vec<u32> {
    let long = golden_cases()
        .into_iter()
        .find(|c| c.name == "long_600")
        .unwrap()
        .prompt_ids;
    long.iter().chain(&long).copied().collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_a_prefill_node_mid_transfer_retries_elsewhere_and_frees_the_reservation() {
    let _serial = SERIAL.lock().await;
    let prompt = long_prompt();
    let want = reference(&prompt, &greedy(8));
    let mut cluster = Cluster::start(ClusterSpec {
        prefill: 2,
        decode: 1,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    let mut client = grpc_client(&cluster).await;
    let request = {
        let prompt = prompt.clone();
        let mut client = client.clone();
        tokio::spawn(async move { grpc_generate(&mut client, &prompt, &greedy(8)).await })
    };
    // Kill whichever prefill node is computing the prompt, while it computes.
    let deadline = Instant::now() + REQUEST_TIMEOUT;
    'find: loop {
        for node in cluster
            .nodes()
            .into_iter()
            .filter(|n| n.role == Role::Prefill)
        {
            if running_on(&node.grpc).await > 0 {
                cluster.kill_node(&node.id).expect("SIGKILL");
                break 'find;
            }
        }
        assert!(
            Instant::now() < deadline,
            "no prefill node ever ran the prompt"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let got = request
        .await
        .expect("task")
        .expect("the request succeeds after the retry");
    assert_eq!(got.ids, want.ids);
    assert_all_blocks_free(&cluster).await;
    // The cluster keeps serving with the prefill node that is left.
    let again = grpc_generate(&mut client, &prompt, &greedy(8))
        .await
        .expect("served");
    assert_eq!(again.ids, want.ids);
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_prefill_node_costs_one_deadline_not_a_hung_request() {
    let _serial = SERIAL.lock().await;
    let prompt = golden_cases()[0].prompt_ids.clone();
    let want = reference(&prompt, &greedy(8));
    let cluster = Cluster::start(ClusterSpec {
        decode_args: vec!["--transfer-timeout-ms".into(), "1500".into()],
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    let prefill = cluster.first_node(Role::Prefill).expect("a prefill node");
    // Frozen, not dead: its connections stay open and nothing answers.
    // SAFETY: kill(2) touches no memory of ours; the pid is a child the cluster has not reaped.
    assert_eq!(unsafe { libc::kill(prefill.pid as i32, libc::SIGSTOP) }, 0);
    let mut client = grpc_client(&cluster).await;
    let got = grpc_generate(&mut client, &prompt, &greedy(8)).await;
    // SAFETY: as for SIGSTOP above.
    unsafe { libc::kill(prefill.pid as i32, libc::SIGCONT) };
    assert_eq!(got.expect("served after the deadline").ids, want.ids);
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cluster_keeps_serving_while_etcd_restarts() {
    let _serial = SERIAL.lock().await;
    let prompt = golden_cases()[0].prompt_ids.clone();
    let want = reference(&prompt, &greedy(8));
    let mut cluster = Cluster::start(ClusterSpec::default())
        .await
        .expect("cluster starts");
    let mut client = grpc_client(&cluster).await;

    cluster.kill_etcd();
    let health = cluster
        .wait_health(Duration::from_secs(15), "etcd seen as down", |h| {
            !h.etcd_connected
        })
        .await
        .expect("the router notices");
    assert_eq!(health.http_status, 200, "it keeps serving on its last view");
    assert_eq!((health.nodes.prefill, health.nodes.decode), (1, 1));
    let got = grpc_generate(&mut client, &prompt, &greedy(8))
        .await
        .expect("served");
    assert_eq!(got.ids, want.ids);

    cluster.restart_etcd().await.expect("etcd restarts");
    cluster
        .wait_health(Duration::from_secs(30), "nodes re-registered", |h| {
            h.etcd_connected && h.nodes.prefill == 1 && h.nodes.decode == 1
        })
        .await
        .expect("nodes re-register");
    let got = grpc_generate(&mut client, &prompt, &greedy(8))
        .await
        .expect("served");
    assert_eq!(got.ids, want.ids);
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}
