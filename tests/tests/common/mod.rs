//! Clients and references the cluster tests share: gRPC and HTTP calls to the router, the
//! single-process reference output, and the check that every node's KV blocks are free.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use pd_common::engine::{EngineConfig, GenerateRequest};
use pd_common::sampling::SamplingParams;
use pd_common::wire::ToWire;
use pd_proto::v1 as pb;
use pd_proto::v1::generation_client::GenerationClient;
use pd_proto::v1::node_client::NodeClient;
use pd_tests::cluster::Cluster;
use pd_tests::golden_cases;
use pd_tests::{real_engine, Runs};
use serde_json::{json, Value};
use tokio::sync::mpsc;

/// Only one cluster at a time: the machine has few cores, and timings matter to some tests.
pub static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longest any single request may take in these tests; a hung stream fails instead of waiting.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);

/// What one request produced.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Generated {
    pub ids: Vec<u32>,
    pub text: String,
    pub finish_reason: i32,
    pub completion_tokens: u32,
    /// `usage.prompt_tokens_details.cached_tokens` (the engine's count for a reference).
    pub cached_tokens: u32,
    /// The completion's speculative decoding counts (gRPC only).
    pub speculative: Option<pb::SpeculativeCounts>,
}

/// The single-process engine's output for `prompt_ids` under `params`.
pub fn reference(prompt_ids: &[u32], params: &SamplingParams) -> Generated {
    let mut core = real_engine(EngineConfig::default());
    let mut runs = Runs::new();
    runs.add(
        &mut core,
        GenerateRequest {
            prompt_ids: prompt_ids.to_vec(),
            params: params.clone(),
            ..Default::default()
        },
    );
    let r = runs.finish(&mut core).remove(0);
    Generated {
        completion_tokens: r.ids.len() as u32,
        cached_tokens: r.cached_tokens as u32,
        ids: r.ids,
        text: r.text,
        finish_reason: r.reason.to_wire() as i32,
        speculative: None,
    }
}

/// The single-process engine's outputs for every request of `work`, run as one batch (batching
/// does not change outputs: tests/tests/batch_invariance.rs).
pub fn references(work: &[(Vec<u32>, SamplingParams)]) -> Vec<Generated> {
    let mut core = real_engine(EngineConfig::default());
    let mut runs = Runs::new();
    for (prompt_ids, params) in work {
        runs.add(
            &mut core,
            GenerateRequest {
                prompt_ids: prompt_ids.clone(),
                params: params.clone(),
                ..Default::default()
            },
        );
    }
    runs.finish(&mut core)
        .into_iter()
        .map(|r| Generated {
            completion_tokens: r.ids.len() as u32,
            cached_tokens: r.cached_tokens as u32,
            ids: r.ids,
            text: r.text,
            finish_reason: r.reason.to_wire() as i32,
            speculative: None,
        })
        .collect()
}

pub fn greedy(max_tokens: u32) -> SamplingParams {
    SamplingParams {
        temperature: 0.0,
        max_tokens,
        ..SamplingParams::default()
    }
}

pub async fn grpc_client(cluster: &Cluster) -> GenerationClient<tonic::transport::Channel> {
    GenerationClient::connect(cluster.grpc_url())
        .await
        .expect("connecting to the router's gRPC API")
}

/// Streams one request through the router's gRPC API; `Err` carries the status.
pub async fn grpc_generate(
    client: &mut GenerationClient<tonic::transport::Channel>,
    prompt_ids: &[u32],
    params: &SamplingParams,
) -> Result<Generated, tonic::Status> {
    let request = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: prompt_ids.to_vec(),
        })),
        sampling: Some(params.to_wire()),
        ..Default::default()
    };
    let work = async {
        let mut stream = client.generate(request).await?.into_inner();
        let mut out = Generated::default();
        while let Some(m) = stream.message().await? {
            out.ids.extend(&m.token_ids);
            out.text.push_str(&m.text);
            if let Some(c) = m.completion {
                out.finish_reason = c.finish_reason;
                let usage = c.usage.unwrap_or_default();
                out.completion_tokens = usage.completion_tokens;
                out.cached_tokens = usage.prompt_tokens_details.map_or(0, |d| d.cached_tokens);
                out.speculative = c.speculative;
                return Ok(out);
            }
        }
        Err(tonic::Status::internal(
            "the stream ended without a completion",
        ))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, work)
        .await
        .unwrap_or_else(|_| panic!("a gRPC stream hung for {REQUEST_TIMEOUT:?}"))
}

/// What `POST /v1/completions` answered.
#[derive(Debug, Default)]
pub struct HttpCompletion {
    pub text: String,
    pub finish_reason: String,
    pub completion_tokens: u64,
    /// `usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u64,
}

