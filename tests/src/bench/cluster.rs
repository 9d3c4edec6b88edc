//! `pd-bench cluster`: a real local cluster (etcd, router, nodes as processes) under a
//! closed-loop load: each of N clients sends a request, waits for its last token, and sends the
//! next. Reports output tokens/s and time to first token / inter-token latency percentiles as
//! the client sees them, for an aggregated cluster (the decode node prefills) and a
//! disaggregated one (1 prefill + 1 decode node), on this machine.

use std::time::{Duration, Instant};

use pd_proto::v1 as pb;
use pd_proto::v1::generation_client::GenerationClient;

use crate::cluster::{Cluster, ClusterSpec};
use crate::golden_cases;
use rand::{Rng, SeedableRng};

#[derive(clap::Args)]
pub struct ClusterArgs {
    /// Numbers of concurrent clients.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    pub clients: Vec<usize>,

    /// Requests each client sends, one after the other.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,

    /// Tokens generated per request (end-of-generation ignored, so every request has the same).
    #[arg(long, default_value_t = 48)]
    pub max_tokens: u32,

    /// Modes to measure: aggregated, disaggregated (KV over NCCL where both nodes offer it, else
    /// gRPC), disaggregated-grpc.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "aggregated,disaggregated"
    )]
    pub modes: Vec<String>,

    /// The model every node serves (default: the nodes' own, the SmolLM2 GGUF). With a
    /// `dummy:<shape>` model the prompts are random token ids of --prompt-tokens.
    #[arg(long)]
    pub model: Option<String>,

    /// Length of the random prompts used with a dummy model.
    #[arg(long, default_value_t = 512)]
    pub prompt_tokens: usize,

    /// `--device` of the prefill nodes (a GPU build: `cuda:0`).
    #[arg(long)]
    pub prefill_device: Option<String>,

    /// `--device` of the decode node (a GPU build: `cuda:1`); the aggregated mode uses it too.
    #[arg(long)]
    pub decode_device: Option<String>,

    /// Extra flags for every node (e.g. `--kv-cache-mb=20000`), one per use.
    #[arg(long = "node-arg", allow_hyphen_values = true)]
    pub node_args: Vec<String>,

    /// Appends one JSON line per measurement to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

/// What a client saw of one request.
pub(crate) struct Sample {
    pub ids: Vec<u32>,
    pub ttft: f64,
    /// Gaps between consecutive tokens.
    pub gaps: Vec<f64>,
    pub tokens: usize,
    /// `Usage.prompt_tokens_details.cached_tokens`.
    pub cached_tokens: u32,
}

