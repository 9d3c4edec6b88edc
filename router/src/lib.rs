//! pd-router: the front door of the cluster. It serves the gRPC `Generation` API and an
//! OpenAI-compatible HTTP API, turns requests into token ids, picks a decode node (and the
//! prefill nodes it may use) from the membership in etcd and the nodes' live load, relays the
//! tokens, and resumes a request on another decode node when one fails mid-stream.

mod admission;
mod dispatch;
mod edge_tls;
mod frontend;
#[doc(hidden)]
pub mod fuzzing;
mod grpc;
mod http;
mod kv_index;
mod outcome;
mod pool;

use std::net::SocketAddr;
use std::time::Duration;

use pd_common::membership::MembershipConfig;
use pd_common::model;
use pd_common::node::{self, ModelArgs, ReadyLine};
use pd_common::rpc::{ClientFaultCodes, RpcConfig};
use pd_common::telemetry::{self, LogFormat};
use pd_common::Result;
use pd_proto::v1::generation_server::GenerationServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use admission::{Admission, AdmissionConfig};

/// Most gRPC streams one client connection may have open at once (more wait for a slot).
const MAX_STREAMS_PER_CONNECTION: u32 = 1024;
pub use dispatch::{Dispatcher, Job};
pub use edge_tls::EdgeTlsConfig;
pub use pool::{RouterMode, Routing};

/// Everything a router can be told; every flag has a default.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pd-router",
    version,
    about = "pd-cluster router: gRPC and OpenAI-compatible HTTP APIs"
)]
pub struct RouterConfig {
    /// HTTP listen address (OpenAI API, /health, /live, /metrics). Port 0 picks a free port.
    #[arg(long, env = "PD_HTTP_LISTEN", default_value = "0.0.0.0:8000")]
    pub http_listen: SocketAddr,

    /// gRPC listen address (pd.v1.Generation, grpc.health.v1).
    #[arg(long, env = "PD_ROUTER_GRPC_LISTEN", default_value = "0.0.0.0:50051")]
    pub grpc_listen: SocketAddr,

    /// The name clients use for the model (default: the model file's name without extension,
    /// or the dummy shape).
    #[arg(long, env = "PD_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,

    /// Largest HTTP request body in bytes; larger ones get 413.
    #[arg(long, env = "PD_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,

    /// Largest gRPC request message in bytes; larger ones get RESOURCE_EXHAUSTED.
    #[arg(long, env = "PD_MAX_GRPC_MESSAGE_BYTES", default_value_t = 4 << 20)]
    pub max_grpc_message_bytes: usize,

    /// This router's id (default: router-<random>).
    #[arg(long, env = "PD_NODE_ID")]
    pub node_id: Option<String>,

    /// On shutdown, how long open streams may take to end before the router exits, in seconds.
    #[arg(long, env = "PD_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    pub drain_timeout_secs: u64,

    /// A node that does not answer a load poll (`Node.Stats`) within this is skipped for that
    /// round, in milliseconds.
    #[arg(long, env = "PD_STATS_TIMEOUT_MS", default_value_t = 500)]
    pub stats_timeout_ms: u64,

    /// How prefill nodes are chosen: `kv` costs each the prompt tokens its prefix cache lacks
    /// (from the nodes' cache event streams) plus the prompt tokens queued on it; `load` looks
    /// at the queue only.
    #[arg(long, env = "PD_ROUTER_MODE", value_enum, default_value_t = RouterMode::Kv)]
    pub router_mode: RouterMode,

    /// In `kv` mode, the weight of a prompt token a prefill node would compute against one
    /// already queued on it (as Dynamo's flag of this name). 0 routes by load alone.
    #[arg(long, env = "PD_KV_OVERLAP_SCORE_WEIGHT", default_value_t = 1.0)]
    pub kv_overlap_score_weight: f64,

    /// Log line format.
    #[arg(long, env = "PD_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// How long a client may take to send an HTTP request's headers, in seconds; slower
    /// connections are closed.
    #[arg(long, env = "PD_HTTP_HEADER_READ_TIMEOUT_SECS", default_value_t = 10)]
    pub http_header_read_timeout_secs: u64,

    #[command(flatten)]
    pub admission: AdmissionConfig,

    #[command(flatten)]
    pub edge_tls: EdgeTlsConfig,

    #[command(flatten)]
    pub model: ModelArgs,

    #[command(flatten)]
    pub rpc: RpcConfig,

    #[command(flatten)]
    pub membership: MembershipConfig,
}

