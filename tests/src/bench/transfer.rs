//! `pd-bench transfer`: KV shipping over gRPC on loopback, next to raw TCP on loopback measured
//! in the same run. The gRPC path is the production one: tensors as a prefill engine exports
//! them, encoded and checksummed per (layer, block run), pushed through `KvTransfer.Push` into
//! a real decode-side receiver that verifies and writes them into a paged cache.

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
use tokio_stream::wrappers::TcpListenerStream;

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
        "{:<14} {:>7} {:>10} {:>12} {:>12} {:>8}",
        "shape", "tokens", "KV MB", "gRPC GB/s", "TCP GB/s", "gRPC/TCP"
    );
    for shape in &args.shapes {
        let model = ModelConfig::preset(shape)?;
        for &tokens in &args.tokens {
            let num_blocks = blocks_for_tokens(tokens, 16);
            let spec = KvCacheSpec {
                num_layers: model.num_layers,
                num_kv_heads: model.num_kv_heads,
                head_dim: model.head_dim,
                block_size: 16,
                num_blocks,
                dtype: DType::F16,
            };
            let layers = layer_tensors(&spec)?;
            let bytes = 2 * layers
                .iter()
                .map(|(k, _)| k.elem_count() * 2)
                .sum::<usize>();
            let mut grpc_rates = Vec::new();
            let mut tcp_rates = Vec::new();
            for _ in 0..args.repeats {
                grpc_rates.push(bytes as f64 / grpc_once(&spec, &model, &layers).await? / 1e9);
                tcp_rates.push(bytes as f64 / tcp_once(bytes).await? / 1e9);
            }
            let (g, t) = (super::median(grpc_rates), super::median(tcp_rates));
            println!(
                "{:<14} {:>7} {:>10.1} {:>12.2} {:>12.2} {:>7.0}%",
                shape,
                tokens,
                bytes as f64 / 1e6,
                g,
                t,
                100.0 * g / t
            );
        }
    }
    Ok(())
}

/// One layer's K and V of the whole prompt, as a prefill engine exports them.
fn layer_tensors(spec: &KvCacheSpec) -> anyhow::Result<Vec<(Tensor, Tensor)>> {
    let shape = (
        spec.num_blocks,
        spec.block_size,
        spec.num_kv_heads,
        spec.head_dim,
    );
    (0..spec.num_layers)
        .map(|_| {
            let k = Tensor::randn(0f32, 1., shape, &Device::Cpu)?.to_dtype(DType::F16)?;
            let v = Tensor::randn(0f32, 1., shape, &Device::Cpu)?.to_dtype(DType::F16)?;
            Ok((k, v))
        })
        .collect()
}

/// Seconds to push every layer into a receiver served on a loopback port.
async fn grpc_once(
    spec: &KvCacheSpec,
    model: &ModelConfig,
    layers: &[(Tensor, Tensor)],
) -> anyhow::Result<f64> {
    let cache = KvCache::new(spec.clone(), &Device::Cpu)?;
    let fingerprint = transfer::fingerprint(model, spec);
    let receiver = KvReceiver::new(cache, fingerprint.clone());
    let rpc = RpcConfig::default();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    let server = rpc
        .server()
        .add_service(KvTransferService::new(receiver.clone()).into_server())
        .serve_with_incoming(TcpListenerStream::new(listener));
    let server = tokio::spawn(server);

    let blocks: Vec<u32> = (0..spec.num_blocks as u32).collect();
    let ticket = receiver.expect(blocks);
    let handshake = KvHandshake {
        request_id: "bench".into(),
        transfer_id: ticket.id(),
        fingerprint: Some(fingerprint),
        num_blocks: spec.num_blocks as u32,
        ..Default::default()
    };
    let (sink, exported) = mpsc::unbounded_channel();
    let client = grpc::client(&rpc, &address)?;
    let started = Instant::now();
    for (layer, (keys, values)) in layers.iter().enumerate() {
        sink.send(ExportedKv {
            layer,
            first_block: 0,
            keys: keys.clone(),
            values: values.clone(),
            #[cfg(feature = "cuda")]
            ready: None,
        })?;
    }
    drop(sink);
    push::push(client, "bench", handshake, exported, grpc::GrpcSink).await?;
    let seconds = started.elapsed().as_secs_f64();
    ticket.finish().context("the whole transfer arrived")?;
    server.abort();
    Ok(seconds)
}

/// Seconds to send `bytes` over a loopback TCP connection and have them read on the other end.
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
    let started = Instant::now();
    let mut socket = TcpStream::connect(address).await?;
    socket.set_nodelay(true)?;
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