pub fn run(args: ClusterArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: ClusterArgs) -> anyhow::Result<()> {
    let prompts: Vec<Vec<u32>> = match args.model.as_deref().and_then(|m| m.strip_prefix("dummy:"))
    {
        Some(dummy) => {
            let shape = dummy.split(':').next().unwrap_or(dummy);
            let vocab = pd_common::model::ModelConfig::preset(shape)?.vocab_size as u32;
            let mut rng = rand::rngs::StdRng::seed_from_u64(5);
            (0..16)
                .map(|_| {
                    (0..args.prompt_tokens)
                        .map(|_| rng.random_range(0..vocab))
                        .collect()
                })
                .collect()
        }
        None => golden_cases().into_iter().map(|c| c.prompt_ids).collect(),
    };
    let mut json_out = super::JsonLines::open(args.json.as_deref())?;
    // Greedy outputs of the first prompts in each mode: they must not depend on the mode.
    let mut reference: Option<(String, Vec<Vec<u32>>)> = None;
    println!(
        "closed-loop load, {} tokens per request, prompts of {}..{} tokens (load average {})",
        args.max_tokens,
        prompts.iter().map(Vec::len).min().unwrap_or(0),
        prompts.iter().map(Vec::len).max().unwrap_or(0),
        super::load_average()
    );
    println!(
        "{:<14} {:>7} {:>8} {:>11} {:>10} {:>10} {:>10} {:>10}",
        "mode", "clients", "requests", "out tok/s", "TTFT p50", "TTFT p95", "ITL p50", "ITL p95"
    );
    for mode in &args.modes {
        let mut spec = match mode.as_str() {
            "aggregated" => ClusterSpec {
                prefill: 0,
                decode: 1,
                decode_args: vec!["--aggregated".into()],
                ..ClusterSpec::default()
            },
            "disaggregated" => ClusterSpec::default(),
            // KV over gRPC even where both nodes could use NCCL.
            "disaggregated-grpc" => ClusterSpec {
                prefill_args: vec!["--kv-transfer".into(), "grpc".into()],
                decode_args: vec!["--kv-transfer".into(), "grpc".into()],
                ..ClusterSpec::default()
            },
            other => anyhow::bail!(
                "unknown mode {other:?}: aggregated, disaggregated or disaggregated-grpc"
            ),
        };
        spec.model = args.model.as_ref().map(Into::into);
        spec.prefill_args.extend(args.node_args.iter().cloned());
        spec.decode_args.extend(args.node_args.iter().cloned());
        if let Some(d) = &args.prefill_device {
            spec.prefill_args.extend(["--device".into(), d.clone()]);
        }
        if let Some(d) = &args.decode_device {
            spec.decode_args.extend(["--device".into(), d.clone()]);
        }
        let cluster = Cluster::start(spec).await?;
        let client = GenerationClient::connect(cluster.grpc_url()).await?;
        // Warm-up: first-touch of caches and connections is not what we measure.
        one_request(client.clone(), prompts[0].clone(), 4).await?;
        // One request at a time, so that batching cannot change the numerics.
        let mut outputs = Vec::new();
        for p in prompts.iter().take(4) {
            outputs.push(one_request(client.clone(), p.clone(), 32).await?.ids);
        }
        match &reference {
            None => reference = Some((mode.clone(), outputs)),
            Some((first, want)) => {
                let same = want == &outputs;
                println!(
                    "greedy outputs of {} prompts, {mode} vs {first}: {}",
                    want.len(),
                    if same { "identical" } else { "DIFFERENT" }
                );
                json_out.write(&serde_json::json!({"check": "greedy_equal", "mode": mode, "against": first, "identical": same}))?;
            }
        }
        let engines: Vec<String> = cluster.nodes().iter().map(|n| n.metrics_url()).collect();
        for &clients in &args.clients {
            let phases_before = scrape_phases(&engines).await?;
            let started = Instant::now();
            let tasks = (0..clients).map(|c| {
                let client = client.clone();
                let prompts = prompts.clone();
                let (rounds, max_tokens) = (args.rounds, args.max_tokens);
                tokio::spawn(async move {
                    let mut samples = Vec::new();
                    for r in 0..rounds {
                        let prompt = prompts[(c * rounds + r) % prompts.len()].clone();
                        samples.push(one_request(client.clone(), prompt, max_tokens).await?);
                    }
                    anyhow::Ok(samples)
                })
            });
            let mut samples = Vec::new();
            for t in futures::future::join_all(tasks).await {
                samples.extend(t??);
            }
            let wall = started.elapsed().as_secs_f64();
            let phases = scrape_phases(&engines).await?.since(&phases_before);
            let tokens: usize = samples.iter().map(|s| s.tokens).sum();
            let ttft: Vec<f64> = samples.iter().map(|s| s.ttft).collect();
            let gaps: Vec<f64> = samples
                .iter()
                .flat_map(|s| s.gaps.iter().copied())
                .collect();
            println!(
                "{:<14} {:>7} {:>8} {:>11.1} {:>9.0}ms {:>9.0}ms {:>9.1}ms {:>9.1}ms",
                mode,
                clients,
                samples.len(),
                tokens as f64 / wall,
                1e3 * percentile(&ttft, 0.5),
                1e3 * percentile(&ttft, 0.95),
                1e3 * percentile(&gaps, 0.5),
                1e3 * percentile(&gaps, 0.95),
            );
            println!(
                "{:<14} step phases, mean ms per step: {}",
                "",
                phases.summary()
            );
            json_out.write(&serde_json::json!({
                "mode": mode,
                "clients": clients,
                "requests": samples.len(),
                "output_tokens_per_s": tokens as f64 / wall,
                "ttft_p50_ms": 1e3 * percentile(&ttft, 0.5),
                "ttft_p95_ms": 1e3 * percentile(&ttft, 0.95),
                "itl_p50_ms": 1e3 * percentile(&gaps, 0.5),
                "itl_p95_ms": 1e3 * percentile(&gaps, 0.95),
                "step_phases_ms": phases.mean_ms(),
            }))?;
        }
        cluster.shutdown().await?;
    }
    Ok(())
}

pub(crate) async fn one_request(
    mut client: GenerationClient<tonic::transport::Channel>,
    prompt: Vec<u32>,
    max_tokens: u32,
) -> anyhow::Result<Sample> {
    let request = pb::GenerateRequest {
        prompt: Some(pb::generate_request::Prompt::TokenIds(pb::TokenIds {
            ids: prompt,
        })),
        sampling: Some(pb::SamplingParams {
            temperature: Some(0.0),
            max_tokens: Some(max_tokens),
            ignore_eos: true,
            ..Default::default()
        }),
        ..Default::default()
    };
    let started = Instant::now();
    let mut stream = client.generate(request).await?.into_inner();
    let mut last: Option<Instant> = None;
    let mut sample = Sample {
        ids: Vec::new(),
        ttft: 0.0,
        gaps: Vec::new(),
        tokens: 0,
        cached_tokens: 0,
    };
    while let Some(m) = stream.message().await? {
        if !m.token_ids.is_empty() {
            let now = Instant::now();
            match last {
                None => sample.ttft = (now - started).as_secs_f64(),
                Some(prev) => sample.gaps.push((now - prev).as_secs_f64()),
            }
            last = Some(now);
            sample.tokens += m.token_ids.len();
            sample.ids.extend_from_slice(&m.token_ids);
        }
        if let Some(c) = m.completion {
            sample.cached_tokens = c
                .usage
                .and_then(|u| u.prompt_tokens_details)
                .map_or(0, |d| d.cached_tokens);
            return Ok(sample);
        }
    }
    anyhow::bail!(
        "a stream ended without a completion after {:?}",
        Duration::from_secs_f64((Instant::now() - started).as_secs_f64())
    )
}

