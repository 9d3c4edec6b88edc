//! What every node binary does the same way: load the model named on the command line, find
//! the address peers should use, serve `/metrics`, announce readiness, and turn SIGINT/SIGTERM
//! into a cancellation.

use std::net::SocketAddr;

use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::model::{self, LoadedModel, ModelSource};
use crate::Result;

mod advertise;

/// Which weights a node serves.
#[derive(Debug, Clone, clap::Args)]
pub struct ModelArgs {
    /// A GGUF file, a Hugging Face folder, or `dummy:<shape>[:<seed>]`. Default: the SmolLM2
    /// GGUF that deploy/fetch-model.sh fetches.
    #[arg(long, env = "PD_MODEL")]
    pub model: Option<String>,

    /// Where the model runs: `cpu`, `cuda` or `cuda:N` (GPU builds only).
    #[arg(long, env = "PD_DEVICE", default_value = "cpu")]
    pub device: String,

    /// Weights and activations on a GPU: `bf16` (default) or `f32`. The CPU computes in f32.
    #[arg(long, env = "PD_DTYPE", value_enum, default_value_t = ModelDtype::Auto)]
    pub dtype: ModelDtype,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelDtype {
    /// f32 on the CPU, bf16 on a GPU.
    #[default]
    Auto,
    Bf16,
    F32,
}

impl Default for ModelArgs {
    fn default() -> Self {
        Self {
            model: None,
            device: "cpu".into(),
            dtype: ModelDtype::Auto,
        }
    }
}

impl ModelArgs {
    pub fn source(&self) -> Result<ModelSource> {
        match &self.model {
            Some(m) => m.parse(),
            None => Ok(ModelSource::Gguf(model::default_model_path())),
        }
    }

    pub fn load(&self) -> Result<LoadedModel> {
        let source = self.source()?;
        let device = model::open_device(&self.device)?;
        let dtype = match self.dtype {
            ModelDtype::Auto => model::load::activation_dtype(&device),
            ModelDtype::Bf16 => candle_core::DType::BF16,
            ModelDtype::F32 => candle_core::DType::F32,
        };
        tracing::info!(model = %source, device = %self.device, ?dtype, "loading model");
        model::load_as(&source, &device, dtype)
    }
}

/// The address peers reach a listener at: `advertise` when given (`auto`: this host's own
/// address with the bound port), else the bound address with an unspecified IP replaced by
/// loopback.
pub fn advertised(bound: SocketAddr, advertise: Option<&str>) -> Result<String> {
    Ok(match advertise {
        Some(advertise::AUTO) => advertise::join_host_port(advertise::own_ip()?, bound.port()),
        Some(a) if !a.is_empty() => a.to_string(),
        _ if bound.ip().is_unspecified() => {
            advertise::join_host_port(advertise::loopback(bound.ip()), bound.port())
        }
        _ => bound.to_string(),
    })
}

/// Serves the Prometheus text at `/metrics` until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    handle: PrometheusHandle,
    shutdown: CancellationToken,
) -> Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let handle = handle.clone();
            async move { handle.render() }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await?;
    Ok(())
}

/// The one line a node prints on stdout once it serves: launchers and tests read the bound
/// addresses from it (a port of 0 picks a free one).
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct ReadyLine {
    pub event: String,
    pub role: String,
    pub node_id: String,
    /// gRPC address peers use.
    pub grpc: String,
    /// Address of `/metrics` (for the router: its HTTP API, which serves `/metrics` too).
    pub metrics: String,
    /// The router's OpenAI-style HTTP API; empty for other nodes.
    #[serde(default)]
    pub http: String,
}

