//! `pd-bench gpu`: the GPU path checked, then measured against the device's own ceilings.
//!
//! 1. Ceilings: device-to-device copy bandwidth (bytes read plus written) and the bf16 matmul
//!    rate, measured here rather than taken from a datasheet.
//! 2. Correctness: the paged-attention kernels against the CPU kernel on the same bf16 data, for
//!    random block layouts, GQA ratios, head sizes and contexts up to 8k (decode tokens and
//!    prompt chunks after a cached prefix); greedy tokens of tiny random models on the GPU against
//!    the CPU path (f32 on both: equal; bf16 on the GPU: the length of the common prefix).
//! 3. Speed on a real shape with dummy weights: decode step time at several batch sizes as a
//!    fraction of the bandwidth floor, prefill tokens/s as a fraction of the matmul rate.
//!
//! Writes `gpu-results.json` and `gpu-results.md` into `--out`. Exits non-zero when a check fails.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use pd_common::engine::{EngineConfig, EngineCore, GenerateRequest, KvCacheDtype};
use pd_common::kv::{KvCache, KvCacheSpec};
use pd_common::model::attention::{paged_attention, AttentionMeta, SeqAttention};
use pd_common::model::{self, ForwardBatch, ModelConfig, ModelSource};
use pd_common::sampling::SamplingParams;
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use serde_json::json;

use super::median;
use crate::Runs;

#[derive(clap::Args)]
pub struct GpuArgs {
    /// The GPU: `cuda` or `cuda:N`.
    #[arg(long, default_value = "cuda:0")]
    pub device: String,
    /// Dummy shape of the speed measurements.
    #[arg(long, default_value = "llama3-8b")]
    pub shape: String,
    /// Decode batch sizes.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    pub batches: Vec<usize>,
    /// Context length of every decoding sequence.
    #[arg(long, default_value_t = 2048)]
    pub context: usize,
    /// Prompt lengths of the prefill measurements.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    pub prefill: Vec<usize>,
    /// Timed repetitions of each measurement (after warm-up); the median is reported.
    #[arg(long, default_value_t = 10)]
    pub repeats: usize,
    /// Folder for gpu-results.json and gpu-results.md.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
    /// Only the correctness checks.
    #[arg(long)]
    pub checks_only: bool,
}

pub fn run(args: GpuArgs) -> anyhow::Result<()> {
    let dev = model::open_device(&args.device)?;
    if dev.is_cpu() {
        bail!("pd-bench gpu needs a GPU device");
    }
    let mut report = Report::default();
    let ceilings = measure_ceilings(&dev, args.repeats)?;
    println!(
        "ceilings: copy {:.0} GB/s (read + write), bf16 matmul {:.0} TFLOP/s",
        ceilings.copy_bytes_per_s / 1e9,
        ceilings.matmul_flops / 1e12
    );
    report.json["ceilings"] = json!({
        "copy_read_plus_write_GBps": ceilings.copy_bytes_per_s / 1e9,
        "bf16_matmul_TFLOPs": ceilings.matmul_flops / 1e12,
    });

    let kernel_checks = check_attention(&dev)?;
    let model_checks = check_models(&dev)?;
    let failed = kernel_checks
        .iter()
        .chain(&model_checks)
        .filter(|c| !c.passed)
        .count();
    report.add_checks(&kernel_checks, &model_checks);

    if !args.checks_only {
        let speed = measure_speed(&dev, &args, &ceilings)?;
        report.add_speed(&args, &ceilings, &speed);
    }
    report.write(&args.out)?;
    if failed > 0 {
        bail!("{failed} GPU checks failed");
    }
    Ok(())
}

struct Ceilings {
    copy_bytes_per_s: f64,
    matmul_flops: f64,
}

/// Times `f` (which must end with the device synchronized): warm-up, then the median.
fn time<F: FnMut() -> anyhow::Result<()>>(
    dev: &Device,
    repeats: usize,
    mut f: F,
) -> anyhow::Result<f64> {
    for _ in 0..2 {
        f()?;
    }
    dev.synchronize()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats.max(1) {
        let t = Instant::now();
        f()?;
        dev.synchronize()?;
        times.push(t.elapsed().as_secs_f64());
    }
    Ok(median(times))
}

