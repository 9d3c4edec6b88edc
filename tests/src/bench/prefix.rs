//! `pd-bench prefix-cache`: one long instruction shared by many different questions (as a
//! system prompt is), on a local cluster of processes (2 prefill and 2 decode nodes by
//! default), three ways in one run: the prefix cache off, on with the router placing prompts by
//! load only, and on with KV-aware routing. For each: time to first token as clients see it,
//! prompt tokens the nodes actually computed (`pd_prefill_tokens_total`), prompt tokens reported
//! cached, and KV bytes shipped per request (`pd_kv_transfer_bytes_total`).

use std::time::Instant;

use pd_proto::v1::generation_client::GenerationClient;

use super::cluster::{one_request, percentile};
use crate::cluster::{Cluster, ClusterSpec};
use crate::golden_cases;

#[derive(clap::Args)]
pub struct PrefixArgs {
    /// Requests per configuration.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Tokens generated per request.
    #[arg(long, default_value_t = 8)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 2)]
    pub prefill: usize,
    #[arg(long, default_value_t = 2)]
    pub decode: usize,
    /// Extra flags for every node, one per use.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,
    /// Appends one JSON line per configuration to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// The shared instruction (the golden long prompt) followed by a different question each time:
/// the golden prompts in turn, rotated so that no two requests are the same.
fn prompts(n: usize) -> Vec<Vec<u32>> {
    let cases = golden_cases();
    let long = &cases
        .iter()
        .find(|c| c.name == "long_600")
        .expect("long_600")
        .prompt_ids;
    let system = &long[..long.len() - 8];
    let questions: Vec<&Vec<u32>> = cases
        .iter()
        .filter(|c| c.name != "long_600" && c.prompt_ids.len() > 8)
        .map(|c| &c.prompt_ids)
        .collect();
    (0..n)
        .map(|i| {
            let mut q = questions[i % questions.len()].clone();
            q.rotate_left(i / questions.len());
            [system, q.as_slice()].concat()
        })
        .collect()
}

/// The sum of a counter over the nodes' `/metrics`, for series whose labels contain `labels`.
async fn counter(urls: &[String], name: &str, labels: &str) -> anyhow::Result<f64> {
    let mut total = 0.0;
    for url in urls {
        let text = reqwest::get(url).await?.error_for_status()?.text().await?;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let (series, value) = match rest.split_once('}') {
                Some((l, v)) if l.starts_with('{') => (l, v),
                _ => ("", rest),
            };
            if series.contains(labels) || (labels.is_empty() && !rest.starts_with('_')) {
                total += value.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
    }
    Ok(total)
}

pub fn run(args: PrefixArgs) -> anyhow::Result<()> {
    tokio::runtime::Runtime::new()?.block_on(run_async(args))
}

async fn run_async(args: PrefixArgs) -> anyhow::Result<()> {
    let prompts = prompts(args.requests);
    let tokens: usize = prompts.iter().map(Vec::len).sum();
    println!(
        "{} requests of {}..{} prompt tokens ({} shared), {} at a time, {}P{}D (load average {})",
        prompts.len(),
        prompts.iter().map(Vec::len).min().unwrap_or(0),
        prompts.iter().map(Vec::len).max().unwrap_or(0),
        crate::match_len(&prompts[0], &prompts[1]),
        args.concurrency,
        args.prefill,
        args.decode,
        super::load_average()
    );
    println!(
        "{:<22} {:>9} {:>9} {:>16} {:>14} {:>13}",
        "configuration",
        "TTFT p50",
        "TTFT p90",
        "prompt computed",
        "cached/request",
        "KV MB/request"
    );
    let mut json_out = super::JsonLines::open(args.json.as_deref())?;
    let mut baseline = None;
    for (name, cache, mode) in [
        ("cache off", false, "load"),
        ("cache, routing by load", true, "load"),
        ("cache, KV-aware routing", true, "kv"),
    ] {
        let mut node_args = args.node_args.clone();
        if !cache {
            node_args.push("--no-enable-prefix-caching".into());
        }
        let spec = ClusterSpec {
            prefill: args.prefill,
            decode: args.decode,
            prefill_args: node_args.clone(),
            decode_args: node_args,
            router_args: vec!["--router-mode".into(), mode.into()],
            ..ClusterSpec::default()
        };
        let cluster = Cluster::start(spec).await?;
        let client = GenerationClient::connect(cluster.grpc_url()).await?;
        let urls: Vec<String> = cluster.nodes().iter().map(|n| n.metrics_url()).collect();
        let computed_before = counter(&urls, "pd_prefill_tokens_total", "").await?;
        let sent_before =
            counter(&urls, "pd_kv_transfer_bytes_total", "direction=\"sent\"").await?;
        let started = Instant::now();
        let mut samples = Vec::new();
        for wave in prompts.chunks(args.concurrency.max(1)) {
            let calls = wave
                .iter()
                .map(|p| one_request(client.clone(), p.clone(), args.max_tokens));
            for s in futures::future::join_all(calls).await {
                samples.push(s?);
            }
        }
        let wall = started.elapsed().as_secs_f64();
        let computed = counter(&urls, "pd_prefill_tokens_total", "").await? - computed_before;
        let sent =
            counter(&urls, "pd_kv_transfer_bytes_total", "direction=\"sent\"").await? - sent_before;
        cluster.shutdown().await?;
        let ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
        let (p50, p90) = (percentile(&ttft, 0.5), percentile(&ttft, 0.9));
        let cached =
            samples.iter().map(|s| s.cached_tokens as f64).sum::<f64>() / samples.len() as f64;
        let n = samples.len() as f64;
        let ratio = match baseline {
            None => {
                baseline = Some(p50);
                1.0
            }
            Some(b) => p50 / b,
        };
        println!(
            "{:<22} {:>7.0}ms {:>7.0}ms {:>9.0} of {:<5} {:>14.0} {:>13.2}   TTFT p50 {:.2}x cache off",
            name,
            1e3 * p50,
            1e3 * p90,
            computed,
            tokens,
            cached,
            sent / n / 1e6,
            ratio
        );
        json_out.write(&serde_json::json!({
            "configuration": name,
            "requests": samples.len(),
            "concurrency": args.concurrency,
            "ttft_p50_ms": 1e3 * p50,
            "ttft_p90_ms": 1e3 * p90,
            "ttft_p50_vs_cache_off": ratio,
            "prompt_tokens": tokens,
            "tokens_computed": computed,
            "cached_tokens_per_request": cached,
            "kv_bytes_per_request": sent / n,
            "seconds": wall,
        }))?;
    }
    Ok(())
}
