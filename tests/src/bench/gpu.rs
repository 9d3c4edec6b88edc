//! `pd-bench gpu`: the GPU path measured against the device's own ceilings. (Its correctness is
//! checked before, by pd-engine's device tests: `cargo test -p pd-engine --features cuda`.)
//!
//! 1. Ceilings: device-to-device copy bandwidth (bytes read plus written) and the bf16 matmul
//!    rate at 8192³ through cuBLASLt (the fastest library path; candle's own matmul, which the
//!    model uses, is reported beside it), measured here rather than taken from a datasheet.
//! 2. Speed on a real shape with dummy weights: decode step time at several batch sizes as a
//!    fraction of the bandwidth floor, prefill tokens/s as a fraction of the matmul rate.
//!
//! Writes `gpu-results.json` and `gpu-results.md` into `--out`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use pd_common::kv::{KvCache, KvCacheSpec};
use pd_common::model::{self, ForwardBatch, ModelConfig, ModelSource};
use rand::{rngs::StdRng, Rng, SeedableRng};
use serde_json::json;

use super::median;

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
    /// Kernel sets to time, one after the other on the same model and cache: `mma` (the
    /// default), `mma-s2`/`mma-s3`/`mma-s4` (the mma set with that decode ring depth), any of
    /// these with `-unfused` (without the fused residual-add + RMSNorm and RoPE + KV write) and `wmma`
    /// (the set it replaced; see `pd_engine::cuda::KernelSet`). The first is reported as the
    /// result, the others beside it with their ratios.
    #[arg(long, value_delimiter = ',', default_value = "mma,wmma")]
    pub kernels: Vec<String>,
    /// Folder for gpu-results.json and gpu-results.md.
    #[arg(long, default_value = ".")]
    pub out: PathBuf,
}

pub fn run(args: GpuArgs) -> anyhow::Result<()> {
    let dev = model::open_device(&args.device)?;
    if dev.is_cpu() {
        bail!("pd-bench gpu needs a GPU device");
    }
    let mut report = Report::default();
    let ceilings = measure_ceilings(&dev, args.repeats)?;
    println!(
        "ceilings: copy {:.0} GB/s (read + write), bf16 matmul {:.0} TFLOP/s through cuBLASLt \
         ({:.0} through candle's matmul)",
        ceilings.copy_bytes_per_s / 1e9,
        ceilings.matmul_flops / 1e12,
        ceilings.candle_matmul_flops / 1e12
    );
    report.json["ceilings"] = json!({
        "copy_read_plus_write_GBps": ceilings.copy_bytes_per_s / 1e9,
        "bf16_matmul_TFLOPs": ceilings.matmul_flops / 1e12,
        "bf16_matmul_through": "cuBLASLt",
        "bf16_matmul_candle_TFLOPs": ceilings.candle_matmul_flops / 1e12,
    });

    let speeds = measure_speed(&dev, &args, &ceilings)?;
    for (i, (set, speed)) in speeds.iter().enumerate() {
        report.add_speed(&args, &ceilings, set, speed, i == 0);
    }
    report.compare(&speeds);
    report.write(&args.out)
}