/// Runs the router until `shutdown`: then it stops taking requests and lets open streams end
/// (bounded), and returns.
pub async fn run(
    config: RouterConfig,
    http_listener: TcpListener,
    grpc_listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    let prometheus = telemetry::install_metrics()?;
    let admission = Admission::new(&config.admission)?;
    let edge_tls = edge_tls::EdgeTls::load(&config.edge_tls)?;
    let source = config.model.source()?;
    let text = model::load_text(&source)?;
    let model_name = config
        .served_model_name
        .clone()
        .unwrap_or_else(|| default_model_name(&source));
    let stop = CancellationToken::new();
    let pool = pool::Pool::start(
        config.membership.clone(),
        config.rpc.clone(),
        Duration::from_millis(config.stats_timeout_ms),
        Routing {
            mode: config.router_mode,
            kv_overlap_score_weight: config.kv_overlap_score_weight,
        },
        stop.clone(),
    );
    let tokenizer = text.tokenizer.clone();
    let frontend = frontend::Frontend::new(model_name.clone(), text, Some(pool.clone()));
    let dispatcher = Dispatcher::new(pool.clone(), tokenizer);

    let http_addr = node::advertised(http_listener.local_addr()?, None)?;
    let grpc_addr = node::advertised(grpc_listener.local_addr()?, None)?;
    let app = http::router(http::AppState {
        frontend: frontend.clone(),
        dispatcher: dispatcher.clone(),
        pool: pool.clone(),
        metrics: prometheus,
        admission: admission.clone(),
        max_body_bytes: config.max_body_bytes,
    });
    let tls_acceptor = edge_tls.as_ref().map(|t| t.acceptor());
    let http_server = tokio::spawn(http::serve(
        http_listener,
        app,
        tls_acceptor,
        Duration::from_secs(config.http_header_read_timeout_secs.max(1)),
        shutdown.clone(),
    ));

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<GenerationServer<grpc::GenerationService>>()
        .await;
    let generation = GenerationServer::new(grpc::GenerationService {
        frontend: frontend.clone(),
        dispatcher: dispatcher.clone(),
        admission,
        pool: pool.clone(),
    })
    .max_decoding_message_size(config.max_grpc_message_bytes);
    // The client API is not the cluster's own: its TLS is the client edge's, not mTLS.
    let mut grpc_server = config.rpc.without_tls().server()?;
    if let Some(tls) = &edge_tls {
        grpc_server = grpc_server
            .tls_config(tls.grpc())
            .map_err(|e| pd_common::Error::invalid(format!("TLS of the gRPC API: {e}")))?;
    }
    let grpc_server = grpc_server
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .layer(ClientFaultCodes)
        .add_service(health_service)
        .add_service(generation)
        .serve_with_incoming_shutdown(
            RpcConfig::incoming(grpc_listener),
            shutdown.clone().cancelled_owned(),
        );
    let grpc_server = tokio::spawn(grpc_server);

    let node_id = config
        .node_id
        .clone()
        .unwrap_or_else(|| node::new_node_id("router"));
    ReadyLine {
        event: "ready".into(),
        role: "router".into(),
        node_id,
        grpc: grpc_addr.clone(),
        metrics: http_addr.clone(),
        http: http_addr.clone(),
    }
    .print();
    tracing::info!(http = %http_addr, grpc = %grpc_addr, model = %model_name, "router serving");

    shutdown.cancelled().await;
    health_reporter
        .set_not_serving::<GenerationServer<grpc::GenerationService>>()
        .await;
    // Both servers stop accepting at once and wait for open requests; bound the wait.
    let drain = Duration::from_secs(config.drain_timeout_secs);
    let _ = tokio::time::timeout(drain, async {
        let _ = http_server.await;
        let _ = grpc_server.await;
    })
    .await;
    stop.cancel();
    tracing::info!("router stopped");
    Ok(())
}

fn default_model_name(source: &model::ModelSource) -> String {
    match source {
        model::ModelSource::Gguf(path) | model::ModelSource::HfDir(path) => path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| source.to_string()),
        model::ModelSource::Dummy { shape, .. } => format!("dummy-{shape}"),
    }
}

/// Binds the listeners of `config` and runs the router until SIGINT/SIGTERM.
pub async fn main_with(config: RouterConfig) -> Result<()> {
    telemetry::init_tracing(config.log_format);
    let http = TcpListener::bind(config.http_listen).await?;
    let grpc = TcpListener::bind(config.grpc_listen).await?;
    let shutdown = CancellationToken::new();
    node::cancel_on_signals(shutdown.clone());
    run(config, http, grpc, shutdown).await
}
