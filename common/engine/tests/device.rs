//! The kernels and greedy decoding, checked on every device. Each body takes a device and runs
//! on the CPU always and, in a build with the `cuda` feature, on the first GPU as well (candle's
//! `test_device!` style). A machine with an NVIDIA GPU runs these before it measures anything
//! (deploy/gpu/run.sh).
//!
//! References are independent of the kernels under test: plain attention over contiguous K/V in
//! f32 candle ops on the CPU, the CPU engine for greedy tokens, the values written for the cache.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use pd_engine::engine::{EngineConfig, EngineCore, GenerateRequest, KvCacheDtype, SeqEvent};
use pd_engine::kv::{KvCache, KvCacheSpec};
use pd_engine::model::attention::{paged_attention, AttentionMeta};
use pd_engine::model::{self, ModelConfig, ModelSource, SeqAttention};
use pd_engine::sampling::{sample, sample_rows, RowRequest, SampleContext, SamplingParams};
use rand::{rngs::StdRng, seq::SliceRandom, Rng, SeedableRng};
use tokio::sync::mpsc;

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// One test per device of this build.
macro_rules! device_test {
    ($name:ident) => {
        mod $name {
            #[test]
            fn cpu() -> super::TestResult {
                super::$name(&candle_core::Device::Cpu)
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() -> super::TestResult {
                super::$name(&pd_engine::model::open_device("cuda:0")?)
            }
        }
    };
}

device_test!(paged_attention_equals_plain_attention);
device_test!(kv_blocks_read_back_what_was_written);
device_test!(greedy_tokens_equal_the_cpu_engines);
device_test!(batch_sampling_agrees_with_the_host_sampler);
device_test!(seeded_draws_follow_the_softmax);
device_test!(silu_and_mul_equals_silu_then_mul);
device_test!(fused_layer_steps_equal_the_separate_ops);
device_test!(dense_projections_equal_the_f32_product);

/// The kernel sets a device runs: on a GPU the mma set (default) at each decode ring depth, the
/// mma set without its fused elementwise kernels and the wmma set
/// (`pd_engine::cuda::select_kernels`), each checked against the same references; the CPU has
/// one.
fn kernel_sets(dev: &Device) -> Vec<&'static str> {
    if dev.is_cuda() {
        vec!["mma", "mma-s2", "mma-s3", "mma-s4", "mma-unfused", "wmma"]
    } else {
        // The CPU path has no kernel sets; the name only labels the run.
        vec!["mma"]
    }
}

/// Runs `f` with the kernel set `name` in force (GPU builds), then restores the default.
fn with_kernel_set<T>(name: &str, f: impl FnOnce() -> T) -> T {
    #[cfg(feature = "cuda")]
    {
        use pd_engine::cuda::select_kernels;
        select_kernels(name).expect("a kernel set");
        let out = f();
        select_kernels("mma").expect("the default kernel set");
        out
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = name;
        f()
    }
}

/// The model's dense projections (`x · Wᵀ`, cuBLASLt in the mma set) against the product
/// in f32 on the CPU, for the token counts of a decode step, an odd one and a prefill chunk.
fn dense_projections_equal_the_f32_product(dev: &Device) -> TestResult {
    for set in kernel_sets(dev) {
        for dtype in [DType::BF16, DType::F16, DType::F32] {
            for (m, k, n) in [
                (1, 256, 384),
                (7, 512, 136),
                (64, 1024, 2048),
                (513, 256, 1000),
            ] {
                let x = Tensor::randn(0f32, 1., (m, k), &Device::Cpu)?;
                let w = Tensor::randn(0f32, 1., (n, k), &Device::Cpu)?;
                let want = x
                    .to_dtype(dtype)?
                    .to_dtype(DType::F32)?
                    .matmul(&w.to_dtype(dtype)?.to_dtype(DType::F32)?.t()?)?;
                let got = with_kernel_set(set, || {
                    pd_engine::model::gemm::linear(
                        &x.to_dtype(dtype)?.to_device(dev)?,
                        &w.to_dtype(dtype)?.to_device(dev)?,
                    )
                })?;
                assert_eq!(got.dims(), &[m, n]);
                let e = rel_err(&got, &want)?;
                assert!(
                    e < 1e-2,
                    "{dev:?} {set} {dtype:?} [{m}, {k}] x [{n}, {k}]: rel err {e:.2e}"
                );
            }
        }
    }
    Ok(())
}