fn measure_ceilings(dev: &Device, repeats: usize) -> anyhow::Result<Ceilings> {
    // 1 GiB of random bf16 (never zeros), copied device to device into a buffer allocated once.
    let n = 512 * 1024 * 1024;
    let src = Tensor::rand(-1f32, 1., n, dev)?.to_dtype(DType::BF16)?;
    let cuda = dev.as_cuda_device()?;
    let stream = cuda.cuda_stream();
    let mut dst = stream.alloc_zeros::<half::bf16>(n)?;
    let copy = {
        let (storage, _) = src.storage_and_layout();
        let candle_core::Storage::Cuda(s) = &*storage else {
            bail!("expected a CUDA tensor")
        };
        let s = s.as_cuda_slice::<half::bf16>()?;
        time(dev, repeats, || {
            stream.memcpy_dtod(s, &mut dst)?;
            Ok(())
        })?
    };
    let copy_bytes_per_s = 2.0 * (n * 2) as f64 / copy;
    drop(dst);
    drop(src);
    let m = 8192;
    let a = Tensor::rand(-1f32, 1., (m, m), dev)?.to_dtype(DType::BF16)?;
    let b = Tensor::rand(-1f32, 1., (m, m), dev)?.to_dtype(DType::BF16)?;
    let mm = time(dev, repeats, || {
        let _ = a.matmul(&b)?;
        Ok(())
    })?;
    Ok(Ceilings {
        copy_bytes_per_s,
        matmul_flops: 2.0 * (m as f64).powi(3) / mm,
    })
}

struct Check {
    name: String,
    detail: String,
    passed: bool,
}

/// Relative error ‖a − b‖ / ‖b‖, with NaN never passing.
fn rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let e = diff / norm.max(1e-30);
    Ok(if e.is_finite() { e } else { f64::INFINITY })
}

