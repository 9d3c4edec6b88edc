//! `pd-bench profile`: measures what one engine costs on this machine (prefill by prompt
//! length, decode by batch and context, a step beside another busy engine on the same cores,
//! KV over gRPC) and fits a [`Profile`] to it, or turns a GPU results file into one.

use std::collections::BTreeMap;
use std::time::Instant;

use super::profile::{decode_base, fit_decode, fit_line, fit_prefill, Link, Profile};

#[derive(clap::Args, Clone, Debug)]
pub struct ProfileArgs {
    /// Where the profile is written.
    #[arg(long, default_value = "profile-cpu.json")]
    pub output: std::path::PathBuf,

    /// Instead of measuring: turn a `pd-bench gpu` results file into a GPU profile.
    #[arg(long)]
    pub from_gpu_results: Option<std::path::PathBuf>,

    /// KV link of a GPU profile: bandwidth, GB/s. The default is the line through the two
    /// NCCL transfers measured between two H200s of one host (67 MB in 3.22 ms, 537 MB in
    /// 3.79 ms, `deploy/gpu/results/2026-11-22-h200x2.md`).
    #[arg(long, default_value_t = 824.0)]
    pub gpu_link_gbps: f64,

    /// KV link of a GPU profile: fixed cost per transfer, ms (see --gpu-link-gbps).
    #[arg(long, default_value_t = 3.139)]
    pub gpu_link_latency_ms: f64,

    /// Prompt lengths of the prefill measurements.
    #[arg(long, value_delimiter = ',', default_value = "32,128,256,512")]
    pub prefill_tokens: Vec<usize>,

    /// Batch sizes of the decode measurements.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8,16")]
    pub batches: Vec<usize>,

    /// Context per sequence of the decode measurements.
    #[arg(long, value_delimiter = ',', default_value = "64,320")]
    pub contexts: Vec<usize>,

    /// The engine measured (defaults as every node's).
    #[command(flatten)]
    pub engine: pd_common::engine::EngineConfig,
}

pub fn run(args: ProfileArgs) -> anyhow::Result<()> {
    let profile = match &args.from_gpu_results {
        Some(path) => {
            let text = std::fs::read_to_string(path)?;
            let results: serde_json::Value = serde_json::from_str(&text)?;
            Profile::from_gpu_results(
                &results,
                Link {
                    latency_s: args.gpu_link_latency_ms / 1e3,
                    bytes_per_s: args.gpu_link_gbps * 1e9,
                },
            )?
        }
        None => measure_cpu(&args)?,
    };
    print_profile(&profile);
    std::fs::write(&args.output, serde_json::to_string_pretty(&profile)?)?;
    println!("profile written to {}", args.output.display());
    Ok(())
}

pub fn print_profile(p: &Profile) {
    println!("profile of {} on {} ({})", p.model, p.device, p.date);
    println!(
        "prefill step  = {:.3} ms + {:.4} ms/token + {:.3e} ms/token pair",
        p.prefill.a * 1e3,
        p.prefill.b * 1e3,
        p.prefill.c * 1e3
    );
    for pt in &p.prefill_points {
        println!(
            "  {:>6} tokens: measured {:>8.2} ms, fitted {:>8.2} ms",
            pt[0],
            pt[1] * 1e3,
            (p.prefill.a + p.prefill_work(&[(0, pt[0] as usize)])) * 1e3
        );
    }
    if p.shared_host {
        println!(
            "a step beside another busy node on the host: {:.2}x as long",
            p.shared_slowdown
        );
    }
    println!(
        "decode step   = {:.3} ms + {:.4} ms/sequence + {:.3e} ms/context token",
        p.decode.a * 1e3,
        p.decode.b * 1e3,
        p.decode.c * 1e3
    );
    for pt in &p.decode_points {
        println!(
            "  batch {:>4}, context {:>7}: measured {:>7.2} ms, fitted {:>7.2} ms",
            pt[0],
            pt[1],
            pt[2] * 1e3,
            (p.decode.a + p.decode_work(pt[0] as usize, pt[1] as usize)) * 1e3
        );
    }
    for (name, l) in &p.transfer {
        println!(
            "transfer {name}: {:.3} ms + {:.2} GB/s",
            l.latency_s * 1e3,
            l.bytes_per_s / 1e9
        );
    }
}