/// The fused MLP activation against candle's silu and multiply on the same device, for widths
/// the vector kernel takes and one it does not, in each float type.
fn silu_and_mul_equals_silu_then_mul(dev: &Device) -> TestResult {
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        for width in [8, 12, 4096] {
            let y = (Tensor::randn(0f32, 3., (7, 2 * width), &Device::Cpu)?.to_dtype(dtype)?)
                .to_device(dev)?;
            let got = pd_engine::model::mlp::silu_and_mul(&y)?;
            let want =
                (candle_nn::ops::silu(&y.narrow(1, 0, width)?)? * y.narrow(1, width, width)?)?;
            assert_eq!(got.dims(), want.dims());
            let e = rel_err(&got, &want)?;
            assert!(e < 1e-3, "{dev:?} {dtype:?} width {width}: rel err {e:.2e}");
        }
    }
    Ok(())
}

/// The fused residual-add + RMSNorm and RoPE + KV write (`pd_engine::model::fused`) against
/// the same steps in f32 candle ops on the CPU. In f32 the rotation is bit for bit the CPU's;
/// the CPU itself runs the unfused ops (no fused RoPE there).
fn fused_layer_steps_equal_the_separate_ops(dev: &Device) -> TestResult {
    use pd_engine::model::fused::{add_rms_norm, rope_write_kv, Heads};
    let cpu = &Device::Cpu;
    let mut rng = StdRng::seed_from_u64(7);
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        for (rows, cols) in [(1, 64), (7, 576), (33, 4096)] {
            let x = Tensor::randn(0f32, 1., (rows, cols), cpu)?.to_dtype(dtype)?;
            let y = Tensor::randn(0f32, 1., (rows, cols), cpu)?.to_dtype(dtype)?;
            let w = Tensor::randn(1f32, 0.2, cols, cpu)?.to_dtype(dtype)?;
            let (sum, normed) = add_rms_norm(
                &x.to_device(dev)?,
                &y.to_device(dev)?,
                &w.to_device(dev)?,
                1e-5,
            )?;
            let want_sum = (x.to_dtype(DType::F32)? + y.to_dtype(DType::F32)?)?;
            let ms = (want_sum.sqr()?.mean_keepdim(1)? + 1e-5)?.sqrt()?;
            let want_norm = want_sum
                .broadcast_div(&ms)?
                .broadcast_mul(&w.to_dtype(DType::F32)?)?;
            let e = rel_err(&sum, &want_sum)?;
            assert!(
                e < tol,
                "{dev:?} {dtype:?} {rows}x{cols}: sum rel err {e:.2e}"
            );
            let e = rel_err(&normed, &want_norm)?;
            assert!(
                e < tol,
                "{dev:?} {dtype:?} {rows}x{cols}: norm rel err {e:.2e}"
            );
        }
        // Llama-3's head layout (GQA 4), and an odd small one; both RoPE styles.
        for (h, kvh, d, interleaved) in [(32, 8, 128, false), (6, 2, 64, true), (4, 4, 16, false)] {
            let (n, bs, blocks) = (9, 4, 8);
            let qkv = Tensor::randn(0f32, 1., (n, (h + 2 * kvh) * d), cpu)?.to_dtype(dtype)?;
            let angles: Vec<f32> = (0..n * d / 2).map(|_| rng.random_range(0.0..6.3)).collect();
            let ang = Tensor::from_vec(angles, (n, 1, d / 2), cpu)?;
            let (cos, sin) = (ang.cos()?.to_dtype(dtype)?, ang.sin()?.to_dtype(dtype)?);
            let spec = KvCacheSpec {
                num_layers: 1,
                num_kv_heads: kvh,
                head_dim: d,
                block_size: bs,
                num_blocks: blocks,
                dtype,
            };
            let cache = KvCache::new(spec, dev)?;
            let mut slots: Vec<u32> = (0..(bs * blocks) as u32).collect();
            slots.shuffle(&mut rng);
            slots.truncate(n);
            let map = cache.slot_map(&slots)?;
            let heads = Heads {
                num_heads: h,
                num_kv_heads: kvh,
                head_dim: d,
                interleaved,
            };
            let got = rope_write_kv(
                &qkv.to_device(dev)?,
                &cos.to_device(dev)?,
                &sin.to_device(dev)?,
                &cache,
                0,
                &map,
                heads,
            )?;
            let Some(q) = got else {
                assert!(
                    dev.is_cpu(),
                    "{dev:?}: no fused RoPE for {dtype:?} h {h} d {d}"
                );
                continue;
            };
            let rope = |t: Tensor, heads: usize| -> candle_core::Result<Tensor> {
                let t = t
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .reshape((n, heads, 1, d))?;
                let (c, s) = (cos.to_dtype(DType::F32)?, sin.to_dtype(DType::F32)?);
                let r = if interleaved {
                    candle_nn::rotary_emb::rope_i(&t, &c, &s)?
                } else {
                    candle_nn::rotary_emb::rope(&t, &c, &s)?
                };
                r.reshape((n, heads, d))
            };
            let want_q = rope(qkv.narrow(1, 0, h * d)?, h)?;
            let want_k = rope(qkv.narrow(1, h * d, kvh * d)?, kvh)?;
            let want_v = qkv
                .narrow(1, (h + kvh) * d, kvh * d)?
                .reshape((n, kvh, d))?;
            let (kc, vc) = cache.layer(0)?;
            let at = Tensor::new(slots.as_slice(), dev)?;
            let rows = |c: &Tensor| -> candle_core::Result<Tensor> {
                c.reshape((bs * blocks, kvh, d))?.index_select(&at, 0)
            };
            let (got_k, got_v) = (rows(kc)?, rows(vc)?);
            let label =
                format!("{dev:?} {dtype:?} h {h} kvh {kvh} d {d} interleaved {interleaved}");
            assert_eq!(q.dims(), [n, h, d], "{label}");
            if dtype == DType::F32 {
                let flat = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
                    t.to_device(cpu)?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1()
                };
                assert_eq!(flat(&q)?, flat(&want_q)?, "{label}: q");
                assert_eq!(flat(&got_k)?, flat(&want_k)?, "{label}: k");
            } else {
                for (name, a, b) in [("q", &q, &want_q), ("k", &got_k, &want_k)] {
                    let e = rel_err(a, b)?;
                    assert!(e < tol, "{label}: {name} rel err {e:.2e}");
                }
            }
            assert_eq!(
                got_v
                    .to_device(cpu)?
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
                want_v
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?,
                "{label}: v"
            );
        }
    }
    Ok(())
}