/// `POST /v1/completions` with token ids, streamed or not (with `include_usage`).
pub async fn http_complete(
    cluster: &Cluster,
    prompt_ids: &[u32],
    max_tokens: u32,
    stream: bool,
) -> HttpCompletion {
    let body = json!({
        "model": "",
        "prompt": prompt_ids,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "stream_options": {"include_usage": true},
    });
    let response = reqwest::Client::new()
        .post(format!("{}/v1/completions", cluster.http_url()))
        .json(&body)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .expect("POST /v1/completions");
    assert_eq!(response.status(), 200);
    let text = response.text().await.expect("response body");
    let usage = |v: &Value, out: &mut HttpCompletion| {
        let u = &v["usage"];
        out.completion_tokens = u["completion_tokens"].as_u64().expect("completion_tokens");
        out.cached_tokens = u["prompt_tokens_details"]["cached_tokens"]
            .as_u64()
            .expect("usage.prompt_tokens_details.cached_tokens");
    };
    let mut out = HttpCompletion::default();
    if !stream {
        let v: Value = serde_json::from_str(&text).expect("a JSON body");
        let choice = &v["choices"][0];
        out.text = choice["text"].as_str().unwrap_or_default().to_string();
        out.finish_reason = choice["finish_reason"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        usage(&v, &mut out);
        return out;
    }
    let events = sse_events(&text);
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"), "{text}");
    for data in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(data).expect("a JSON event");
        assert!(v.get("error").is_none(), "{data}");
        if let Some(choice) = v["choices"].get(0) {
            out.text
                .push_str(choice["text"].as_str().unwrap_or_default());
            if let Some(r) = choice["finish_reason"].as_str() {
                out.finish_reason = r.to_string();
            }
        }
        if !v["usage"].is_null() {
            usage(&v, &mut out);
        }
    }
    out
}

/// The `data:` payloads of a server-sent event stream.
pub fn sse_events(body: &str) -> Vec<String> {
    body.lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

pub fn reason_name(reason: i32) -> &'static str {
    match pb::FinishReason::try_from(reason) {
        Ok(pb::FinishReason::Length) => "length",
        _ => "stop",
    }
}

/// Waits until every live node reports all its KV blocks free and nothing queued: nothing
/// leaked. Fails after a deadline with the last stats.
pub async fn assert_all_blocks_free(cluster: &Cluster) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let mut busy = Vec::new();
        for node in cluster.nodes() {
            let stats = async {
                let mut client = NodeClient::new(cluster.rpc().channel(&node.grpc).ok()?);
                Some(client.stats(pb::StatsRequest {}).await.ok()?.into_inner())
            }
            .await;
            match stats {
                Some(s)
                    if s.free_kv_blocks == s.total_kv_blocks
                        && s.running_sequences == 0
                        && s.waiting_sequences == 0 => {}
                other => busy.push(format!("{}: {other:?}", node.id)),
            }
        }
        if busy.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "KV blocks still in use after the work ended: {busy:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asks `check` again until it holds, failing with its last answer after `timeout`: for changes
/// nothing announces (an index catching up, a gauge refreshed, a slot freed after a hang-up),
/// so the only way to see them is to look again.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(()) => return,
            Err(why) => assert!(Instant::now() < deadline, "after {timeout:?}: {why}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A node's (or the router's) /metrics text.
pub async fn scrape(metrics_url: &str) -> String {
    reqwest::get(metrics_url)
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics body")
}

/// The sum of a metric's series whose labels include every one of `labels`.
pub async fn metric_sum(metrics_url: &str, name: &str, labels: &[&str]) -> f64 {
    scrape(metrics_url)
        .await
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter(|l| labels.iter().all(|label| l.contains(label)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// 16 requests: greedy and seeded sampling, over several prompts.
pub fn workload(max_tokens: u32) -> Vec<(Vec<u32>, SamplingParams)> {
    let cases = golden_cases();
    (0..16)
        .map(|i| {
            let prompt = cases[i % cases.len()].prompt_ids.clone();
            let params = if i % 2 == 0 {
                SamplingParams {
                    ignore_eos: true,
                    ..greedy(max_tokens)
                }
            } else {
                SamplingParams {
                    temperature: 0.8,
                    top_p: 0.95,
                    seed: Some(1000 + i as u64),
                    max_tokens,
                    ignore_eos: true,
                    ..SamplingParams::default()
                }
            };
            (prompt, params)
        })
        .collect()
}

/// Starts every request of `work` as a gRPC stream to the router at `url`; each reports its tokens as they arrive on
/// `progress` and its whole result when done.
pub fn start_streams(
    url: &str,
    work: &[(Vec<u32>, SamplingParams)],
    progress: mpsc::UnboundedSender<usize>,
) -> Vec<tokio::task::JoinHandle<Result<Generated, tonic::Status>>> {
    let url = url.to_string();
    work.iter()
        .cloned()
        .enumerate()
        .map(|(i, (prompt, params))| {
            let url = url.clone();
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut client = pb::generation_client::GenerationClient::connect(url)
                    .await
                    .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                let request = pb::GenerateRequest {
                    prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
                        ids: prompt,
                    })),
                    sampling: Some(params.to_wire()),
                    ..Default::default()
                };
                let mut stream = client.generate(request).await?.into_inner();
                let mut out = Generated::default();
                while let Some(m) = stream.message().await? {
                    out.ids.extend(&m.token_ids);
                    out.text.push_str(&m.text);
                    if !m.token_ids.is_empty() {
                        let _ = progress.send(i);
                    }
                    if let Some(c) = m.completion {
                        out.finish_reason = c.finish_reason;
                        out.completion_tokens = c.usage.map_or(0, |u| u.completion_tokens);
                        return Ok(out);
                    }
                }
                Err(tonic::Status::internal("stream ended without a completion"))
            })
        })
        .collect()
}

/// Waits until every stream has delivered at least `tokens` tokens.
pub async fn wait_progress(
    progress: &mut mpsc::UnboundedReceiver<usize>,
    streams: usize,
    tokens: usize,
) {
    let mut seen = vec![0usize; streams];
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    while seen.iter().any(|&n| n < tokens) {
        match tokio::time::timeout_at(deadline, progress.recv()).await {
            Ok(Some(i)) => seen[i] += 1,
            _ => panic!("streams stalled before {tokens} tokens each: {seen:?}"),
        }
    }
}
