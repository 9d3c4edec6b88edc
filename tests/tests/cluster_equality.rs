//! Same answer everywhere: greedy output through a real cluster (etcd, router, prefill and
//! decode processes) equals the single-process engine's, over gRPC and HTTP, streamed or not,
//! one request at a time and 32 at once, disaggregated (1P1D, 2P2D) and aggregated, with and
//! without speculative decoding on the decode node. After each run every node's KV blocks are
//! free.

mod common;

use common::*;
use pd_tests::cluster::{Cluster, ClusterSpec, Role};
use pd_tests::golden_cases;

const MAX_TOKENS: u32 = 16;

/// The golden prompts and the single engine's greedy output for each.
fn references() -> Vec<(String, Vec<u32>, Generated)> {
    golden_cases()
        .into_iter()
        .map(|c| {
            let want = reference(&c.prompt_ids, &greedy(MAX_TOKENS));
            (c.name, c.prompt_ids, want)
        })
        .collect()
}

/// The nodes run in this process: these checks need no kill or freeze.
async fn check_cluster(spec: ClusterSpec, concurrent: usize, http: bool) {
    let spec = ClusterSpec {
        in_process: true,
        ..spec
    };
    let speculative = spec.decode_args.iter().any(|a| a == "--speculative-config");
    // With one node of each kind a prompt seen before finds every full block in the cache of the
    // node that computes it, but the one holding its last token (which is always computed).
    let one_cache = spec.prefill <= 1 && spec.decode <= 1;
    let all_cached = |prompt: &[u32]| ((prompt.len() - 1) / 16 * 16) as u32;
    let refs = references();
    let cluster = Cluster::start(spec).await.expect("cluster starts");
    let mut client = grpc_client(&cluster).await;

    let mut accepted = 0;
    // One at a time over gRPC: token ids equal.
    for (name, prompt, want) in &refs {
        let got = grpc_generate(&mut client, prompt, &greedy(MAX_TOKENS))
            .await
            .unwrap_or_else(|s| panic!("{name}: {s}"));
        assert_eq!(got.speculative.is_some(), speculative, "{name}");
        accepted += got.speculative.map_or(0, |s| s.accepted);
        assert_eq!(got.ids, want.ids, "{name}");
        assert_eq!(got.text, want.text, "{name}");
        assert_eq!(got.finish_reason, want.finish_reason, "{name}");
        assert_eq!(got.completion_tokens, want.ids.len() as u32, "{name}");
        assert!(
            got.cached_tokens <= all_cached(prompt) && got.cached_tokens % 16 == 0,
            "{name}: {} cached tokens",
            got.cached_tokens
        );
    }
    assert_eq!(accepted > 0, speculative, "accepted drafts: {accepted}");
    if speculative {
        // The decode node's /metrics describes and counts them.
        let decode = cluster.first_node(Role::Decode).expect("a decode node");
        let text = scrape(&decode.metrics_url()).await;
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        let name = "pd_spec_decode_num_accepted_tokens_total";
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "{name} undescribed"
        );
        assert!(value(name) > 0.0 && value(name) <= value("pd_spec_decode_num_draft_tokens_total"));
        assert!(value("pd_spec_decode_num_drafts_total") > 0.0);
    }
    if one_cache {
        // The gRPC Usage reports the cache's part, and the output does not change with it.
        let (name, prompt, want) = &refs[0];
        let got = grpc_generate(&mut client, prompt, &greedy(MAX_TOKENS))
            .await
            .unwrap_or_else(|s| panic!("{name}: {s}"));
        assert_eq!(got.ids, want.ids, "{name} again");
        assert_eq!(got.cached_tokens, all_cached(prompt), "{name} again");
    }

    // Over HTTP, streamed and not: the same text.
    if http {
        for (name, prompt, want) in refs.iter().take(4) {
            for stream in [false, true] {
                let got = http_complete(&cluster, prompt, MAX_TOKENS, stream).await;
                assert_eq!(got.text, want.text, "{name} (stream: {stream})");
                assert_eq!(got.finish_reason, reason_name(want.finish_reason), "{name}");
                assert_eq!(got.completion_tokens, want.ids.len() as u64, "{name}");
                if one_cache {
                    // Seen over gRPC already: usage.prompt_tokens_details.cached_tokens.
                    assert_eq!(
                        got.cached_tokens,
                        all_cached(prompt) as u64,
                        "{name} (stream: {stream})"
                    );
                }
            }
        }
    }

    // Many at once: continuous batching on every node must not change a token.
    let calls = (0..concurrent).map(|i| {
        let (name, prompt, want) = refs[i % refs.len()].clone();
        let mut client = client.clone();
        async move {
            let got = grpc_generate(&mut client, &prompt, &greedy(MAX_TOKENS))
                .await
                .unwrap_or_else(|s| panic!("{name}: {s}"));
            assert_eq!(
                got.ids, want.ids,
                "{name} among {concurrent} concurrent requests"
            );
        }
    });
    futures::future::join_all(calls).await;

    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_prefill_one_decode_equals_the_single_engine() {
    let _serial = SERIAL.lock().await;
    check_cluster(ClusterSpec::default(), 32, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_prefill_two_decode_equals_the_single_engine() {
    let _serial = SERIAL.lock().await;
    let spec = ClusterSpec {
        prefill: 2,
        decode: 2,
        ..ClusterSpec::default()
    };
    check_cluster(spec, 32, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregated_decode_node_equals_the_single_engine() {
    let _serial = SERIAL.lock().await;
    let spec = ClusterSpec {
        prefill: 1,
        decode: 1,
        decode_args: vec!["--aggregated".into()],
        ..ClusterSpec::default()
    };
    check_cluster(spec, 8, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculative_decode_nodes_equal_the_single_engine() {
    let _serial = SERIAL.lock().await;
    let speculative = r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}"#;
    for aggregated in [false, true] {
        let mut decode_args = vec!["--speculative-config".to_string(), speculative.into()];
        if aggregated {
            decode_args.push("--aggregated".into());
        }
        let spec = ClusterSpec {
            decode_args,
            ..ClusterSpec::default()
        };
        check_cluster(spec, 16, aggregated).await;
    }
}
