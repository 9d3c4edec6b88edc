//! KV-aware routing in a real cluster (etcd, router, node processes): the router's index of
//! which node caches which blocks equals what every node reports of its own cache after a
//! workload that evicts, a node that dies is dropped from it at once and a new one joins it, and
//! a prompt that shares its beginning with an earlier one goes to the prefill node that holds
//! that beginning. Greedy output equals the single engine's throughout, and each node's
//! `/metrics` counts its prefix-cache lookups and blocks.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use pd_proto::v1 as pb;
use pd_proto::v1::node_client::NodeClient;
use pd_tests::cluster::{Cluster, ClusterSpec, Role};
use pd_tests::golden_cases;
use rand::{rngs::StdRng, seq::SliceRandom, SeedableRng};
use serde_json::Value;

/// (incarnation, sorted hex block names) of each node, as the node itself tells it: the
/// snapshot that starts a fresh `Node.KvEvents` stream.
async fn node_caches(cluster: &Cluster) -> BTreeMap<String, (u64, Vec<String>)> {
    let mut out = BTreeMap::new();
    for node in cluster.nodes() {
        let mut client = NodeClient::connect(node.grpc_url())
            .await
            .expect("connecting to a node");
        let mut stream = client
            .kv_events(pb::KvEventsRequest::default())
            .await
            .expect("Node.KvEvents")
            .into_inner();
        let snapshot = stream
            .message()
            .await
            .expect("a snapshot")
            .expect("a snapshot");
        assert!(snapshot.snapshot);
        let mut blocks: Vec<String> = snapshot
            .events
            .iter()
            .map(|e| e.block_hash.iter().map(|b| format!("{b:02x}")).collect())
            .collect();
        blocks.sort();
        out.insert(node.id.clone(), (snapshot.incarnation, blocks));
    }
    out
}

/// The router's index (`/debug/kv_index`) in the same shape.
async fn router_index(cluster: &Cluster) -> BTreeMap<String, (u64, Vec<String>)> {
    let body: Value = reqwest::get(format!("{}/debug/kv_index", cluster.http_url()))
        .await
        .expect("GET /debug/kv_index")
        .json()
        .await
        .expect("a JSON body");
    body["nodes"]
        .as_object()
        .expect("nodes")
        .iter()
        .map(|(id, n)| {
            let blocks = n["blocks"]
                .as_array()
                .expect("blocks")
                .iter()
                .map(|b| b.as_str().expect("hex").to_string())
                .collect();
            (
                id.clone(),
                (n["incarnation"].as_u64().expect("incarnation"), blocks),
            )
        })
        .collect()
}

/// Waits until the router's index equals every node's own account of its cache.
async fn assert_index_matches(cluster: &Cluster) {
    eventually(Duration::from_secs(20), move || async move {
        let (nodes, index) = (node_caches(cluster).await, router_index(cluster).await);
        if nodes == index {
            return Ok(());
        }
        Err(format!(
            "the router's index does not match the nodes' caches:\nnodes: {:?}\nindex: {:?}",
            summary(&nodes),
            summary(&index)
        ))
    })
    .await;
}

fn summary(m: &BTreeMap<String, (u64, Vec<String>)>) -> Vec<(String, u64, usize)> {
    m.iter()
        .map(|(id, (inc, b))| (id.clone(), *inc, b.len()))
        .collect()
}

/// Prompts of 300 to 900 tokens made of golden prompts in random order: some share beginnings,
/// and together they are far more than the small caches hold.
fn prompts(seed: u64, count: usize) -> Vec<Vec<u32>> {
    let pieces: Vec<Vec<u32>> = golden_cases().into_iter().map(|c| c.prompt_ids).collect();
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let mut order: Vec<&Vec<u32>> = pieces.iter().collect();
            order.shuffle(&mut rng);
            let mut p = Vec::new();
            for piece in order {
                if p.len() >= 300 {
                    break;
                }
                p.extend(piece.iter().take(900 - p.len().min(900)));
            }
            p.truncate(900);
            p
        })
        .collect()
}

/// Runs `prompts` four at a time; each one's greedy tokens equal the single engine's, however
/// much of it came from which cache (and whatever was evicted meanwhile).
async fn run_all(cluster: &Cluster, prompts: &[Vec<u32>]) {
    let work: Vec<_> = prompts.iter().map(|p| (p.clone(), greedy(4))).collect();
    let want = references(&work);
    let client = grpc_client(cluster).await;
    for (batch, want) in prompts.chunks(4).zip(want.chunks(4)) {
        let calls = batch.iter().zip(want).map(|(p, want)| {
            let mut client = client.clone();
            async move {
                let got = grpc_generate(&mut client, p, &greedy(4))
                    .await
                    .unwrap_or_else(|s| panic!("{s}"));
                assert_eq!(got.ids, want.ids, "a prompt of {} tokens", p.len());
            }
        });
        futures::future::join_all(calls).await;
    }
}