/// The GPU kernels (bf16 query and cache) against the CPU kernel on the same values.
fn check_attention(dev: &Device) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let mut rng = StdRng::seed_from_u64(42);
    // (heads, kv heads, head dim, block size, [(cached, new) per sequence])
    let cases: Vec<(usize, usize, usize, usize, Vec<(usize, usize)>)> = vec![
        (
            32,
            8,
            128,
            16,
            vec![(2047, 1), (0, 1), (511, 1), (512, 1), (8191, 1), (100, 1)],
        ),
        (32, 32, 128, 16, vec![(1023, 1), (4095, 1), (16, 1)]),
        (
            9,
            3,
            64,
            16,
            vec![(0, 300), (1000, 77), (37, 1), (5000, 40)],
        ),
        (
            32,
            8,
            128,
            16,
            vec![(0, 2048), (3000, 513), (7000, 1), (0, 16), (0, 15)],
        ),
        (8, 1, 64, 32, vec![(0, 129), (8000, 191), (999, 1)]),
        (4, 2, 16, 8, vec![(0, 50), (60, 1), (300, 20)]),
        (16, 4, 96, 16, vec![(0, 64), (1500, 1)]),
    ];
    for (h, kvh, d, bs, shapes) in cases {
        let blocks_needed: usize = shapes.iter().map(|(c, n)| (c + n).div_ceil(bs)).sum();
        let num_blocks = blocks_needed + 64;
        let spec = KvCacheSpec {
            num_layers: 1,
            num_kv_heads: kvh,
            head_dim: d,
            block_size: bs,
            num_blocks,
            dtype: DType::BF16,
        };
        let gpu_cache = KvCache::new(spec.clone(), dev)?;
        let cpu_cache = KvCache::new(spec, &Device::Cpu)?;
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        free.shuffle(&mut rng);
        let mut seqs = Vec::new();
        let mut q_start = 0;
        for &(cached, new) in &shapes {
            let ctx = cached + new;
            let table: Vec<u32> = free.drain(..ctx.div_ceil(bs)).collect();
            let k = Tensor::randn(0f32, 1., (ctx, kvh, d), &Device::Cpu)?.to_dtype(DType::BF16)?;
            let v = Tensor::randn(0f32, 1., (ctx, kvh, d), &Device::Cpu)?.to_dtype(DType::BF16)?;
            let slots: Vec<u32> = (0..ctx)
                .map(|j| table[j / bs] * bs as u32 + (j % bs) as u32)
                .collect();
            cpu_cache.write_slots(0, &k, &v, &slots)?;
            gpu_cache.write_slots(0, &k.to_device(dev)?, &v.to_device(dev)?, &slots)?;
            seqs.push(SeqAttention {
                q_start,
                q_len: new,
                context_len: ctx,
                block_table: table,
            });
            q_start += new;
        }
        seqs.shuffle(&mut rng);
        // Re-pack in the shuffled order.
        let mut at = 0;
        for s in &mut seqs {
            s.q_start = at;
            at += s.q_len;
        }
        let q = Tensor::randn(0f32, 1., (at, h, d), &Device::Cpu)?.to_dtype(DType::BF16)?;
        let meta_cpu = Arc::new(AttentionMeta::new(seqs.clone(), bs, h, kvh, d)?);
        let meta_gpu = Arc::new(AttentionMeta::new(seqs.clone(), bs, h, kvh, d)?);
        let (kc, vc) = cpu_cache.layer(0)?;
        let want = paged_attention(&q.to_dtype(DType::F32)?, kc, vc, &meta_cpu)?;
        let (kg, vg) = gpu_cache.layer(0)?;
        let got = paged_attention(&q.to_device(dev)?, kg, vg, &meta_gpu)?;
        dev.synchronize()?;
        // Whole blocks read back from the GPU equal the CPU cache's (the scatter kernel).
        let table = &seqs[0].block_table;
        let (kb_g, _) = gpu_cache.read_blocks(0, table)?;
        let (kb_c, _) = cpu_cache.read_blocks(0, table)?;
        let blocks_equal =
            rel_err(&kb_g.to_dtype(DType::F32)?, &kb_c.to_dtype(DType::F32)?)? == 0.0;
        let mut worst: f64 = 0.0;
        let mut detail = Vec::new();
        for s in &seqs {
            let e = rel_err(
                &got.narrow(0, s.q_start, s.q_len)?.to_dtype(DType::F32)?,
                &want.narrow(0, s.q_start, s.q_len)?,
            )?;
            worst = worst.max(e);
            detail.push(format!("ctx {} q {}: {e:.1e}", s.context_len, s.q_len));
        }
        let passed = worst < 1e-2 && blocks_equal;
        let name = format!("attention h{h} kv{kvh} d{d} bs{bs}");
        println!(
            "{} {name}: worst rel err {worst:.2e}, blocks {} [{}]",
            if passed { "PASS" } else { "FAIL" },
            if blocks_equal { "equal" } else { "DIFFER" },
            detail.join(", ")
        );
        checks.push(Check {
            name,
            detail: format!("worst rel err {worst:.2e}"),
            passed,
        });
    }
    Ok(checks)
}