impl ReadyLine {
    pub fn print(&self) {
        use std::io::Write;
        if let Ok(line) = serde_json::to_string(self) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

/// Cancels `token` on SIGINT or SIGTERM.
pub fn cancel_on_signals(token: CancellationToken) {
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            match signal(SignalKind::terminate()) {
                Ok(mut term) => {
                    tokio::select! {
                        _ = ctrl_c => {}
                        _ = term.recv() => {}
                    }
                }
                Err(_) => {
                    let _ = ctrl_c.await;
                }
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown requested");
        token.cancel();
    });
}

/// How a node names its device in etcd: `cpu` or `cuda:N`.
pub fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The KV transfer backends a node on `device` offers: gRPC always; NCCL in a build with the
/// `nccl` feature whose engine runs on a GPU, unless `allowed` says gRPC only.
pub fn transfer_backends(device: &candle_core::Device, allowed: KvTransfer) -> Vec<String> {
    let mut backends = vec!["grpc".to_string()];
    if cfg!(feature = "nccl") && device.is_cuda() && allowed == KvTransfer::Auto {
        backends.push("nccl".into());
    }
    backends
}

/// A node id: `<role>-<8 hex digits>`.
pub fn new_node_id(role: &str) -> String {
    format!("{role}-{:08x}", rand::random::<u32>())
}

/// Registers `info` in etcd, retrying while etcd is unreachable, until registered or `cancel`.
/// A node serves meanwhile (reachable directly); it joins the cluster once etcd answers.
pub async fn announce(
    config: &crate::membership::MembershipConfig,
    info: &pd_proto::v1::NodeInfo,
    cancel: &CancellationToken,
) -> Option<crate::membership::Registration> {
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        match crate::membership::Registration::register(config, info).await {
            Ok(r) => return Some(r),
            Err(e) => tracing::warn!(error = %e, "cannot register in etcd yet; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(std::time::Duration::from_secs(2));
    }
}

/// Keeps the engine gauges current until `stop`.
async fn publish_engine_gauges(engine: crate::engine::EngineHandle, stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(500));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match engine.stats().await {
            Ok(s) => crate::telemetry::record_engine_stats(&s),
            Err(_) => return,
        }
    }
}

