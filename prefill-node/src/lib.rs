//! pd-prefill: the prefill worker. It computes prompts' KV caches with the engine of `pd-common`
//! (batched under a token budget, long prompts in chunks), ships each layer into the decode
//! worker's reserved blocks as soon as it is computed, and answers with the first token.

mod service;

use std::net::SocketAddr;
use std::time::Duration;

use pd_common::engine::{EngineConfig, EngineCore, EngineHandle};
use pd_common::membership::MembershipConfig;
use pd_common::node::{self, KvTransfer, ModelArgs, Worker};
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

    /// On shutdown, how long prefills in progress may take to finish before the node exits.
    #[arg(long, env = "PD_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,

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

/// Runs a prefill node on `listener` (gRPC) and `metrics` until `shutdown` is cancelled, then
/// drains: leaves etcd, stops taking requests, lets prefills in progress finish (up to the drain
/// timeout) and returns.
pub async fn run(
    config: PrefillConfig,
    listener: TcpListener,
    metrics: TcpListener,
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
    let grpc_address =
        node::advertised(listener.local_addr()?, config.advertise_address.as_deref())?;
    let service = PrefillService::new(engine.clone(), node_id.clone(), fingerprint.clone());
    let routes = Routes::new(PrefillServer::new(service.clone()))
        .add_service(NodeServer::new(service.clone()));
    let worker = Worker {
        role: NodeRole::Prefill,
        node_id,
        grpc_address,
        fingerprint,
        engine,
        engine_thread,
        membership: config.membership.clone(),
        drain_timeout: Duration::from_secs(config.drain_timeout_secs),
        kv_transfer: config.kv_transfer,
    };
    let health_name = <PrefillServer<PrefillService> as NamedService>::NAME;
    let stop_admitting = move || service.stop_admitting();
    worker
        .serve(
            listener,
            metrics,
            routes,
            health_name,
            stop_admitting,
            shutdown,
        )
        .await
}

/// Binds the listeners of `config` and runs the node until SIGINT/SIGTERM.
pub async fn main_with(config: PrefillConfig) -> Result<()> {
    telemetry::init_tracing(config.log_format);
    let listener = TcpListener::bind(config.listen).await?;
    let metrics = TcpListener::bind(config.metrics_listen).await?;
    let shutdown = CancellationToken::new();
    node::cancel_on_signals(shutdown.clone());
    run(config, listener, metrics, shutdown).await
}
