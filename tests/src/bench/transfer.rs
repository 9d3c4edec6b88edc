//! `pd-bench transfer`: KV shipping over gRPC on loopback, next to raw TCP on loopback measured
//! in the same run. The gRPC path is the production one: each layer read out of a prefill cache
//! as the engine exports it (on a thread of its own, while earlier layers are sent), cut into messages of about a MiB and checksummed, pushed through
//! `KvTransfer.Push` on a kept connection into a real decode-side receiver that verifies and
//! writes them into a paged cache.

use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device, Tensor};
use pd_common::engine::ExportedKv;
use pd_common::kv::{blocks_for_tokens, KvCache, KvCacheSpec};
use pd_common::model::ModelConfig;
use pd_common::rpc::RpcConfig;
use pd_common::transfer::{self, grpc, push, KvReceiver, KvTransferService};
use pd_proto::v1::KvHandshake;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

#[derive(clap::Args)]
pub struct TransferArgs {
    /// Model shapes whose KV layout to ship (presets: smollm2-135m, llama3-1b, llama3-8b).
    #[arg(long, value_delimiter = ',', default_value = "smollm2-135m,llama3-8b")]
    pub shapes: Vec<String>,

    /// Prompt lengths in tokens.
    #[arg(long, value_delimiter = ',', default_value = "512,2048")]
    pub tokens: Vec<usize>,

    /// Runs of each measurement; the median is reported.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
}

pub fn run(args: TransferArgs) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(run_async(args))
}

async fn run_async(args: TransferArgs) -> anyhow::Result<()> {
    println!(
        "KV transfer on loopback, f16 KV, block size 16 (load average {})",
        super::load_average()
    );
    println!(
        "{:<14} {:>7} {:>10} {:>9} {:>12} {:>12} {:>8}",
        "shape", "tokens", "KV MB", "gRPC ms", "gRPC GB/s", "TCP GB/s", "gRPC/TCP"
    );
    for shape in &args.shapes {
        let model = ModelConfig::preset(shape)?;
        for &tokens in &args.tokens {
            let spec = prompt_spec(&model, tokens);
            let source = source_cache(&spec)?;
            let bytes = spec.num_blocks * spec.bytes_per_block();
            let mut grpc_rates = Vec::new();
            let mut tcp_rates = Vec::new();
            let receiver = Receiver::serve(&spec, &model).await?;
            // The first of each warms up (connections, allocations) and is not counted.
            for rep in 0..=args.repeats {
                let g = bytes as f64 / receiver.push(&spec, &source).await? / 1e9;
                let t = bytes as f64 / tcp_once(bytes).await? / 1e9;
                if rep > 0 {
                    grpc_rates.push(g);
                    tcp_rates.push(t);
                }
            }
            receiver.server.abort();
            let (g, t) = (super::median(grpc_rates), super::median(tcp_rates));
            println!(
                "{:<14} {:>7} {:>10.1} {:>9.1} {:>12.2} {:>12.2} {:>7.0}%",
                shape,
                tokens,
                bytes as f64 / 1e6,
                bytes as f64 / g / 1e6,
                g,
                t,
                100.0 * g / t
            );
        }
    }
    Ok(())
}

/// Bytes and seconds of shipping one `tokens`-long prompt's KV of `model` over gRPC into a
/// receiver on loopback (the median of `repeats` after a warm-up), as a prefill node ships it.
pub async fn grpc_seconds(
    model: &ModelConfig,
    tokens: usize,
    repeats: usize,
) -> anyhow::Result<(usize, f64)> {
    let spec = prompt_spec(model, tokens);
    let source = source_cache(&spec)?;
    let receiver = Receiver::serve(&spec, model).await?;
    let mut times = Vec::new();
    for rep in 0..=repeats {
        let t = receiver.push(&spec, &source).await?;
        if rep > 0 {
            times.push(t);
        }
    }
    receiver.server.abort();
    Ok((
        spec.num_blocks * spec.bytes_per_block(),
        super::median(times),
    ))
}

/// A cache of `model`'s KV layout (f16, blocks of 16) just large enough for one prompt.
fn prompt_spec(model: &ModelConfig, tokens: usize) -> KvCacheSpec {
    KvCacheSpec {
        num_layers: model.num_layers,
        num_kv_heads: model.num_kv_heads,
        head_dim: model.head_dim,
        block_size: 16,
        num_blocks: blocks_for_tokens(tokens, 16),
        dtype: DType::F16,
    }
}

