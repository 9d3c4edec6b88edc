//! pd-prefill: the prefill worker. It computes prompts' KV caches with the engine of `pd-common`
//! (batched under a token budget, long prompts in chunks), ships each layer into the decode
//! worker's reserved blocks as soon as it is computed, and answers with the first token.

mod backlog;
mod service;

use std::net::SocketAddr;
use std::time::Duration;

use pd_common::engine::{EngineConfig, EngineCore, EngineHandle};
use pd_common::membership::MembershipConfig;
use pd_common::node::{self, KvTransfer, Listeners, ModelArgs, RequestTasks, ShutdownArgs, Worker};
use pd_common::rpc::RpcConfig;
use pd_common::telemetry::{self, LogFormat};
use pd_common::transfer;
use pd_common::Result;
use pd_proto::v1::node_server::NodeServer;
use pd_proto::v1::prefill_server::PrefillServer;
use pd_proto::v1::NodeRole;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

pub use service::PrefillService;

/// Everything a prefill node can be told; every flag has a default.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "pd-prefill", version, about = "pd-cluster prefill worker")]
pub struct PrefillConfig {
    /// gRPC listen address (Prefill, Node, grpc.health.v1). Port 0 picks a free port.
    #[arg(long, env = "PD_PREFILL_LISTEN", default_value = "0.0.0.0:50061")]
    pub listen: SocketAddr,

    /// host:port that other nodes use to reach this one, or `auto`: this host's own address
    /// (a container's or pod's) with the listen port. Default: the listen address, with
    /// 127.0.0.1 for 0.0.0.0.
    #[arg(long, env = "PD_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// Prometheus /metrics listen address.
    #[arg(long, env = "PD_METRICS_LISTEN", default_value = "0.0.0.0:9161")]
    pub metrics_listen: SocketAddr,

    /// This node's id in the cluster (default: prefill-<random>).
    #[arg(long, env = "PD_NODE_ID")]
    pub node_id: Option<String>,

    /// Deadline of a prefill whose caller sets none, and the longest a caller may ask for, in
    /// milliseconds.
    #[arg(long, env = "PD_PREFILL_DEADLINE_MS", default_value_t = 30_000)]
    pub prefill_deadline_ms: u64,

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

/// Runs a prefill node on its listeners until `shutdown` is cancelled, then drains: stops taking
/// requests, leaves etcd, lets prefills in progress finish (up to the drain timeout) and returns.
pub async fn run(
    config: PrefillConfig,
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
        .unwrap_or_else(|| node::new_node_id("prefill"));
    let grpc_address = node::advertised(
        listeners.grpc.local_addr()?,
        config.advertise_address.as_deref(),
    )?;
    let tasks = RequestTasks::new(&shutdown);
    let service = PrefillService::new(
        engine.clone(),
        tasks.clone(),
        service::Options {
            node_id: node_id.clone(),
            fingerprint: fingerprint.clone(),
            deadline: Duration::from_millis(config.prefill_deadline_ms),
            rpc: config.rpc.clone(),
            #[cfg(feature = "nccl")]
            nccl: config.nccl.clone(),
        },
    );
    let routes =
        Routes::new(PrefillServer::new(service.clone())).add_service(NodeServer::new(service));
    let worker = Worker {
        role: NodeRole::Prefill,
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
    let health_name = <PrefillServer<PrefillService> as NamedService>::NAME;
    worker.serve(listeners, routes, health_name, shutdown).await
}

/// Binds the listeners of `config` and runs the node until SIGINT/SIGTERM.
pub async fn main_with(config: PrefillConfig) -> Result<()> {
    telemetry::init_tracing(config.log_format);
    let listeners = Listeners {
        grpc: TcpListener::bind(config.listen).await?,
        metrics: TcpListener::bind(config.metrics_listen).await?,
    };
    let shutdown = CancellationToken::new();
    node::cancel_on_signals(shutdown.clone());
    run(config, listeners, shutdown).await
}