/// Relative error ‖a − b‖ / ‖b‖ on the CPU in f64; NaN never passes.
fn rel_err(a: &Tensor, b: &Tensor) -> candle_core::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?;
    let diff = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let norm = b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let e = diff / norm.max(1e-30);
    Ok(if e.is_finite() { e } else { f64::INFINITY })
}

/// Causal attention of `q` (`[n, h, d]`, at positions `start..start + n`) over contiguous
/// `k`, `v` (`[ctx, kv_heads, d]`), in f32 on the CPU.
fn plain_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    start: usize,
) -> candle_core::Result<Tensor> {
    let (n, h, d) = q.dims3()?;
    let (ctx, kvh, _) = k.dims3()?;
    let group = h / kvh;
    let expand = |t: &Tensor| -> candle_core::Result<Tensor> {
        t.to_dtype(DType::F32)?
            .unsqueeze(2)?
            .repeat((1, 1, group, 1))?
            .reshape((ctx, h, d))?
            .transpose(0, 1)?
            .contiguous()
    };
    let (k, v) = (expand(k)?, expand(v)?);
    let q = q.to_dtype(DType::F32)?.transpose(0, 1)?.contiguous()?;
    let scores = (q.matmul(&k.t()?.contiguous()?)? / (d as f64).sqrt())?;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| {
            (0..ctx).map(move |j| {
                if j <= start + i {
                    0.
                } else {
                    f32::NEG_INFINITY
                }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (1, n, ctx), &Device::Cpu)?;
    let p = candle_nn::ops::softmax(&scores.broadcast_add(&mask)?, D::Minus1)?;
    p.matmul(&v)?.transpose(0, 1)
}

/// (heads, kv heads, head dim, block size, [(cached, new) per sequence])
type AttentionCase = (usize, usize, usize, usize, Vec<(usize, usize)>);

/// Random block layouts, GQA ratios 1:1 to 16:1, head sizes 16 to 128, block sizes 8 to 32,
/// decode tokens after contexts up to 8k and prompt chunks after cached prefixes, all packed in
/// one batch in shuffled order. A bf16 cache on both devices; the GPU gets a bf16 query too.
fn paged_attention_equals_plain_attention(dev: &Device) -> TestResult {
    let mut rng = StdRng::seed_from_u64(42);
    let mut cases: Vec<AttentionCase> = vec![
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
        (8, 1, 64, 32, vec![(0, 129), (8000, 191), (999, 1)]),
        (4, 2, 16, 8, vec![(0, 50), (60, 1), (300, 20)]),
        (16, 4, 96, 16, vec![(0, 64), (1500, 1)]),
        // The grouped decode kernel's other head and group sizes, and a block size that is not
        // a power of two.
        (16, 8, 256, 16, vec![(1500, 1), (3, 1), (0, 5)]),
        (8, 8, 64, 16, vec![(700, 1), (31, 2)]),
        (32, 8, 128, 12, vec![(999, 1), (40, 1), (0, 9)]),
        // Groups of 9 to 16 query heads: the second row half of the tensor-core decode
        // kernel's query fragment.
        (32, 2, 128, 16, vec![(2047, 1), (0, 1), (600, 1)]),
        (24, 2, 64, 16, vec![(1300, 1), (17, 1), (0, 33)]),
    ];
    if dev.is_cuda() {
        // Long prompt chunks: the tiled tensor-core kernel's territory (minutes on the CPU).
        cases.push((
            32,
            8,
            128,
            16,
            vec![(0, 2048), (3000, 513), (7000, 1), (0, 16), (0, 15)],
        ));
    }
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
        let cache = KvCache::new(spec, dev)?;
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        free.shuffle(&mut rng);
        let mut seqs = Vec::new();
        let mut contexts = Vec::new();
        for &(cached, new) in &shapes {
            let ctx = cached + new;
            let table: Vec<u32> = free.drain(..ctx.div_ceil(bs)).collect();
            let k = Tensor::randn(0f32, 1., (ctx, kvh, d), &Device::Cpu)?.to_dtype(DType::BF16)?;
            let v = Tensor::randn(0f32, 1., (ctx, kvh, d), &Device::Cpu)?.to_dtype(DType::BF16)?;
            let slots: Vec<u32> = (0..ctx)
                .map(|j| table[j / bs] * bs as u32 + (j % bs) as u32)
                .collect();
            cache.write_slots(0, &k.to_device(dev)?, &v.to_device(dev)?, &slots)?;
            seqs.push(SeqAttention {
                q_start: 0,
                q_len: new,
                context_len: ctx,
                block_table: table,
            });
            contexts.push((k, v, cached));
        }
        let mut order: Vec<usize> = (0..seqs.len()).collect();
        order.shuffle(&mut rng);
        let mut packed = Vec::new();
        let mut at = 0;
        for &i in &order {
            seqs[i].q_start = at;
            at += seqs[i].q_len;
            packed.push(seqs[i].clone());
        }
        let q = Tensor::randn(0f32, 1., (at, h, d), &Device::Cpu)?.to_dtype(DType::BF16)?;
        // The GPU has kernels for a bf16 and an f32 query; the CPU computes in f32.
        let query_dtypes: &[DType] = if dev.is_cuda() {
            &[DType::BF16, DType::F32]
        } else {
            &[DType::F32]
        };
        let (kc, vc) = cache.layer(0)?;
        for (set, &qdt) in kernel_sets(dev)
            .into_iter()
            .flat_map(|set| query_dtypes.iter().map(move |q| (set, q)))
        {
            // Fresh metadata: what the device keeps of it depends on which kernels apply.
            let meta = Arc::new(AttentionMeta::new(packed.clone(), bs, h, kvh, d)?);
            let q_dev = q.to_dtype(qdt)?.to_device(dev)?;
            let got = with_kernel_set(set, || paged_attention(&q_dev, kc, vc, &meta))?;
            for &i in &order {
                let s = &seqs[i];
                let (k, v, cached) = &contexts[i];
                let want = plain_attention(&q.narrow(0, s.q_start, s.q_len)?, k, v, *cached)?;
                let e = rel_err(&got.narrow(0, s.q_start, s.q_len)?, &want)?;
                assert!(
                    e < 1e-2,
                    "{dev:?} {set} kernels, {qdt:?} query, h{h} kv{kvh} d{d} bs{bs}, context {} with {} new: rel err {e:.2e}",
                    s.context_len,
                    s.q_len
                );
            }
        }
    }
    Ok(())
}

/// Token rows scattered into slots, and whole blocks gathered and written back (what a KV
/// transfer does), read back exactly.
fn kv_blocks_read_back_what_was_written(dev: &Device) -> TestResult {
    let mut rng = StdRng::seed_from_u64(5);
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        let spec = KvCacheSpec {
            num_layers: 2,
            num_kv_heads: 3,
            head_dim: 64,
            block_size: 16,
            num_blocks: 64,
            dtype,
        };
        let cache = KvCache::new(spec.clone(), dev)?;
        let mut ids: Vec<u32> = (0..64).collect();
        ids.shuffle(&mut rng);
        let (src, dst) = (ids[..10].to_vec(), ids[10..20].to_vec());
        let tokens = src.len() * spec.block_size;
        let k = Tensor::randn(0f32, 1., (tokens, 3, 64), dev)?.to_dtype(dtype)?;
        let v = Tensor::randn(0f32, 1., (tokens, 3, 64), dev)?.to_dtype(dtype)?;
        let slots: Vec<u32> = (0..tokens)
            .map(|j| src[j / 16] * 16 + (j % 16) as u32)
            .collect();
        cache.write_slots(1, &k, &v, &slots)?;
        let (kb, vb) = cache.read_blocks(1, &src)?;
        let shape = (src.len(), 16, 3, 64);
        assert_eq!(
            rel_err(&kb, &k.reshape(shape)?)?,
            0.0,
            "{dev:?} {dtype:?} keys"
        );
        assert_eq!(
            rel_err(&vb, &v.reshape(shape)?)?,
            0.0,
            "{dev:?} {dtype:?} values"
        );
        cache.write_blocks(0, &dst, &kb, &vb)?;
        let (k2, v2) = cache.read_blocks(0, &dst)?;
        assert_eq!(rel_err(&k2, &kb)?, 0.0, "{dev:?} {dtype:?} block copy");
        assert_eq!(rel_err(&v2, &vb)?, 0.0, "{dev:?} {dtype:?} block copy");
        // The rest of layer 0 is untouched (zeros from creation).
        let (rest, _) = cache.read_blocks(0, &ids[20..])?;
        let total = rest
            .to_dtype(DType::F32)?
            .abs()?
            .sum_all()?
            .to_scalar::<f32>()?;
        assert_eq!(total, 0.0, "{dev:?} {dtype:?}: a write strayed");
    }
    Ok(())
}