/// Greedy tokens of tiny random models: the GPU engine against the CPU engine.
fn check_models(dev: &Device) -> anyhow::Result<Vec<Check>> {
    let mut checks = Vec::new();
    let mut rng = StdRng::seed_from_u64(9);
    for shape in ["tiny", "tiny-d64"] {
        let source: ModelSource = format!("dummy:{shape}:3").parse()?;
        let vocab = ModelConfig::preset(shape)?.vocab_size as u32;
        let prompts: Vec<Vec<u32>> = [5usize, 40, 300, 900]
            .iter()
            .map(|&n| (0..n).map(|_| rng.random_range(0..vocab)).collect())
            .collect();
        let cpu = generate(
            &model::load(&source, &Device::Cpu)?.model,
            &prompts,
            KvCacheDtype::F32,
        )?;
        for (dtype, cache) in [
            (DType::F32, KvCacheDtype::F32),
            (DType::BF16, KvCacheDtype::Bf16),
        ] {
            let gpu_model = model::load_as(&source, dev, dtype)?.model;
            let gpu = generate(&gpu_model, &prompts, cache)?;
            let matched: Vec<usize> = cpu
                .iter()
                .zip(&gpu)
                .map(|(a, b)| crate::match_len(a, b))
                .collect();
            let total: usize = cpu.iter().map(Vec::len).sum();
            let equal = matched.iter().sum::<usize>() == total;
            // f32 on both sides must agree token for token; bf16 is reported, not required.
            let passed = dtype != DType::F32 || equal;
            let name = format!("greedy {shape} gpu-{dtype:?} vs cpu-f32");
            println!(
                "{} {name}: common prefix {:?} of {} tokens each",
                if passed { "PASS" } else { "FAIL" },
                matched,
                cpu[0].len()
            );
            checks.push(Check {
                name,
                detail: format!("common prefix {matched:?} of {} each", cpu[0].len()),
                passed,
            });
        }
    }
    Ok(checks)
}

/// 48 greedy tokens for each prompt, all in one engine batch.
fn generate(
    model: &Arc<model::LlamaModel>,
    prompts: &[Vec<u32>],
    kv: KvCacheDtype,
) -> anyhow::Result<Vec<Vec<u32>>> {
    let config = EngineConfig {
        kv_cache_dtype: kv,
        num_blocks: 1024,
        max_batch_tokens: 512,
        ..EngineConfig::default()
    };
    let mut core = EngineCore::new(model.clone(), None, config)?;
    let mut runs = Runs::new();
    for p in prompts {
        runs.add(
            &mut core,
            GenerateRequest {
                prompt_ids: p.clone(),
                params: SamplingParams {
                    temperature: 0.0,
                    max_tokens: 48,
                    ignore_eos: true,
                    ..SamplingParams::default()
                },
                resume_ids: Vec::new(),
            },
        );
    }
    Ok(runs.finish(&mut core).into_iter().map(|r| r.ids).collect())
}

struct Speed {
    weight_bytes: f64,
    kv_bytes_per_token: f64,
    cfg: ModelConfig,
    /// (batch, median step seconds)
    decode: Vec<(usize, f64)>,
    /// (prompt tokens, median seconds)
    prefill: Vec<(usize, f64)>,
}

