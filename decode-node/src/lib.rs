//! pd-decode: the decode worker. It owns a paged KV cache that prefill workers fill, and generates
//! with continuous batching through the engine of `pd-common`.
//!
//! A request arrives as `Decode.Generate` from the router. The engine reserves KV blocks for the
//! prompt (so arriving KV never finds the cache full), a prefill node fills them through
//! `KvTransfer.Push` and answers with the first token, and the sequence joins the running batch.
//! When no prefill node is named, the prompt is short, the node runs aggregated, or every prefill
//! attempt fails, the prompt is computed here in the same blocks.

mod service;

use std::net::SocketAddr;
use std::time::Duration;

use pd_common::engine::{EngineConfig, EngineCore, EngineHandle};
use pd_common::membership::MembershipConfig;
use pd_common::node::{self, KvTransfer, Listeners, ModelArgs, RequestTasks, ShutdownArgs, Worker};
use pd_common::rpc::RpcConfig;
use pd_common::telemetry::{self, LogFormat};
use pd_common::transfer::{self, KvReceiver, KvTransferService};
use pd_common::Result;
use pd_proto::v1::decode_server::DecodeServer;
use pd_proto::v1::node_server::NodeServer;
use pd_proto::v1::NodeRole;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

pub use service::DecodeService;

/// Everything a decode node can be told; every flag has a default.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "pd-decode", version, about = "pd-cluster decode worker")]
pub struct DecodeConfig {
    /// gRPC listen address (Decode, KvTransfer, Node, grpc.health.v1). Port 0 picks a free port.
    #[arg(long, env = "PD_DECODE_LISTEN", default_value = "0.0.0.0:50071")]
    pub listen: SocketAddr,

    /// host:port that other nodes use to reach this one, or `auto`: this host's own address
    /// (a container's or pod's) with the listen port. Default: the listen address, with
    /// 127.0.0.1 for 0.0.0.0.
    #[arg(long, env = "PD_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// Prometheus /metrics listen address.
    #[arg(long, env = "PD_METRICS_LISTEN", default_value = "0.0.0.0:9171")]
    pub metrics_listen: SocketAddr,

    /// This node's id in the cluster (default: decode-<random>).
    #[arg(long, env = "PD_NODE_ID")]
    pub node_id: Option<String>,

    /// Always prefill here (aggregated serving), even when the router names prefill nodes.
    #[arg(long, env = "PD_AGGREGATED")]
    pub aggregated: bool,

    /// Prompts of fewer tokens than this are prefilled here: shipping their KV costs more than
    /// computing it. 0 sends every prompt to a prefill node when one is named.
    #[arg(long, env = "PD_LOCAL_PREFILL_BELOW", default_value_t = 0)]
    pub local_prefill_below: usize,

    /// Deadline of one remote prefill, KV transfer included, in milliseconds. When it passes,
    /// the reservation is taken back from that prefill node and the next one (or this node) runs it.
    #[arg(long, env = "PD_TRANSFER_TIMEOUT_MS", default_value_t = 30_000)]
    pub transfer_timeout_ms: u64,

    /// How much longer than --transfer-timeout-ms to wait for a prefill node's answer (the
    /// prefill node enforces the deadline itself; this covers the answer's way back), in
    /// milliseconds.
    #[arg(long, env = "PD_PREFILL_ANSWER_GRACE_MS", default_value_t = 2_000)]
    pub prefill_answer_grace_ms: u64,

    #[command(flatten)]
    pub shutdown: ShutdownArgs,

    #[command(flatten)]
    pub rpc: RpcConfig,

    #[cfg(feature = "nccl")]
    #[command(flatten)]
    pub nccl: transfer::nccl::NcclConfig,

    /// Log line format.
    #[arg(long, env = "PD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    #[command(flatten)]
    pub model: ModelArgs,

    /// KV transfer backends this node offers: `auto` (NCCL too, in a build with the `nccl`
    /// feature running on a GPU) or `grpc`.
    #[arg(long, env = "PD_KV_TRANSFER", value_enum, default_value_t = KvTransfer::Auto)]
    pub kv_transfer: KvTransfer,

    #[command(flatten)]
    pub engine: EngineConfig,

    #[command(flatten)]
    pub membership: MembershipConfig,
}

/// Runs a decode node on its listeners until `shutdown` is cancelled, then drains: stops taking
/// requests, leaves etcd, lets running sequences finish (up to the drain timeout), hands the
/// rest off and returns.
pub async fn run(
    config: DecodeConfig,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<()> {
    let loaded = config.model.load()?;
    let core = EngineCore::new(
        loaded.model.clone(),
        loaded.tokenizer.clone(),
        config.engine.clone(),
    )?;
    let fingerprint = transfer::fingerprint(loaded.model.config(), core.cache().spec());
    let (engine, engine_thread) = EngineHandle::spawn(core)?;

    let node_id = config
        .node_id
        .clone()
        .unwrap_or_else(|| node::new_node_id("decode"));
    let grpc_address = node::advertised(
        listeners.grpc.local_addr()?,
        config.advertise_address.as_deref(),
    )?;
    let receiver = KvReceiver::new(engine.cache().clone(), fingerprint.clone());
    let tasks = RequestTasks::new(&shutdown);
    let service = DecodeService::new(
        engine.clone(),
        receiver.clone(),
        tasks.clone(),
        service::Options {
            node_id: node_id.clone(),
            self_address: grpc_address.clone(),
            aggregated: config.aggregated,
            local_prefill_below: config.local_prefill_below,
            transfer_timeout: Duration::from_millis(config.transfer_timeout_ms),
            answer_grace: Duration::from_millis(config.prefill_answer_grace_ms),
            rpc: config.rpc.clone(),
        },
    );
    let transfer = KvTransferService::new(receiver);
    #[cfg(feature = "nccl")]
    let transfer = transfer.with_nccl(config.nccl.clone());
    let routes = Routes::new(DecodeServer::new(service.clone()))
        .add_service(NodeServer::new(service))
        .add_service(transfer.into_server());
    let worker = Worker {
        role: NodeRole::Decode,
        node_id,
        grpc_address,
        fingerprint,
        engine,
        engine_thread,
        membership: config.membership.clone(),
        shutdown: config.shutdown.clone(),
        rpc: config.rpc.clone(),
        kv_transfer: config.kv_transfer,
        tasks,
    };
    let health_name = <DecodeServer<DecodeService> as NamedService>::NAME;
    worker.serve(listeners, routes, health_name, shutdown).await
}

/// Binds the listeners of `config` and runs the node until SIGINT/SIGTERM.
pub async fn main_with(config: DecodeConfig) -> Result<()> {
    telemetry::init_tracing(config.log_format);
    let listeners = Listeners {
        grpc: TcpListener::bind(config.listen).await?,
        metrics: TcpListener::bind(config.metrics_listen).await?,
    };
    let shutdown = CancellationToken::new();
    node::cancel_on_signals(shutdown.clone());
    run(config, listeners, shutdown).await
}
