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

/// Which weights a node serves.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ModelArgs {
    /// A GGUF file, a Hugging Face folder, or `dummy:<shape>[:<seed>]`. Default: the SmolLM2
    /// GGUF that deploy/fetch-model.sh fetches.
    #[arg(long, env = "PD_MODEL")]
    pub model: Option<String>,
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
        tracing::info!(model = %source, "loading model");
        model::load(&source, &candle_core::Device::Cpu)
    }
}

/// The address peers reach a listener at: `advertise` when given, else the bound address with
/// an unspecified IP (0.0.0.0) replaced by loopback.
pub fn advertised(bound: SocketAddr, advertise: Option<&str>) -> String {
    match advertise {
        Some(a) if !a.is_empty() => a.to_string(),
        _ if bound.ip().is_unspecified() => format!("127.0.0.1:{}", bound.port()),
        _ => bound.to_string(),
    }
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
pub async fn publish_engine_gauges(engine: crate::engine::EngineHandle, stop: CancellationToken) {
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
pub async fn drain_engine(engine: &crate::engine::EngineHandle, timeout: std::time::Duration) {
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
pub async fn stop_engine(
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
