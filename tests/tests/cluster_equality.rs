//! Same answer everywhere: greedy output through a real cluster (etcd, router, prefill and
//! decode processes) equals the single-process engine's, over gRPC and HTTP, streamed or not,
//! one request at a time and 32 at once, disaggregated (1P1D, 2P2D) and aggregated, with and
//! without speculative decoding on the decode node (prompt lookup, or a draft model of its
//! own); beam search too. After each run every node's KV blocks are free.

mod common;

use common::*;
use pd_common::chat_template::ChatMessage;
use pd_common::engine::{BeamOutput, EngineConfig, GenerateRequest};
use pd_common::sampling::SamplingParams;
use pd_common::wire::ToWire;
use pd_proto::v1 as pb;
use pd_proto::v1::generation_client::GenerationClient;
use pd_proto::v1::node_client::NodeClient;
use pd_tests::cluster::{Cluster, ClusterSpec, Role};
use pd_tests::{golden_cases, real_engine, real_model, Runs};
use serde_json::{json, Value};

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
    let ngram = r#"{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}"#;
    // The decode node drafts with a model of its own: the model itself here, its draft cache
    // filled on the decode node from the prompt whose target KV the prefill node shipped.
    let draft_model = json!({
        "method": "draft_model",
        "model": pd_common::model::default_model_path(),
        "num_speculative_tokens": 3,
    })
    .to_string();
    for (speculative, aggregated) in [(ngram.to_string(), true), (draft_model, false)] {
        let mut decode_args = vec!["--speculative-config".to_string(), speculative];
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

/// Beam search through the cluster, disaggregated (the prefill node ships the prompt's KV and
/// its candidates) and aggregated: over gRPC (`beam_width`) and HTTP (`use_beam_search`, `n`,
/// plain and streamed, completions and chat), every beam is the single engine's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beam_search_through_the_cluster_equals_the_single_engine() {
    let _serial = SERIAL.lock().await;
    let params = SamplingParams {
        beam_width: 3,
        max_tokens: 12,
        ..SamplingParams::default()
    };
    let chat = [ChatMessage::new("user", "What is the capital of France?")];
    let mut prompts: Vec<Vec<u32>> = golden_cases()
        .into_iter()
        .take(3)
        .map(|c| c.prompt_ids)
        .collect();
    prompts.push(real_model().encode_chat(&chat).unwrap());
    let want = engine_beams(&prompts, &params);
    for aggregated in [false, true] {
        let spec = ClusterSpec {
            in_process: true,
            decode_args: match aggregated {
                true => vec!["--aggregated".into()],
                false => Vec::new(),
            },
            ..ClusterSpec::default()
        };
        let cluster = Cluster::start(spec).await.expect("cluster starts");
        let client = grpc_client(&cluster).await;
        let calls = prompts.iter().zip(&want).map(|(prompt, want)| {
            let mut client = client.clone();
            let params = &params;
            async move {
                let got = grpc_beams(&mut client, prompt, params).await;
                assert_eq!(got.len(), want.len());
                for (g, w) in got.iter().zip(want) {
                    assert_eq!(g.token_ids, w.token_ids, "aggregated: {aggregated}");
                    assert_eq!(g.text, w.text);
                    assert_eq!(g.finish_reason, w.reason.to_wire() as i32);
                    assert!((g.cumulative_logprob - w.cumulative_logprob).abs() < 1e-4);
                    assert!((g.score - w.score).abs() < 1e-4);
                }
            }
        });
        futures::future::join_all(calls).await;

        // Two prompts in one completions request: choices 0..3 and 3..6, best first.
        let body = json!({
            "prompt": [prompts[0], prompts[1]], "max_tokens": 12, "n": 3,
            "use_beam_search": true,
        });
        let v = post_json(&cluster, "/v1/completions", &body).await;
        let texts: Vec<(u64, &str)> = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["index"].as_u64().unwrap(), c["text"].as_str().unwrap()))
            .collect();
        let expected: Vec<(u64, &str)> = want[..2]
            .iter()
            .flatten()
            .enumerate()
            .map(|(i, b)| (i as u64, b.text.as_str()))
            .collect();
        assert_eq!(texts, expected, "aggregated: {aggregated}");
        let tokens: usize = want[..2].iter().flatten().map(|b| b.token_ids.len()).sum();
        assert_eq!(
            v["usage"]["completion_tokens"].as_u64(),
            Some(tokens as u64)
        );

        // A streamed chat: one chunk per beam, each whole.
        let body = json!({
            "messages": [{"role": "user", "content": "What is the capital of France?"}],
            "max_tokens": 12, "n": 3, "use_beam_search": true, "stream": true,
        });
        let response = reqwest::Client::new()
            .post(format!("{}/v1/chat/completions", cluster.http_url()))
            .json(&body)
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .expect("POST /v1/chat/completions");
        assert_eq!(response.status(), 200);
        let events = sse_events(&response.text().await.unwrap());
        assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
        let chunks: Vec<(u64, String)> = events[..events.len() - 1]
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_str(e).unwrap();
                let c = &v["choices"][0];
                let text = c["delta"]["content"].as_str().unwrap().to_string();
                (c["index"].as_u64().unwrap(), text)
            })
            .collect();
        let expected: Vec<(u64, String)> = want[3]
            .iter()
            .enumerate()
            .map(|(i, b)| (i as u64, b.text.clone()))
            .collect();
        assert_eq!(chunks, expected, "aggregated: {aggregated}");

        // Beam search and stop strings do not mix: a 400 naming it.
        let body = json!({"prompt": "Hi", "n": 2, "use_beam_search": true, "stop": ["x"]});
        let response = reqwest::Client::new()
            .post(format!("{}/v1/completions", cluster.http_url()))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        assert!(response.text().await.unwrap().contains("stop strings"));

        // A client that goes away mid-search: once the beams have forked on the decode node,
        // the stream is dropped, and every block comes back.
        let decode = cluster.first_node(Role::Decode).expect("a decode node");
        let long = SamplingParams {
            max_tokens: 200,
            ignore_eos: true,
            ..params.clone()
        };
        let (mut c, first) = (client.clone(), prompts[0].clone());
        let call = tokio::spawn(async move { grpc_beams(&mut c, &first, &long).await });
        let node = NodeClient::new(cluster.rpc().channel(&decode.grpc).unwrap());
        eventually(REQUEST_TIMEOUT, || {
            let mut node = node.clone();
            async move {
                let s = node
                    .stats(pb::StatsRequest {})
                    .await
                    .map_err(|e| e.to_string())?;
                let running = s.into_inner().running_sequences;
                match running {
                    3 => Ok(()),
                    n => Err(format!("{n} sequences running, not the 3 beams")),
                }
            }
        })
        .await;
        call.abort();
        let _ = call.await;
        assert_all_blocks_free(&cluster).await;

        if !aggregated {
            // The prefill node's candidates were taken: nothing fell back to local prefill.
            let decode = cluster.first_node(Role::Decode).expect("a decode node");
            let failed = metric_sum(
                &decode.metrics_url(),
                "pd_local_prefills_total",
                &["prefill_failed"],
            )
            .await;
            assert_eq!(failed, 0.0);
        }
        assert_all_blocks_free(&cluster).await;
        cluster.shutdown().await.expect("clean shutdown");
    }
}

