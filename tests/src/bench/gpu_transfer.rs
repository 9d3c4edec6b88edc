//! `pd-bench gpu-transfer`: KV from one GPU to another, over NCCL and over gRPC
//! (GPU → host → TCP → host → GPU), against NCCL's own send/recv peak on the same pair; then the
//! share of the transfer that layer-wise shipping hides behind a real prefill.
//!
//! Both ends live in this process: a decode-side `KvReceiver` with its cache on the second GPU,
//! served on loopback, and a sender with its cache (or a model) on the first. Every transfer is
//! checked: the receiver's blocks must equal the sender's.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id};
use candle_core::{DType, Device, Tensor};
use pd_common::engine::ExportedKv;
use pd_common::kv::{KvCache, KvCacheSpec};
use pd_common::model::{self, ForwardBatch, ModelConfig, ModelSource};
use pd_common::rpc::RpcConfig;
use pd_common::transfer::fingerprint;
use pd_common::transfer::nccl::NcclSender;
use pd_common::transfer::{grpc, push, KvReceiver, KvTransferService};
use pd_proto::v1::KvHandshake;
use rand::{seq::SliceRandom, Rng, SeedableRng};
use serde_json::json;
use tokio::sync::mpsc;

use super::median;

#[derive(clap::Args)]
pub struct GpuTransferArgs {
    /// The sending (prefill) GPU.
    #[arg(long, default_value = "cuda:0")]
    pub from: String,
    /// The receiving (decode) GPU, or `cpu` for a receiver in host memory (gRPC only).
    #[arg(long, default_value = "cuda:1")]
    pub to: String,
    /// Model shape whose KV is shipped.
    #[arg(long, default_value = "llama3-8b")]
    pub shape: String,
    /// Prompt lengths.
    #[arg(long, value_delimiter = ',', default_value = "512,4096")]
    pub tokens: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Backends to measure: `nccl` needs two GPUs; `grpc` alone runs on one (`--to` may be
    /// `--from`: GPU → pinned host → TCP loopback → host → the same GPU).
    #[arg(long, value_delimiter = ',', default_value = "nccl,grpc")]
    pub backends: Vec<String>,
    /// Appends the figures as JSON lines to this file.
    #[arg(long)]
    pub json: Option<std::path::PathBuf>,
}

pub fn run(args: GpuTransferArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: GpuTransferArgs) -> anyhow::Result<()> {
    let from = model::open_device(&args.from)?;
    let to = model::open_device(&args.to)?;
    ensure!(from.is_cuda(), "the sending end must be a GPU");
    ensure!(
        to.is_cuda() || !args.backends.iter().any(|b| b == "nccl"),
        "NCCL needs a GPU at the receiving end"
    );
    let mut out = Vec::new();
    for b in &args.backends {
        ensure!(
            b == "nccl" || b == "grpc",
            "unknown backend {b:?} (nccl, grpc)"
        );
    }
    let backends: Vec<&str> = args.backends.iter().map(String::as_str).collect();
    let peak = if backends.contains(&"nccl") {
        let peak = nccl_peak(&args.from, &args.to)?;
        println!(
            "NCCL send/recv peak {}→{}: {:.1} GB/s (256 MiB messages)",
            args.from,
            args.to,
            peak / 1e9
        );
        out.push(json!({"nccl_peak_GBps": peak / 1e9}));
        peak
    } else {
        f64::NAN
    };

    let cfg = ModelConfig::preset(&args.shape)?;
    let bs = 16;
    let max_tokens = args.tokens.iter().copied().max().unwrap_or(0);
    let spec = KvCacheSpec {
        num_layers: cfg.num_layers,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        block_size: bs,
        num_blocks: max_tokens.div_ceil(bs) + 1,
        dtype: DType::BF16,
    };
    let fp = fingerprint(&cfg, &spec);
    let source = KvCache::new(spec.clone(), &from)?;
    let all: Vec<u32> = (0..spec.num_blocks as u32).collect();
    for l in 0..spec.num_layers {
        let shape = (all.len(), bs, spec.num_kv_heads, spec.head_dim);
        let k = Tensor::rand(-1f32, 1., shape, &from)?.to_dtype(DType::BF16)?;
        let v = Tensor::rand(-1f32, 1., shape, &from)?.to_dtype(DType::BF16)?;
        source.write_blocks(l, &all, &k, &v)?;
    }
    let receiver = KvReceiver::new(KvCache::new(spec.clone(), &to)?, fp.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    tokio::spawn(
        RpcConfig::default()
            .server()?
            .add_service(KvTransferService::new(receiver.clone()).into_server())
            .serve_with_incoming(RpcConfig::incoming(listener)),
    );
    let nccl = NcclSender::default();
    let mut rng = rand::rngs::StdRng::seed_from_u64(3);
    let mut transfer_seconds = std::collections::HashMap::new();
    for &tokens in &args.tokens {
        let n = tokens.div_ceil(bs);
        let bytes = (n * spec.bytes_per_block()) as f64;
        for &backend in &backends {
            let mut times = Vec::new();
            for rep in 0..args.repeats + 1 {
                // Random source blocks into random destination blocks.
                let mut src: Vec<u32> = all.clone();
                let mut dst: Vec<u32> = all.clone();
                src.shuffle(&mut rng);
                dst.shuffle(&mut rng);
                let (src, dst) = (src[..n].to_vec(), dst[..n].to_vec());
                let run = source.block_run(&src)?;
                let exports: Vec<ExportedKv> = (0..spec.num_layers)
                    .map(|l| ExportedKv::read(&source, l, 0, &run))
                    .collect::<Result<_, _>>()?;
                from.synchronize()?;
                let secs = ship(
                    &receiver, &nccl, &address, &fp, &from, backend, &dst, exports,
                )
                .await?;
                if rep == 0 {
                    check_equal(
                        &source,
                        &src,
                        receiver_cache(&receiver),
                        &dst,
                        spec.num_layers,
                    )?;
                } else {
                    times.push(secs);
                }
            }
            let secs = median(times);
            transfer_seconds.insert((backend, tokens), secs);
            let of_peak = if peak.is_finite() {
                format!(" ({:.0}% of the NCCL peak)", 100.0 * bytes / secs / peak)
            } else {
                String::new()
            };
            println!(
                "{backend:>4} {tokens:>5} tokens: {:.1} MB in {:.2} ms = {:.1} GB/s{of_peak}, blocks equal",
                bytes / 1e6,
                secs * 1e3,
                bytes / secs / 1e9,
            );
            let fraction = if peak.is_finite() {
                json!(bytes / secs / peak)
            } else {
                json!(null)
            };
            out.push(json!({"backend": backend, "from": args.from, "to": args.to, "tokens": tokens, "bytes": bytes, "ms": secs * 1e3, "GBps": bytes / secs / 1e9, "fraction_of_nccl_peak": fraction}));
        }
    }

    // Layer-wise overlap: a real prefill on the first GPU shipping each layer as it is done.
    let model = model::load_as(
        &format!("dummy:{}", args.shape).parse::<ModelSource>()?,
        &from,
        DType::BF16,
    )?
    .model;
    let prefill_cache = KvCache::new(spec.clone(), &from)?;
    for &tokens in &args.tokens {
        let n = tokens.div_ceil(bs);
        let ids: Vec<u32> = (0..tokens)
            .map(|_| rng.random_range(0..cfg.vocab_size as u32))
            .collect();
        let mut batch = ForwardBatch::default();
        batch.push_seq(&ids, 0, &all[..n], 1);
        let alone = {
            let mut times = Vec::new();
            for _ in 0..args.repeats + 1 {
                let t = Instant::now();
                let logits = model.forward(&batch, &prefill_cache, &mut |_| Ok(()))?;
                logits.device().synchronize()?;
                let _ = logits.to_vec2::<f32>()?;
                times.push(t.elapsed().as_secs_f64());
            }
            median(times[1..].to_vec())
        };
        for &backend in &backends {
            let mut times = Vec::new();
            let mut timeline = String::new();
            for _ in 0..args.repeats + 1 {
                let (sink, exported) = mpsc::unbounded_channel();
                let (model, cache, batch, blocks) = (
                    model.clone(),
                    prefill_cache.clone(),
                    batch.clone(),
                    all[..n].to_vec(),
                );
                let started = Instant::now();
                let compute = tokio::task::spawn_blocking(move || -> anyhow::Result<[f64; 2]> {
                    let run = cache.block_run(&blocks)?;
                    let mut ship_layer = |l: usize| -> pd_engine::Result<()> {
                        let _ = sink.send(ExportedKv::read(&cache, l, 0, &run)?);
                        Ok(())
                    };
                    let logits = model.forward(&batch, &cache, &mut ship_layer)?;
                    let queued = started.elapsed().as_secs_f64();
                    // As the engine's step does: wait for the stream, then read. (A copy into
                    // pageable memory that waits for the whole pass holds up other threads'
                    // CUDA calls, the shipper's among them, until it is done.)
                    logits.device().synchronize()?;
                    let _ = logits.to_vec2::<f32>()?;
                    Ok([queued, started.elapsed().as_secs_f64()])
                });
                // When each layer's bytes reach the host side of the sender.
                let (relay, exported_timed) = mpsc::unbounded_channel();
                let arrivals = tokio::spawn(async move {
                    let mut exported = exported;
                    let mut at = Vec::new();
                    while let Some(kv) = exported.recv().await {
                        at.push(started.elapsed().as_secs_f64());
                        if relay.send(kv).is_err() {
                            break;
                        }
                    }
                    at
                });
                let dst: Vec<u32> = all[..n].to_vec();
                let shipped = async {
                    let r = ship_stream(
                        &receiver,
                        &nccl,
                        &address,
                        &fp,
                        &from,
                        backend,
                        &dst,
                        exported_timed,
                    )
                    .await;
                    (r, started.elapsed().as_secs_f64())
                };
                let (computed, (shipped, shipped_at)) = tokio::join!(compute, shipped);
                let [queued_at, computed_at] = computed??;
                shipped?;
                times.push(started.elapsed().as_secs_f64());
                let arrived = arrivals.await?;
                timeline = format!(
                    "layers queued by {:.1} ms; layers 0/8/16/24 exported at {} ms, on the host at {} ms; prefill done {:.1} ms, shipping done {:.1} ms",
                    queued_at * 1e3,
                    every_8th(&arrived),
                    every_8th(&std::mem::take(&mut *lock(&LAYERS_ON_HOST))),
                    computed_at * 1e3,
                    shipped_at * 1e3
                );
            }
            println!("{backend:>4} {tokens:>5} tokens, last run: {timeline}");
            let both = median(times[1..].to_vec());
            let transfer = transfer_seconds
                .get(&(backend, tokens))
                .copied()
                .unwrap_or(f64::NAN);
            let hidden = ((alone + transfer - both) / transfer).clamp(0.0, 1.0);
            println!(
                "{backend:>4} {tokens:>5} tokens: prefill alone {:.1} ms, prefill + shipping {:.1} ms ({:+.1} ms, {:+.1}%){}",
                alone * 1e3,
                both * 1e3,
                (both - alone) * 1e3,
                100.0 * (both - alone) / alone,
                if transfer.is_finite() {
                    format!(", {:.0}% of the {:.2} ms transfer hidden", 100.0 * hidden, transfer * 1e3)
                } else {
                    String::new()
                }
            );
            out.push(json!({"overlap": backend, "from": args.from, "to": args.to, "tokens": tokens, "prefill_ms": alone * 1e3, "prefill_and_ship_ms": both * 1e3, "added_fraction": (both - alone) / alone, "transfer_ms": transfer * 1e3, "hidden_fraction": if transfer.is_finite() { json!(hidden) } else { json!(null) }}));
        }
    }
    if let Some(path) = &args.json {
        let lines: Vec<String> = out.iter().map(|v| v.to_string()).collect();
        use std::io::Write;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        file.write_all((lines.join("\n") + "\n").as_bytes())?;
    }
    Ok(())
}

/// When each layer's chunks were ready on the host during the last gRPC transfer, in seconds
/// from its start.
static LAYERS_ON_HOST: std::sync::Mutex<Vec<f64>> = std::sync::Mutex::new(Vec::new());

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn every_8th(times: &[f64]) -> String {
    times
        .iter()
        .step_by(8)
        .map(|t| format!("{:.1}", t * 1e3))
        .collect::<Vec<_>>()
        .join("/")
}

/// The gRPC sink, noting when each layer's bytes are ready on the host.
struct Timed {
    inner: grpc::GrpcSink,
    started: Instant,
}

impl push::ChunkSink for Timed {
    fn backend(&self) -> pd_common::transfer::TransferBackend {
        self.inner.backend()
    }
    fn prepare(&self, handshake: &mut KvHandshake) {
        self.inner.prepare(handshake)
    }
    async fn chunks(&mut self, kv: ExportedKv) -> pd_common::Result<Vec<pd_proto::v1::KvChunk>> {
        let chunks = self.inner.chunks(kv).await;
        lock(&LAYERS_ON_HOST).push(self.started.elapsed().as_secs_f64());
        chunks
    }
    async fn flush(&mut self) -> pd_common::Result<()> {
        self.inner.flush().await
    }
    fn failed(&mut self) {
        self.inner.failed()
    }
}

fn receiver_cache(receiver: &Arc<KvReceiver>) -> &KvCache {
    receiver.cache()
}

/// Ships prepared exports into `dst` on the receiver; returns the seconds it took.
#[allow(clippy::too_many_arguments)]
async fn ship(
    receiver: &Arc<KvReceiver>,
    nccl: &NcclSender,
    address: &str,
    fp: &pd_proto::v1::ModelFingerprint,
    device: &Device,
    backend: &str,
    dst: &[u32],
    exports: Vec<ExportedKv>,
) -> anyhow::Result<f64> {
    let (sink, exported) = mpsc::unbounded_channel();
    for kv in exports {
        sink.send(kv)?;
    }
    drop(sink);
    let started = Instant::now();
    ship_stream(receiver, nccl, address, fp, device, backend, dst, exported).await?;
    Ok(started.elapsed().as_secs_f64())
}

#[allow(clippy::too_many_arguments)]
async fn ship_stream(
    receiver: &Arc<KvReceiver>,
    nccl: &NcclSender,
    address: &str,
    fp: &pd_proto::v1::ModelFingerprint,
    device: &Device,
    backend: &str,
    dst: &[u32],
    exported: mpsc::UnboundedReceiver<ExportedKv>,
) -> anyhow::Result<()> {
    let ticket = receiver.expect(dst.to_vec());
    let handshake = KvHandshake {
        request_id: "bench".into(),
        transfer_id: ticket.id(),
        fingerprint: Some(fp.clone()),
        num_blocks: dst.len() as u32,
        ..Default::default()
    };
    let channel = RpcConfig::default().channel(address)?;
    match backend {
        "nccl" => {
            let sink = nccl.sink(&channel, address, &handshake, device).await?;
            push::push(channel, address, "bench", handshake, exported, sink).await?
        }
        _ => {
            lock(&LAYERS_ON_HOST).clear();
            let sink = Timed {
                inner: grpc::GrpcSink::new(),
                started: Instant::now(),
            };
            push::push(channel, address, "bench", handshake, exported, sink).await?
        }
    };
    ticket.finish()?;
    Ok(())
}

fn check_equal(
    a: &KvCache,
    a_blocks: &[u32],
    b: &KvCache,
    b_blocks: &[u32],
    layers: usize,
) -> anyhow::Result<()> {
    for l in 0..layers {
        let (ka, va) = a.read_blocks(l, a_blocks)?;
        let (kb, vb) = b.read_blocks(l, b_blocks)?;
        for (x, y) in [(ka, kb), (va, vb)] {
            let x = x.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let y = y.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
            let diff = (x - y)?.abs()?.max_all()?.to_scalar::<f32>()?;
            if diff != 0.0 {
                bail!("layer {l}: received KV differs from what was sent (max diff {diff})");
            }
        }
    }
    Ok(())
}

/// NCCL's own point-to-point rate between the two GPUs: 256 MiB messages, median of 10.
fn nccl_peak(from: &str, to: &str) -> anyhow::Result<f64> {
    let ordinal =
        |d: &str| -> anyhow::Result<usize> { Ok(d.strip_prefix("cuda:").unwrap_or("0").parse()?) };
    let id = Id::new().map_err(|e| anyhow::anyhow!("ncclGetUniqueId: {e:?}"))?;
    let n = 128 << 20; // bf16 elements: 256 MiB
    let run = move |rank: usize, ordinal: usize| -> anyhow::Result<f64> {
        let ctx = candle_core::cuda_backend::cudarc::driver::CudaContext::new(ordinal)?;
        let stream = ctx.new_stream()?;
        let comm =
            Comm::from_rank(stream.clone(), rank, 2, id).map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let mut buf = stream.alloc_zeros::<half::bf16>(n)?;
        let mut times = Vec::new();
        for i in 0..12 {
            stream.synchronize()?;
            let t = Instant::now();
            if rank == 0 {
                comm.send(&buf, 1).map_err(|e| anyhow::anyhow!("{e:?}"))?;
            } else {
                comm.recv(&mut buf, 0)
                    .map_err(|e| anyhow::anyhow!("{e:?}"))?;
            }
            stream.synchronize()?;
            if i >= 2 {
                times.push(t.elapsed().as_secs_f64());
            }
        }
        Ok((n * 2) as f64 / median(times))
    };
    let (a, b) = (ordinal(from)?, ordinal(to)?);
    let sender = std::thread::spawn(move || run(0, a));
    let rate = run(1, b)?;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("NCCL sender thread panicked"))??;
    Ok(rate)
}
