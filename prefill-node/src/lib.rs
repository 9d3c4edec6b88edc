//! pd-prefill: the prefill worker. It computes prompts' KV caches with the engine of `pd-common`
//! (batched under a token budget, long prompts in chunks), ships each layer into the decode
//! worker's reserved blocks as soon as it is computed, and answers with the first token.

mod service;

use std::net::SocketAddr;
use std::time::Duration;

use pd_common::engine::{EngineConfig, EngineCore, EngineHandle};
use pd_common::membership::MembershipConfig;
use pd_common::node::{self, ModelArgs, ReadyLine};
use pd_common::telemetry::{self, LogFormat};
use pd_common::transfer;
use pd_common::Result;
use pd_proto::v1::node_server::NodeServer;
use pd_proto::v1::prefill_server::PrefillServer;
use pd_proto::v1::{NodeInfo, NodeRole};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use service::PrefillService;

/// Everything a prefill node can be told; every flag has a default.
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "pd-prefill", version, about = "pd-cluster prefill worker")]
pub struct PrefillConfig {
    /// gRPC listen address (Prefill, Node, grpc.health.v1). Port 0 picks a free port.
    #[arg(long, env = "PD_PREFILL_LISTEN", default_value = "0.0.0.0:50061")]
    pub listen: SocketAddr,

    /// host:port that other nodes use to reach this one (default: the listen address, with
    /// 127.0.0.1 for 0.0.0.0). Set it on multi-host deployments.
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
    let prometheus = telemetry::install_metrics()?;
    let loaded = config.model.load()?;
    let core = EngineCore::new(
        loaded.model.clone(),
        loaded.tokenizer.clone(),
        config.engine.clone(),
    )?;
    let spec = core.cache().spec().clone();
    let fingerprint = transfer::fingerprint(loaded.model.config(), &spec);
    let (engine, engine_thread) = EngineHandle::spawn(core)?;

    let node_id = config
        .node_id
        .clone()
        .unwrap_or_else(|| node::new_node_id("prefill"));
    let grpc_addr = node::advertised(listener.local_addr()?, config.advertise_address.as_deref());
    let metrics_addr = node::advertised(metrics.local_addr()?, None);
    let service = PrefillService::new(engine.clone(), node_id.clone(), fingerprint.clone());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<PrefillServer<PrefillService>>()
        .await;
    let serving = CancellationToken::new();
    let server = pd_common::rpc::server()
        .add_service(health_service)
        .add_service(PrefillServer::new(service.clone()))
        .add_service(NodeServer::new(service.clone()))
        .serve_with_incoming_shutdown(
            TcpListenerStream::new(listener),
            serving.clone().cancelled_owned(),
        );
    let server = tokio::spawn(server);
    let metrics_server = tokio::spawn(node::serve_metrics(metrics, prometheus, serving.clone()));
    let gauges = tokio::spawn(node::publish_engine_gauges(engine.clone(), serving.clone()));

    let info = NodeInfo {
        node_id: node_id.clone(),
        role: NodeRole::Prefill as i32,
        address: grpc_addr.clone(),
        metrics_address: metrics_addr.clone(),
        fingerprint: Some(fingerprint),
        kv_blocks_total: spec.num_blocks as u32,
        max_model_len: engine.max_model_len() as u32,
        device: "cpu".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        transfer_backends: vec!["grpc".into()],
    };
    ReadyLine {
        event: "ready".into(),
        role: "prefill".into(),
        node_id: node_id.clone(),
        grpc: grpc_addr.clone(),
        metrics: metrics_addr,
        http: String::new(),
    }
    .print();
    tracing::info!(node_id, address = %grpc_addr, blocks = spec.num_blocks, "prefill node serving");

    let membership = config.membership.clone();
    let registration = tokio::select! {
        r = node::announce(&membership, &info, &shutdown) => r,
        _ = shutdown.cancelled() => None,
    };
    shutdown.cancelled().await;

    // Drain: leave the cluster first so the router stops sending, then refuse new requests and
    // let running ones finish.
    if let Some(r) = registration {
        if let Err(e) = r.deregister().await {
            tracing::warn!(error = %e, "deregistering failed; the lease will lapse");
        }
    }
    health_reporter
        .set_not_serving::<PrefillServer<PrefillService>>()
        .await;
    service.stop_admitting();
    node::drain_engine(&engine, Duration::from_secs(config.drain_timeout_secs)).await;
    drop(service);
    node::stop_engine(engine, engine_thread, server, serving).await;
    let _ = gauges.await;
    let _ = metrics_server.await;
    tracing::info!("prefill node stopped");
    Ok(())
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