/// Greedy tokens of tiny random models in f32 on `dev`, all prompts in one batch, with each
/// kernel set, equal to the CPU engine's with each prompt alone.
fn greedy_tokens_equal_the_cpu_engines(dev: &Device) -> TestResult {
    let mut rng = StdRng::seed_from_u64(9);
    for shape in ["tiny", "tiny-d64"] {
        let source: ModelSource = format!("dummy:{shape}:3").parse()?;
        let vocab = ModelConfig::preset(shape)?.vocab_size as u32;
        let prompts: Vec<Vec<u32>> = [5usize, 40, 300, 900]
            .iter()
            .map(|&n| (0..n).map(|_| rng.random_range(0..vocab)).collect())
            .collect();
        let cpu_model = model::load(&source, &Device::Cpu)?.model;
        let want: Vec<Vec<u32>> = prompts
            .iter()
            .map(|p| generate(&cpu_model, std::slice::from_ref(p)).map(|mut g| g.remove(0)))
            .collect::<Result<_, _>>()?;
        let dev_model = model::load_as(&source, dev, DType::F32)?.model;
        for set in kernel_sets(dev) {
            let got = with_kernel_set(set, || generate(&dev_model, &prompts))?;
            assert_eq!(got, want, "{dev:?} {shape} {set}");
        }
    }
    Ok(())
}