/// The engines' step-phase histograms (`pd_engine_step_phase_seconds`): per phase, the total
/// seconds and the number of steps, summed over the nodes scraped.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct StepPhases(std::collections::BTreeMap<String, (f64, f64)>);

impl StepPhases {
    /// Reads the `_sum` and `_count` series of a Prometheus text exposition.
    pub fn parse(text: &str) -> Self {
        let mut phases = Self::default();
        phases.add(text);
        phases
    }

    fn add(&mut self, text: &str) {
        let name = pd_engine::telemetry::names::STEP_PHASE_SECONDS;
        for line in text.lines() {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let (is_sum, rest) = if let Some(r) = rest.strip_prefix("_sum{") {
                (true, r)
            } else if let Some(r) = rest.strip_prefix("_count{") {
                (false, r)
            } else {
                continue;
            };
            let Some((labels, value)) = rest.split_once('}') else {
                continue;
            };
            let phase = labels
                .split(',')
                .find_map(|l| l.strip_prefix("phase=\""))
                .map(|p| p.trim_end_matches('"').to_string());
            let (Some(phase), Ok(value)) = (phase, value.trim().parse::<f64>()) else {
                continue;
            };
            let entry = self.0.entry(phase).or_default();
            if is_sum {
                entry.0 += value;
            } else {
                entry.1 += value;
            }
        }
    }

    /// What happened between `before` and now.
    pub fn since(&self, before: &Self) -> Self {
        Self(
            self.0
                .iter()
                .map(|(p, &(s, c))| {
                    let (s0, c0) = before.0.get(p).copied().unwrap_or_default();
                    (p.clone(), (s - s0, c - c0))
                })
                .collect(),
        )
    }

    /// Mean milliseconds per step, by phase.
    pub fn mean_ms(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.0
                .iter()
                .filter(|(_, &(_, c))| c > 0.0)
                .map(|(p, &(s, c))| (p.clone(), serde_json::json!(1e3 * s / c)))
                .collect(),
        )
    }

    /// One line: phases in step order, then the steps counted.
    pub fn summary(&self) -> String {
        let order = pd_engine::engine::phases::Phase::ALL;
        let parts: Vec<String> = order
            .iter()
            .filter_map(|p| {
                let &(s, c) = self.0.get(p.name())?;
                (c > 0.0).then(|| format!("{} {:.3}", p.name(), 1e3 * s / c))
            })
            .collect();
        let steps = self.0.values().map(|&(_, c)| c).fold(0.0, f64::max);
        format!("{} ({steps:.0} steps)", parts.join(", "))
    }
}

async fn scrape_phases(urls: &[String]) -> anyhow::Result<StepPhases> {
    let mut phases = StepPhases::default();
    for url in urls {
        let text = reqwest::get(url).await?.error_for_status()?.text().await?;
        phases.add(&text);
    }
    Ok(phases)
}

pub(crate) fn percentile(xs: &[f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_are_read_from_the_exposition_and_differenced() {
        let before = StepPhases::parse(
            "pd_engine_step_phase_seconds_sum{phase=\"forward\"} 1.5\n\
             pd_engine_step_phase_seconds_count{phase=\"forward\"} 100\n",
        );
        let after = StepPhases::parse(
            "# HELP pd_engine_step_phase_seconds Time of each phase.\n\
             pd_engine_step_phase_seconds_bucket{phase=\"forward\",le=\"0.01\"} 300\n\
             pd_engine_step_phase_seconds_sum{phase=\"forward\"} 3.5\n\
             pd_engine_step_phase_seconds_count{phase=\"forward\"} 300\n\
             pd_engine_step_phase_seconds_sum{node=\"d0\",phase=\"emit\"} 0.2\n\
             pd_engine_step_phase_seconds_count{node=\"d0\",phase=\"emit\"} 200\n",
        );
        let d = after.since(&before);
        let ms = d.mean_ms();
        assert_eq!(ms["forward"], serde_json::json!(10.0));
        assert_eq!(ms["emit"], serde_json::json!(1.0));
        assert_eq!(d.summary(), "forward 10.000, emit 1.000 (200 steps)");
    }
}