/// `n = 4` parallel samples of one prompt through 1P1D: the prefill node computes the prompt
/// once (the decode node holds the other three until its KV is in, then takes it from its
/// prefix cache), and each sample is the single engine's with its own seed, run after run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_samples_share_one_prefill_and_follow_their_seeds() {
    let _serial = SERIAL.lock().await;
    let prompt = golden_cases()
        .into_iter()
        .find(|c| c.name == "long_600")
        .expect("the long golden prompt")
        .prompt_ids;
    let sample = |j: u64| SamplingParams {
        temperature: 0.8,
        seed: Some(11 + j),
        max_tokens: 12,
        ..SamplingParams::default()
    };
    let want: Vec<String> = (0..4)
        .map(|j| reference(&prompt, &sample(j)).text)
        .collect();
    // Two decode nodes: by load alone the choices would spread over both, each asking for its
    // own prefill; the router keeps them on the node the first went to.
    let spec = ClusterSpec {
        in_process: true,
        decode: 2,
        ..ClusterSpec::default()
    };
    let cluster = Cluster::start(spec).await.expect("cluster starts");
    let prefill = cluster.first_node(Role::Prefill).expect("a prefill node");
    let prefills = || async {
        scrape(&prefill.metrics_url())
            .await
            .lines()
            .find_map(|l| l.strip_prefix("pd_prefills_total ")?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    for round in 0..2 {
        let before = prefills().await;
        let body = json!({
            "prompt": prompt, "max_tokens": 12, "n": 4, "temperature": 0.8, "seed": 11,
        });
        let v = post_json(&cluster, "/v1/completions", &body).await;
        let texts: Vec<&str> = v["choices"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["text"].as_str().unwrap())
            .collect();
        assert_eq!(texts, want, "round {round}");
        // The second time that decode node's own prefix cache holds the prompt.
        let expected = if round == 0 { 1.0 } else { 0.0 };
        assert_eq!(
            prefills().await - before,
            expected,
            "round {round}: prefills for n = 4"
        );
    }
    assert_ne!(want[0], want[1], "the seeds made no difference");
    assert_all_blocks_free(&cluster).await;
    cluster.shutdown().await.expect("clean shutdown");
}

/// The single engine's beams for each prompt (all in one batch).
fn engine_beams(prompts: &[Vec<u32>], params: &SamplingParams) -> Vec<Vec<BeamOutput>> {
    let mut core = real_engine(EngineConfig::default());
    let mut runs = Runs::new();
    for p in prompts {
        runs.add(
            &mut core,
            GenerateRequest {
                prompt_ids: p.clone(),
                params: params.clone(),
                ..Default::default()
            },
        );
    }
    runs.finish(&mut core)
        .into_iter()
        .map(|r| r.beams)
        .collect()
}

/// A beam search over the router's gRPC API: no token messages, then the beams.
async fn grpc_beams(
    client: &mut GenerationClient<tonic::transport::Channel>,
    prompt_ids: &[u32],
    params: &SamplingParams,
) -> Vec<pb::Beam> {
    let request = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: prompt_ids.to_vec(),
        })),
        sampling: Some(params.to_wire()),
        ..Default::default()
    };
    let work = async {
        let mut stream = client.generate(request).await.unwrap().into_inner();
        while let Some(m) = stream.message().await.unwrap() {
            assert!(m.token_ids.is_empty(), "a beam search streamed tokens");
            if let Some(c) = m.completion {
                return c.beams;
            }
        }
        panic!("the stream ended without a completion")
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .expect("a beam search hung")
}

async fn post_json(cluster: &Cluster, path: &str, body: &Value) -> Value {
    let response = reqwest::Client::new()
        .post(format!("{}{path}", cluster.http_url()))
        .json(body)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .expect("POST");
    assert_eq!(response.status(), 200);
    response.json().await.expect("a JSON body")
}