/// 48 greedy tokens for each prompt, all in one engine batch, with an f32 cache.
fn generate(
    model: &Arc<model::LlamaModel>,
    prompts: &[Vec<u32>],
) -> Result<Vec<Vec<u32>>, Box<dyn std::error::Error>> {
    let config = EngineConfig {
        kv_cache_dtype: KvCacheDtype::F32,
        num_blocks: 1024,
        max_batch_tokens: 512,
        ..EngineConfig::default()
    };
    let mut core = EngineCore::new(model.clone(), None, config)?;
    let mut streams = Vec::new();
    for p in prompts {
        let (tx, rx) = mpsc::unbounded_channel();
        let request = GenerateRequest {
            prompt_ids: p.clone(),
            params: SamplingParams {
                temperature: 0.0,
                max_tokens: 48,
                ignore_eos: true,
                ..SamplingParams::default()
            },
            resume_ids: Vec::new(),
        };
        core.add_request(request, tx)?;
        streams.push(rx);
    }
    while core.has_work() {
        core.step()?;
    }
    let mut out = Vec::new();
    for mut rx in streams {
        let mut ids = Vec::new();
        while let Ok(event) = rx.try_recv() {
            match event {
                SeqEvent::Token(t) => ids.push(t.id),
                SeqEvent::Finished(_) => {}
                SeqEvent::Failed(e) => return Err(e.into()),
            }
        }
        out.push(ids);
    }
    Ok(out)
}