/// A counter or gauge without labels from a node's `/metrics`.
async fn metric(url: &str, name: &str) -> f64 {
    let text = reqwest::get(url)
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body");
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routers_index_follows_the_nodes_caches_through_evictions_and_a_restart() {
    let _serial = SERIAL.lock().await;
    // 96 blocks of 16 tokens: two or three of these prompts fill a node's cache.
    let small = vec!["--num-blocks".to_string(), "96".to_string()];
    let mut cluster = Cluster::start(ClusterSpec {
        prefill: 2,
        decode: 1,
        prefill_args: small.clone(),
        decode_args: small,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");

    run_all(&cluster, &prompts(1, 16)).await;
    assert_index_matches(&cluster).await;
    let nodes = node_caches(&cluster).await;
    assert!(
        nodes.values().all(|(_, b)| !b.is_empty()),
        "{:?}",
        summary(&nodes)
    );
    // The caches were too small for the workload: events numbered past what is held now are
    // evictions the index followed.
    let dump: Value = reqwest::get(format!("{}/debug/kv_index", cluster.http_url()))
        .await
        .expect("GET /debug/kv_index")
        .json()
        .await
        .expect("a JSON body");
    let evicted = dump["nodes"].as_object().expect("nodes").values().any(|n| {
        let held = n["blocks"].as_array().map_or(0, Vec::len) as u64;
        n["next_seq"].as_u64().unwrap_or(0) > held
    });
    assert!(evicted, "no node evicted anything: {dump}");
    // Each node's /metrics counts the prompt tokens it looked up and found, and its cached
    // blocks are the ones its snapshot lists.
    let mut hits = 0.0;
    for node in cluster.nodes() {
        let url = node.metrics_url();
        let queries = metric(&url, "pd_prefix_cache_queries_total").await;
        let found = metric(&url, "pd_prefix_cache_hits_total").await;
        assert!(
            queries > 0.0 && found <= queries,
            "{}: {found} of {queries}",
            node.id
        );
        hits += found;
        // A gauge the node refreshes every few hundred milliseconds.
        let (url, id, want) = (&url, &node.id, nodes[&node.id].1.len());
        eventually(Duration::from_secs(10), move || async move {
            let blocks = metric(url, "pd_prefix_cache_blocks").await as usize;
            match blocks == want {
                true => Ok(()),
                false => Err(format!(
                    "{id}: pd_prefix_cache_blocks {blocks}, its snapshot {want}"
                )),
            }
        })
        .await;
    }
    assert!(hits > 0.0, "no prompt found anything in a cache");

    // A prefill node dies: out of the index at once (well before its lease would lapse).
    let prefill: Vec<String> = cluster
        .nodes()
        .iter()
        .filter(|n| n.role == Role::Prefill)
        .map(|n| n.id.clone())
        .collect();
    cluster.kill_node(&prefill[0]).expect("kill");
    let (c, dead) = (&cluster, &prefill[0]);
    eventually(Duration::from_secs(5), move || async move {
        match router_index(c).await.contains_key(dead) {
            false => Ok(()),
            true => Err(format!("the dead node {dead} stayed in the index")),
        }
    })
    .await;

    // Another joins, and the index follows it from its first snapshot on.
    cluster.add_node(Role::Prefill).await.expect("a new node");
    cluster
        .wait_for_nodes(2, 1, Duration::from_secs(30))
        .await
        .expect("the router sees it");
    run_all(&cluster, &prompts(2, 12)).await;
    assert_index_matches(&cluster).await;
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prompt_goes_to_the_prefill_node_that_holds_its_beginning() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(ClusterSpec {
        prefill: 2,
        decode: 1,
        ..ClusterSpec::default()
    })
    .await
    .expect("cluster starts");
    let mut client = grpc_client(&cluster).await;
    let cases = golden_cases();
    let long = &cases
        .iter()
        .find(|c| c.name == "long_600")
        .unwrap()
        .prompt_ids;
    // Four beginnings, each followed by two endings: the second ending's prompt must be
    // prefilled where the first one's was (with routing by load, each would be a coin toss).
    for (i, tails) in [
        ["en_capital", "zh_instruction"],
        ["code_python", "en_list"],
        ["one_token", "prefix_translate_a"],
        ["prefix_translate_b", "en_capital"],
    ]
    .iter()
    .enumerate()
    {
        let mut begin = long[..long.len() - 8].to_vec();
        begin.rotate_left(i * 97);
        let prompt = |tail: &str| {
            let tail = &cases.iter().find(|c| c.name == tail).unwrap().prompt_ids;
            [begin.as_slice(), tail].concat()
        };
        let (first, second) = (prompt(tails[0]), prompt(tails[1]));
        grpc_generate(&mut client, &first, &greedy(4))
            .await
            .expect("first");
        // The router has heard of the blocks the first one left before the second arrives.
        assert_index_matches(&cluster).await;
        let got = grpc_generate(&mut client, &second, &greedy(4))
            .await
            .expect("second");
        let shared = pd_tests::match_len(&first, &second) / 16 * 16;
        assert_eq!(got.cached_tokens as usize, shared, "beginning {i}");
    }
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}