fn measure_cpu(args: &ProfileArgs) -> anyhow::Result<Profile> {
    use pd_common::engine::{EngineConfig, GenerateRequest, SeqEvent};
    use pd_common::sampling::SamplingParams;
    let loaded = crate::real_model();
    let config = loaded.model.config().clone();
    let vocab = config.vocab_size as u64;
    let prompt = |len: usize, salt: u64| -> Vec<u32> {
        (0..len as u64)
            .map(|i| {
                (300 + pd_common::sampling::splitmix64(salt * 1_000_003 + i) % (vocab - 300)) as u32
            })
            .collect()
    };
    let params = |max_tokens| SamplingParams {
        temperature: 0.0,
        max_tokens,
        ignore_eos: true,
        ..SamplingParams::default()
    };
    let new_core = |max_batch_tokens: usize| {
        pd_common::engine::EngineCore::new(
            loaded.model.clone(),
            loaded.tokenizer.clone(),
            EngineConfig {
                max_batch_tokens,
                enable_prefix_caching: false,
                ..args.engine.clone()
            },
        )
    };
    println!(
        "measuring prefill (load average {})",
        crate::bench::load_average()
    );
    // One engine for every prefill measurement, warmed first, as a node's is: a fresh
    // engine's first steps also pay for touching its cache's memory.
    let longest = args.prefill_tokens.iter().copied().max().unwrap_or(1);
    let mut core = new_core(longest.max(args.engine.max_batch_tokens))?;
    let mut prefill_once = |n: usize, salt: u64| -> anyhow::Result<f64> {
        let request = GenerateRequest {
            prompt_ids: prompt(n, salt),
            params: params(1),
            ..Default::default()
        };
        crate::bench::time_request(&mut core, request)
    };
    prefill_once(longest, 99)?;
    let mut prefill_points = Vec::new();
    for &n in &args.prefill_tokens {
        let mut times = Vec::new();
        for rep in 0..5u64 {
            times.push(prefill_once(n, 100 + rep)?);
        }
        prefill_points.push([n as f64, crate::bench::median(times)]);
    }
    println!("measuring decode");
    let mut decode_points = Vec::new();
    for &ctx in &args.contexts {
        for &batch in &args.batches {
            let mut core = new_core(args.engine.max_batch_tokens)?;
            let steps = 24usize;
            let mut streams = Vec::new();
            for i in 0..batch {
                let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                core.add_request(
                    GenerateRequest {
                        prompt_ids: prompt(ctx, 1000 + i as u64),
                        params: params(steps as u32 + 4),
                        ..Default::default()
                    },
                    tx,
                )?;
                streams.push(rx);
            }
            let mut first = vec![false; batch];
            // Until every sequence has its first token: prefill is not what is timed.
            while !first.iter().all(|&f| f) {
                core.step()?;
                for (i, rx) in streams.iter_mut().enumerate() {
                    while let Ok(ev) = rx.try_recv() {
                        match ev {
                            SeqEvent::Token(_) => first[i] = true,
                            SeqEvent::Failed(e) => return Err(e.into()),
                            SeqEvent::Finished(_) => {}
                        }
                    }
                }
            }
            // The median of three windows of a third of the steps: one slow moment of a shared
            // machine does not become the figure.
            let mut windows = Vec::new();
            for _ in 0..3 {
                let t = Instant::now();
                for _ in 0..steps / 3 {
                    core.step()?;
                }
                windows.push(t.elapsed().as_secs_f64() / (steps / 3) as f64);
            }
            let per_step = crate::bench::median(windows);
            // Context held during the timed steps, on average.
            let held = batch * (ctx + 1 + steps / 2);
            decode_points.push([batch as f64, held as f64, per_step]);
        }
    }
    println!("measuring a decode step beside a busy engine on the same host");
    let shared_slowdown = measure_contention(|| {
        let mut core = new_core(args.engine.max_batch_tokens)?;
        let mut streams = Vec::new();
        for i in 0..4u64 {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            core.add_request(
                GenerateRequest {
                    prompt_ids: prompt(64, 5000 + i),
                    params: params(40),
                    ..Default::default()
                },
                tx,
            )?;
            streams.push(rx);
        }
        for _ in 0..4 {
            core.step()?; // the prompts and the first decode steps
        }
        let t = Instant::now();
        for _ in 0..24 {
            core.step()?;
        }
        Ok(t.elapsed().as_secs_f64() / 24.0)
    })?;
    println!("measuring KV over gRPC");
    let kv_spec_bytes = 2 * 2 * config.num_layers * config.num_kv_heads * config.head_dim;
    let runtime = tokio::runtime::Runtime::new()?;
    let mut link_points = Vec::new();
    for tokens in [128usize, 1024] {
        let (bytes, secs) =
            runtime.block_on(crate::bench::transfer::grpc_seconds(&config, tokens, 3))?;
        link_points.push((bytes as f64, secs));
    }
    let (latency, per_byte) = fit_line(&link_points);
    let decode = fit_decode(&decode_points);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    Ok(Profile {
        device: format!("CPU, {threads} threads"),
        model: pd_common::model::default_model_path()
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().to_string()),
        date: chrono::Local::now().format("%Y-%m-%d").to_string(),
        prefill: fit_prefill(&prefill_points),
        prefill_points,
        decode_base: decode_base(&decode_points, &decode),
        decode,
        decode_points,
        kv_bytes_per_token: kv_spec_bytes as f64,
        transfer: BTreeMap::from([(
            "grpc".to_string(),
            Link {
                latency_s: latency.max(0.0),
                bytes_per_s: if per_byte > 0.0 {
                    1.0 / per_byte
                } else {
                    f64::INFINITY
                },
            },
        )]),
        shared_host: true,
        shared_slowdown,
        max_batch_tokens: args.engine.max_batch_tokens,
        max_num_seqs: args.engine.max_num_seqs,
    })
}

/// `time_step()` while another engine process (`pd-bench engine`, prefilling and decoding
/// without pause) runs on the same cores, over its time alone.
fn measure_contention(time_step: impl Fn() -> anyhow::Result<f64>) -> anyhow::Result<f64> {
    use std::io::BufRead;
    let alone = time_step()?;
    let mut busy = std::process::Command::new(std::env::current_exe()?)
        .args(["engine", "--repeats", "1000", "--concurrency", "16"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    // Its first line comes once its model is loaded; from then on it computes.
    let mut line = String::new();
    if let Some(out) = busy.stdout.take() {
        std::io::BufReader::new(out).read_line(&mut line)?;
    }
    let beside = time_step();
    let _ = busy.kill();
    let _ = busy.wait();
    Ok((beside? / alone).max(1.0))
}