fn measure_speed(dev: &Device, args: &GpuArgs, ceil: &Ceilings) -> anyhow::Result<Speed> {
    let source: ModelSource = format!("dummy:{}", args.shape).parse()?;
    let t = Instant::now();
    let model = model::load_as(&source, dev, DType::BF16)?.model;
    dev.synchronize()?;
    let cfg = model.config().clone();
    println!(
        "{}: {:.2} B parameters, made on the GPU in {:.1} s",
        cfg.name,
        cfg.num_params() as f64 / 1e9,
        t.elapsed().as_secs_f64()
    );
    let bs = 16;
    let max_batch = args.batches.iter().copied().max().unwrap_or(1);
    let max_prefill = args.prefill.iter().copied().max().unwrap_or(0);
    let per_seq = args.context.div_ceil(bs);
    let num_blocks = (max_batch * per_seq).max(max_prefill.div_ceil(bs)) + 8;
    let spec = KvCacheSpec {
        num_layers: cfg.num_layers,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        block_size: bs,
        num_blocks,
        dtype: DType::BF16,
    };
    let kv_bytes_per_token = (spec.bytes_per_block() / bs) as f64;
    let cache = KvCache::new(spec.clone(), dev)?;
    // Random KV (never time on zeros), written block range by block range.
    let all: Vec<u32> = (0..num_blocks as u32).collect();
    for l in 0..cfg.num_layers {
        for chunk in all.chunks(1024) {
            let shape = (chunk.len(), bs, cfg.num_kv_heads, cfg.head_dim);
            let k = Tensor::rand(-1f32, 1., shape, dev)?.to_dtype(DType::BF16)?;
            let v = Tensor::rand(-1f32, 1., shape, dev)?.to_dtype(DType::BF16)?;
            cache.write_blocks(l, chunk, &k, &v)?;
        }
    }
    dev.synchronize()?;
    let mut rng = StdRng::seed_from_u64(1);
    let vocab = cfg.vocab_size as u32;
    let mut decode = Vec::new();
    for &b in &args.batches {
        let mut batch = ForwardBatch::default();
        for i in 0..b {
            let table = &all[i * per_seq..(i + 1) * per_seq];
            batch.push_seq(&[rng.random_range(0..vocab)], args.context - 1, table, true);
        }
        let step = time(dev, args.repeats, || {
            let logits = model.forward(&batch, &cache, &mut |_| Ok(()))?;
            let _ = logits.argmax(1)?.to_vec1::<u32>()?;
            Ok(())
        })?;
        let floor = (weight_bytes(&cfg) + b as f64 * args.context as f64 * kv_bytes_per_token)
            / ceil.copy_bytes_per_s;
        println!(
            "decode batch {b:>3} ctx {}: step {:.2} ms, floor {:.2} ms ({:.0}% of the floor), {:.0} tok/s",
            args.context,
            step * 1e3,
            floor * 1e3,
            100.0 * floor / step,
            b as f64 / step
        );
        decode.push((b, step));
    }
    let mut prefill = Vec::new();
    for &n in &args.prefill {
        let ids: Vec<u32> = (0..n).map(|_| rng.random_range(0..vocab)).collect();
        let mut batch = ForwardBatch::default();
        batch.push_seq(&ids, 0, &all[..n.div_ceil(bs)], true);
        let secs = time(dev, args.repeats.min(5), || {
            let logits = model.forward(&batch, &cache, &mut |_| Ok(()))?;
            let _ = logits.argmax(1)?.to_vec1::<u32>()?;
            Ok(())
        })?;
        let flops = prefill_flops(&cfg, n);
        println!(
            "prefill {n:>5} tokens: {:.1} ms, {:.0} tok/s, {:.0} TFLOP/s ({:.0}% of the matmul rate)",
            secs * 1e3,
            n as f64 / secs,
            flops / secs / 1e12,
            100.0 * flops / secs / ceil.matmul_flops
        );
        prefill.push((n, secs));
    }
    Ok(Speed {
        weight_bytes: weight_bytes(&cfg),
        kv_bytes_per_token,
        cfg,
        decode,
        prefill,
    })
}

/// Weights read by one decode step: every matrix once, in bf16 (the embedding lookup reads only
/// a few rows; an untied head is read whole).
fn weight_bytes(cfg: &ModelConfig) -> f64 {
    (matmul_params(cfg) * 2) as f64
}

/// Parameters that take part in matmuls: all layers' and the LM head.
fn matmul_params(cfg: &ModelConfig) -> usize {
    let embed_only = if cfg.tie_word_embeddings {
        0
    } else {
        cfg.vocab_size * cfg.hidden_size
    };
    cfg.num_params() - embed_only - cfg.hidden_size * (1 + 2 * cfg.num_layers)
}

/// Prefill FLOPs of one sequence of `n` tokens: the layers' matmuls for every token, causal
/// attention (QK^T and PV over the lower triangle), the LM head for the last token only.
fn prefill_flops(cfg: &ModelConfig, n: usize) -> f64 {
    let head = (cfg.vocab_size * cfg.hidden_size) as f64;
    let layers = matmul_params(cfg) as f64 - head;
    let attn = 2.0
        * 2.0
        * (n * (n + 1) / 2) as f64
        * (cfg.num_heads * cfg.head_dim) as f64
        * cfg.num_layers as f64;
    2.0 * layers * n as f64 + attn + 2.0 * head
}

#[derive(Default)]
struct Report {
    json: serde_json::Value,
    md: Vec<String>,
}