fn row_request<'a>(params: &'a SamplingParams, generated: &'a [u32], seed: u64) -> RowRequest<'a> {
    RowRequest {
        params,
        ctx: SampleContext {
            prompt_ids: &[],
            generated_ids: generated,
            seed,
        },
    }
}

/// A step's rows sampled together on `dev` against each row sampled alone by the host sampler:
/// greedy ids and the whole-vocabulary draws (the rows a GPU samples itself) agree, the filtered
/// and penalised rows (which a GPU sends to the host) are identical, a row's token does not depend
/// on the rest of the batch, and a NaN row fails alone.
fn batch_sampling_agrees_with_the_host_sampler(dev: &Device) -> TestResult {
    let (rows, vocab) = (96usize, 32_000usize);
    let mut rng = StdRng::seed_from_u64(11);
    let mut values: Vec<f32> = (0..rows * vocab)
        .map(|_| rng.random_range(-4.0..4.0))
        .collect();
    // Peaked rows, as a trained model gives, beside flat ones.
    for r in (0..rows).step_by(3) {
        for _ in 0..5 {
            values[r * vocab + rng.random_range(0..vocab)] += 12.0;
        }
    }
    let nan_row = rows - 1;
    values[nan_row * vocab + 17] = f32::NAN;
    let params: Vec<SamplingParams> = (0..rows)
        .map(|r| match r % 6 {
            0 => SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            1 => SamplingParams {
                temperature: 0.7,
                ..SamplingParams::default()
            },
            2 => SamplingParams {
                temperature: 1.3,
                seed: Some(5),
                ..SamplingParams::default()
            },
            3 => SamplingParams {
                temperature: 0.9,
                top_p: 0.8,
                ..SamplingParams::default()
            },
            4 => SamplingParams {
                repetition_penalty: 1.3,
                ..SamplingParams::default()
            },
            _ => SamplingParams {
                temperature: 1.0,
                ..SamplingParams::default()
            },
        })
        .collect();
    let history: Vec<u32> = (0..64).map(|i| (i * 499) % vocab as u32).collect();
    let reqs: Vec<RowRequest<'_>> = (0..rows)
        .map(|r| row_request(&params[r], &history[..r % 64], 1000 + r as u64))
        .collect();
    let logits = Tensor::from_vec(values.clone(), (rows, vocab), &Device::Cpu)?.to_device(dev)?;
    let got = sample_rows(&logits, &reqs)?;
    let mut draws = 0;
    let mut draws_equal = 0;
    for (r, g) in got.iter().enumerate() {
        let row = &values[r * vocab..(r + 1) * vocab];
        let want = sample(row, reqs[r].params, &reqs[r].ctx);
        if r == nan_row {
            assert!(g.is_err() && want.is_err(), "a NaN row must fail on both");
            continue;
        }
        let (g, want) = (g.as_ref().map_err(|e| e.to_string())?, want?);
        assert!(row[g.id as usize].is_finite());
        assert!(
            (g.logprob - want.logprob).abs() < 1e-3 || g.id != want.id,
            "row {r}"
        );
        match r % 6 {
            // Greedy: the same token (ties to the lower id on both).
            0 | 4 => assert_eq!(g.id, want.id, "row {r}"),
            // Host rows on every device: exactly the host sampler's answer.
            3 => assert_eq!(g, &want, "row {r}"),
            _ => {
                draws += 1;
                draws_equal += usize::from(g.id == want.id);
            }
        }
    }
    // The same uniform draw over the same weights: only the order of the f64 sums differs, so a
    // different token means the draw fell within rounding of a boundary.
    assert!(
        draws_equal * 100 >= draws * 97,
        "{draws_equal} of {draws} draws agree"
    );
    // Alone or in the batch, a row gets the same token.
    for r in [0, 1, 2, 5] {
        let alone = logits.narrow(0, r, 1)?;
        let one = sample_rows(&alone, &reqs[r..r + 1])?;
        assert_eq!(
            one[0].as_ref().map_err(|e| e.to_string())?,
            got[r].as_ref().map_err(|e| e.to_string())?
        );
    }
    Ok(())
}