struct Ceilings {
    copy_bytes_per_s: f64,
    /// Through cuBLASLt: the ceiling the fractions are stated against.
    matmul_flops: f64,
    /// Through candle's matmul (cuBLAS's strided-batched GEMM), the path the model takes.
    candle_matmul_flops: f64,
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
    let candle_mm = time(dev, repeats, || {
        let _ = a.matmul(&b)?;
        Ok(())
    })?;
    let lt_mm = {
        use candle_core::cuda_backend::cudarc::cublaslt::{CudaBlasLT, Matmul, MatmulConfig};
        let lt = CudaBlasLT::new(stream.clone())?;
        let mut c = stream.alloc_zeros::<half::bf16>(m * m)?;
        let (sa, _) = a.storage_and_layout();
        let (sb, _) = b.storage_and_layout();
        let (candle_core::Storage::Cuda(sa), candle_core::Storage::Cuda(sb)) = (&*sa, &*sb) else {
            bail!("expected CUDA tensors")
        };
        let (sa, sb) = (
            sa.as_cuda_slice::<half::bf16>()?,
            sb.as_cuda_slice::<half::bf16>()?,
        );
        let n = m as u64;
        let cfg = MatmulConfig {
            transa: false,
            transb: false,
            transc: false,
            m: n,
            n,
            k: n,
            alpha: 1.0,
            lda: m as i64,
            ldb: m as i64,
            beta: 0.0,
            ldc: m as i64,
            stride_a: None,
            stride_b: None,
            stride_c: None,
            stride_bias: None,
            batch_size: None,
        };
        time(dev, repeats, || {
            // SAFETY: A, B and C each hold m * m bf16 elements on this stream's device, which is
            // what a non-transposed m x m x m product with leading dimensions m reads and writes.
            unsafe { lt.matmul(cfg, sa, sb, &mut c, None, None) }?;
            Ok(())
        })?
    };
    let flops = 2.0 * (m as f64).powi(3);
    Ok(Ceilings {
        copy_bytes_per_s,
        matmul_flops: flops / lt_mm,
        candle_matmul_flops: flops / candle_mm,
    })
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

/// Decode and prefill timed with each kernel set of `args.kernels`, on one model and cache.
fn measure_speed(
    dev: &Device,
    args: &GpuArgs,
    ceil: &Ceilings,
) -> anyhow::Result<Vec<(String, Speed)>> {
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
    let vocab = cfg.vocab_size as u32;
    let mut speeds = Vec::new();
    for set in &args.kernels {
        pd_common::cuda::select_kernels(set).map_err(anyhow::Error::msg)?;
        println!("kernels: {set}");
        // The same batches and prompts for every set.
        let mut rng = StdRng::seed_from_u64(1);
        let mut decode = Vec::new();
        for &b in &args.batches {
            let mut batch = ForwardBatch::default();
            for i in 0..b {
                let table = &all[i * per_seq..(i + 1) * per_seq];
                batch.push_seq(&[rng.random_range(0..vocab)], args.context - 1, table, 1);
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
            batch.push_seq(&ids, 0, &all[..n.div_ceil(bs)], 1);
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
        speeds.push((
            set.clone(),
            Speed {
                weight_bytes: weight_bytes(&cfg),
                kv_bytes_per_token,
                cfg: cfg.clone(),
                decode,
                prefill,
            },
        ));
    }
    pd_common::cuda::select_kernels("mma").map_err(anyhow::Error::msg)?;
    Ok(speeds)
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
    /// One kernel set's figures: under `decode` and `prefill` for the reported (first) set, and
    /// under `kernel_sets.<set>` for every set.
    fn add_speed(&mut self, args: &GpuArgs, ceil: &Ceilings, set: &str, s: &Speed, first: bool) {
        let mut decode = Vec::new();
        self.md.push(format!(
            "\n## Decode, dummy {} in bf16, context {}, {set} kernels\n\n| batch | step ms | floor ms | of floor | tok/s |\n| ---: | ---: | ---: | ---: | ---: |",
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
            "\n## Prefill, dummy {} in bf16, {set} kernels\n\n| tokens | ms | tok/s | TFLOP/s | of matmul rate |\n| ---: | ---: | ---: | ---: | ---: |",
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
        self.json["kernel_sets"][set] = json!({"decode": decode, "prefill": prefill});
        if first {
            self.json["kernels"] = json!(set);
            self.json["decode"] = json!(decode);
            self.json["prefill"] = json!(prefill);
        }
        self.json["shape"] = json!(args.shape);
        self.json["weight_bytes"] = json!(s.weight_bytes);
        self.json["kv_bytes_per_token"] = json!(s.kv_bytes_per_token);
    }

    /// Each further set's step and prefill times over the first's, measured in this run.
    fn compare(&mut self, speeds: &[(String, Speed)]) {
        let Some(((base, b), rest)) = speeds.split_first() else {
            return;
        };
        for (set, s) in rest {
            self.md.push(format!(
                "\n## {set} over {base} kernels (time ratio; below 1 is faster)\n\n| measurement | {base} ms | {set} ms | ratio |\n| --- | ---: | ---: | ---: |"
            ));
            let pairs = b
                .decode
                .iter()
                .zip(&s.decode)
                .map(|(x, y)| (format!("decode batch {}", x.0), x.1, y.1))
                .chain(
                    b.prefill
                        .iter()
                        .zip(&s.prefill)
                        .map(|(x, y)| (format!("prefill {} tokens", x.0), x.1, y.1)),
                );
            for (what, x, y) in pairs {
                println!("{set}/{base} {what}: {:.3}", y / x);
                self.md.push(format!(
                    "| {what} | {:.2} | {:.2} | {:.3} |",
                    x * 1e3,
                    y * 1e3,
                    y / x
                ));
            }
        }
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
                "Measured ceilings: device copy {:.0} GB/s (read + write), bf16 matmul 8192³ {:.0} TFLOP/s through cuBLASLt ({:.0} through candle's matmul, the model's path). Fractions of the matmul rate are of the cuBLASLt figure.\n",
                ceil["copy_read_plus_write_GBps"].as_f64().unwrap_or(0.0),
                ceil["bf16_matmul_TFLOPs"].as_f64().unwrap_or(0.0),
                ceil["bf16_matmul_candle_TFLOPs"].as_f64().unwrap_or(0.0)
            ),
        ];
        md.extend(self.md.iter().cloned());
        std::fs::write(dir.join("gpu-results.md"), md.join("\n") + "\n")?;
        Ok(())
    }
}