/// Waits until the engine holds no sequence, or `timeout` passes (checking every 50 ms).
async fn drain_engine(engine: &crate::engine::EngineHandle, timeout: std::time::Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while let Ok(s) = engine.stats().await {
        if s.running + s.waiting + s.awaiting_kv == 0 || tokio::time::Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// The last phase of a node's shutdown, after its drain: requests still running fail with
/// `Unavailable` (the router resumes them elsewhere), the gRPC server gets a moment to flush
/// those last messages, and the engine thread gets a bounded time to end.
async fn stop_engine(
    engine: crate::engine::EngineHandle,
    engine_thread: std::thread::JoinHandle<()>,
    server: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    serving: CancellationToken,
) {
    let _ = engine.abort_all().await;
    serving.cancel();
    let abort = server.abort_handle();
    if tokio::time::timeout(std::time::Duration::from_secs(2), server)
        .await
        .is_err()
    {
        abort.abort();
    }
    drop(engine);
    let joined = tokio::task::spawn_blocking(move || engine_thread.join());
    if tokio::time::timeout(std::time::Duration::from_secs(5), joined)
        .await
        .is_err()
    {
        tracing::warn!("the engine thread did not end in time");
    }
}

/// `Node.Stats` of a worker from its engine's figures. Sequences awaiting remote KV hold blocks
/// and a place in the batch, so they count as running.
pub fn node_stats(
    node_id: &str,
    role: pd_proto::v1::NodeRole,
    s: &crate::engine::EngineStats,
) -> pd_proto::v1::NodeStats {
    pd_proto::v1::NodeStats {
        node_id: node_id.to_string(),
        role: role as i32,
        queued_prompt_tokens: s.pending_tokens as u64,
        running_sequences: (s.running + s.awaiting_kv) as u32,
        waiting_sequences: s.waiting as u32,
        free_kv_blocks: s.free_blocks as u32,
        total_kv_blocks: s.total_blocks as u32,
    }
}

/// The life of a worker node (prefill or decode) apart from its own services: serve them with
/// `grpc.health.v1` and `/metrics`, announce readiness and register in etcd, and on shutdown
/// drain in phases (leave etcd, turn health off, stop admitting, let the engine finish up to
/// the drain timeout, hand off the rest).
pub struct Worker {
    pub role: pd_proto::v1::NodeRole,
    pub node_id: String,
    /// The address peers dial.
    pub grpc_address: String,
    pub fingerprint: pd_proto::v1::ModelFingerprint,
    pub engine: crate::engine::EngineHandle,
    pub engine_thread: std::thread::JoinHandle<()>,
    pub membership: crate::membership::MembershipConfig,
    pub drain_timeout: std::time::Duration,
    pub kv_transfer: KvTransfer,
}

/// Which KV transfer backends a node offers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KvTransfer {
    /// gRPC, and NCCL where this build and device allow it.
    #[default]
    Auto,
    /// gRPC only.
    Grpc,
}

impl Worker {
    /// Serves `routes` on `listener` until `shutdown`, then drains and returns. `health_name`
    /// is the service whose health flips to NOT_SERVING when draining starts; `stop_admitting`
    /// makes the services refuse new work.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics: TcpListener,
        routes: tonic::service::Routes,
        health_name: &'static str,
        stop_admitting: impl FnOnce(),
        shutdown: CancellationToken,
    ) -> Result<()> {
        use tonic_health::ServingStatus;
        let prometheus = crate::telemetry::install_metrics()?;
        let metrics_address = advertise::metrics_address(metrics.local_addr()?, &self.grpc_address);
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(health_name, ServingStatus::Serving)
            .await;
        let serving = CancellationToken::new();
        let server = crate::rpc::server()
            .add_routes(routes.add_service(health_service))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                serving.clone().cancelled_owned(),
            );
        let server = tokio::spawn(server);
        let metrics_server = tokio::spawn(serve_metrics(metrics, prometheus, serving.clone()));
        let gauges = tokio::spawn(publish_engine_gauges(self.engine.clone(), serving.clone()));

        let role = crate::membership::role_segment(self.role).unwrap_or("node");
        let spec = self.engine.cache().spec();
        let device = self.engine.cache().layer(0)?.0.device().clone();
        let info = pd_proto::v1::NodeInfo {
            node_id: self.node_id.clone(),
            role: self.role as i32,
            address: self.grpc_address.clone(),
            metrics_address: metrics_address.clone(),
            fingerprint: Some(self.fingerprint.clone()),
            kv_blocks_total: spec.num_blocks as u32,
            max_model_len: self.engine.max_model_len() as u32,
            device: device_name(&device),
            version: env!("CARGO_PKG_VERSION").into(),
            transfer_backends: transfer_backends(&device, self.kv_transfer),
        };
        ReadyLine {
            event: "ready".into(),
            role: role.into(),
            node_id: self.node_id.clone(),
            grpc: self.grpc_address.clone(),
            metrics: metrics_address,
            http: String::new(),
        }
        .print();
        tracing::info!(node_id = %self.node_id, address = %self.grpc_address,
            blocks = spec.num_blocks, "{role} node serving");

        let registration = tokio::select! {
            r = announce(&self.membership, &info, &shutdown) => r,
            _ = shutdown.cancelled() => None,
        };
        shutdown.cancelled().await;

        // Leave the cluster first so the router stops sending, then refuse new work and let
        // what runs finish.
        if let Some(r) = registration {
            if let Err(e) = r.deregister().await {
                tracing::warn!(error = %e, "deregistering failed; the lease will lapse");
            }
        }
        health
            .set_service_status(health_name, ServingStatus::NotServing)
            .await;
        stop_admitting();
        drain_engine(&self.engine, self.drain_timeout).await;
        stop_engine(self.engine, self.engine_thread, server, serving).await;
        let _ = gauges.await;
        let _ = metrics_server.await;
        tracing::info!("{role} node stopped");
        Ok(())
    }
}