/// Draws of one row at 4,000 output positions follow its softmax at temperature 0.8 (a
/// chi-square test over 16 tokens; a sampler that skewed the distribution fails it).
fn seeded_draws_follow_the_softmax(dev: &Device) -> TestResult {
    let vocab = 16usize;
    let n = 4000usize;
    let base: Vec<f32> = (0..vocab).map(|i| (i as f32 * 0.37).sin() * 1.5).collect();
    let values: Vec<f32> = (0..n).flat_map(|_| base.iter().copied()).collect();
    let logits = Tensor::from_vec(values, (n, vocab), &Device::Cpu)?.to_device(dev)?;
    let params = SamplingParams {
        temperature: 0.8,
        ..SamplingParams::default()
    };
    let positions = vec![0u32; n];
    let reqs: Vec<RowRequest<'_>> = (0..n)
        .map(|i| row_request(&params, &positions[..i], 77))
        .collect();
    let mut counts = vec![0f64; vocab];
    for t in sample_rows(&logits, &reqs)? {
        counts[t.map_err(|e| e.to_string())?.id as usize] += 1.0;
    }
    let max = base.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let w: Vec<f64> = base
        .iter()
        .map(|&l| (f64::from(l - max) / 0.8).exp())
        .collect();
    let z: f64 = w.iter().sum();
    let chi2: f64 = w
        .iter()
        .zip(&counts)
        .map(|(&w, &c)| {
            let e = n as f64 * w / z;
            (c - e).powi(2) / e
        })
        .sum();
    // 15 degrees of freedom: P(chi2 > 45) is about 7e-5.
    assert!(chi2 < 45.0, "chi-square {chi2:.1}: {counts:?}");
    Ok(())
}