impl Report {
    fn add_checks(&mut self, kernels: &[Check], models: &[Check]) {
        let rows = |cs: &[Check]| -> Vec<serde_json::Value> {
            cs.iter()
                .map(|c| json!({"name": c.name, "passed": c.passed, "detail": c.detail}))
                .collect()
        };
        self.json["checks"] = json!({"attention": rows(kernels), "greedy": rows(models)});
        self.md
            .push("## Checks\n\n| check | result | detail |\n| --- | --- | --- |".into());
        for c in kernels.iter().chain(models) {
            self.md.push(format!(
                "| {} | {} | {} |",
                c.name,
                if c.passed { "pass" } else { "FAIL" },
                c.detail
            ));
        }
    }

    fn add_speed(&mut self, args: &GpuArgs, ceil: &Ceilings, s: &Speed) {
        let mut decode = Vec::new();
        self.md.push(format!(
            "\n## Decode, dummy {} in bf16, context {}\n\n| batch | step ms | floor ms | of floor | tok/s |\n| ---: | ---: | ---: | ---: | ---: |",
            args.shape, args.context
        ));
        for &(b, step) in &s.decode {
            let floor = (s.weight_bytes + b as f64 * args.context as f64 * s.kv_bytes_per_token)
                / ceil.copy_bytes_per_s;
            decode.push(json!({"batch": b, "step_ms": step * 1e3, "floor_ms": floor * 1e3, "fraction_of_floor": floor / step, "tokens_per_s": b as f64 / step}));
            self.md.push(format!(
                "| {b} | {:.2} | {:.2} | {:.0}% | {:.0} |",
                step * 1e3,
                floor * 1e3,
                100.0 * floor / step,
                b as f64 / step
            ));
        }
        let mut prefill = Vec::new();
        self.md.push(format!(
            "\n## Prefill, dummy {} in bf16\n\n| tokens | ms | tok/s | TFLOP/s | of matmul rate |\n| ---: | ---: | ---: | ---: | ---: |",
            args.shape
        ));
        for &(n, secs) in &s.prefill {
            let flops = prefill_flops(&s.cfg, n);
            prefill.push(json!({"tokens": n, "ms": secs * 1e3, "tokens_per_s": n as f64 / secs, "tflops": flops / secs / 1e12, "fraction_of_matmul_rate": flops / secs / ceil.matmul_flops}));
            self.md.push(format!(
                "| {n} | {:.1} | {:.0} | {:.0} | {:.0}% |",
                secs * 1e3,
                n as f64 / secs,
                flops / secs / 1e12,
                100.0 * flops / secs / ceil.matmul_flops
            ));
        }
        self.json["decode"] = json!(decode);
        self.json["prefill"] = json!(prefill);
        self.json["shape"] = json!(args.shape);
        self.json["weight_bytes"] = json!(s.weight_bytes);
        self.json["kv_bytes_per_token"] = json!(s.kv_bytes_per_token);
    }

    fn write(&mut self, dir: &std::path::Path) -> anyhow::Result<()> {
        let date = std::env::var("PD_BENCH_DATE").unwrap_or_default();
        let device = std::env::var("PD_BENCH_DEVICE").unwrap_or_default();
        self.json["date"] = json!(date);
        self.json["device"] = json!(device);
        std::fs::create_dir_all(dir)?;
        let json_path = dir.join("gpu-results.json");
        std::fs::write(&json_path, serde_json::to_string_pretty(&self.json)?)
            .with_context(|| format!("writing {}", json_path.display()))?;
        let ceil = &self.json["ceilings"];
        let mut md = vec![
            format!("# GPU results: {device}, {date}\n"),
            format!(
                "Measured ceilings: device copy {:.0} GB/s (read + write), bf16 matmul {:.0} TFLOP/s.\n",
                ceil["copy_read_plus_write_GBps"].as_f64().unwrap_or(0.0),
                ceil["bf16_matmul_TFLOPs"].as_f64().unwrap_or(0.0)
            ),
        ];
        md.extend(self.md.iter().cloned());
        std::fs::write(dir.join("gpu-results.md"), md.join("\n") + "\n")?;
        Ok(())
    }
}