/// A prefill node's cache holding the whole prompt's KV (random values).
fn source_cache(spec: &KvCacheSpec) -> anyhow::Result<KvCache> {
    let cache = KvCache::new(spec.clone(), &Device::Cpu)?;
    let shape = (
        spec.num_blocks,
        spec.block_size,
        spec.num_kv_heads,
        spec.head_dim,
    );
    let blocks: Vec<u32> = (0..spec.num_blocks as u32).collect();
    for layer in 0..spec.num_layers {
        let k = Tensor::randn(0f32, 1., shape, &Device::Cpu)?.to_dtype(DType::F16)?;
        let v = Tensor::randn(0f32, 1., shape, &Device::Cpu)?.to_dtype(DType::F16)?;
        cache.write_blocks(layer, &blocks, &k, &v)?;
    }
    Ok(cache)
}

/// A decode-side receiver served on a loopback port, and a client kept across transfers (as a
/// prefill node keeps its channels).
struct Receiver {
    receiver: std::sync::Arc<KvReceiver>,
    fingerprint: pd_proto::v1::ModelFingerprint,
    address: String,
    channel: tonic::transport::Channel,
    server: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Receiver {
    async fn serve(spec: &KvCacheSpec, model: &ModelConfig) -> anyhow::Result<Self> {
        let cache = KvCache::new(spec.clone(), &Device::Cpu)?;
        let fingerprint = transfer::fingerprint(model, spec);
        let receiver = KvReceiver::new(cache, fingerprint.clone());
        let rpc = RpcConfig::default();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?.to_string();
        let server = tokio::spawn(
            rpc.server()?
                .add_service(KvTransferService::new(receiver.clone()).into_server())
                .serve_with_incoming(RpcConfig::incoming(listener)),
        );
        let channel = rpc.channel(&address)?;
        Ok(Self {
            receiver,
            fingerprint,
            address,
            channel,
            server,
        })
    }

    /// Seconds to push every layer into the receiver's cache.
    async fn push(&self, spec: &KvCacheSpec, source: &KvCache) -> anyhow::Result<f64> {
        let blocks: Vec<u32> = (0..spec.num_blocks as u32).collect();
        let ticket = self.receiver.expect(blocks);
        let handshake = KvHandshake {
            request_id: "bench".into(),
            transfer_id: ticket.id(),
            fingerprint: Some(self.fingerprint.clone()),
            num_blocks: spec.num_blocks as u32,
            ..Default::default()
        };
        let (sink, exported) = mpsc::unbounded_channel();
        let started = Instant::now();
        // Layers read out of the sender's cache on a thread of their own, one copy each, as a
        // prefill engine exports them while the push sends the ones before.
        let run = source.block_run(&(0..spec.num_blocks as u32).collect::<Vec<_>>())?;
        let (source, num_layers) = (source.clone(), spec.num_layers);
        let exporter = tokio::task::spawn_blocking(move || {
            for layer in 0..num_layers {
                if sink
                    .send(ExportedKv::read(&source, layer, 0, &run)?)
                    .is_err()
                {
                    break;
                }
            }
            anyhow::Ok(())
        });
        push::push(
            self.channel.clone(),
            &self.address,
            "bench",
            handshake,
            exported,
            grpc::GrpcSink::new(),
        )
        .await?;
        let seconds = started.elapsed().as_secs_f64();
        exporter.await??;
        ticket.finish().context("the whole transfer arrived")?;
        Ok(seconds)
    }
}

/// Seconds to send `bytes` over a connected loopback TCP socket and have them read on the other
/// end: the ceiling, 4 MiB writes of memory that is never touched again.
async fn tcp_once(bytes: usize) -> anyhow::Result<f64> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let reader = tokio::spawn(async move {
        let (mut socket, _) = listener.accept().await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0;
        while total < bytes {
            let n = socket.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n;
        }
        anyhow::Ok(total)
    });
    let payload = vec![7u8; 4 << 20];
    let mut socket = TcpStream::connect(address).await?;
    socket.set_nodelay(true)?;
    let started = Instant::now();
    let mut sent = 0;
    while sent < bytes {
        let n = payload.len().min(bytes - sent);
        socket.write_all(&payload[..n]).await?;
        sent += n;
    }
    socket.flush().await?;
    let received = reader.await??;
    anyhow::ensure!(received == bytes, "received {received} of {bytes} bytes");
    Ok(started.elapsed().as_secs_f64())
}
