//! The life of a worker node (prefill or decode) apart from its own services: serve them with
//! `grpc.health.v1` and `/metrics`, announce readiness and register in etcd, and on shutdown
//! drain in phases: refuse new work and leave etcd at once, let requests in flight finish up to
//! the drain timeout, hand the rest off (they fail with UNAVAILABLE and the router resumes them
//! elsewhere), then stop the servers and the engine within the shutdown grace.

use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::advertise;
use super::args::{KvTransfer, ShutdownArgs};
use super::lifecycle::RequestTasks;
use super::ready::{device_name, ReadyLine};
use crate::engine::{EngineHandle, EngineStats};
use crate::membership::{MembershipConfig, Registration};
use crate::rpc::RpcConfig;
use crate::transfer::TransferBackend;
use crate::Result;
use pd_proto::v1 as pb;

/// How often the engine gauges of `/metrics` are refreshed.
const GAUGE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);

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

/// The KV transfer backends a node on `device` offers: gRPC always; NCCL in a build with the
/// `nccl` feature whose engine runs on a GPU, unless `allowed` says gRPC only.
pub fn transfer_backends(
    device: &candle_core::Device,
    allowed: KvTransfer,
) -> Vec<TransferBackend> {
    let mut backends = vec![TransferBackend::Grpc];
    if cfg!(feature = "nccl") && device.is_cuda() && allowed == KvTransfer::Auto {
        backends.push(TransferBackend::Nccl);
    }
    backends
}

/// Registers `info` in etcd, retrying while etcd is unreachable, until registered or `cancel`.
/// A node serves meanwhile (reachable directly); it joins the cluster once etcd answers.
pub async fn announce(
    config: &MembershipConfig,
    info: &pb::NodeInfo,
    cancel: &CancellationToken,
) -> Option<Registration> {
    let mut pause = std::time::Duration::from_millis(200);
    loop {
        match Registration::register(config, info).await {
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
async fn publish_engine_gauges(engine: EngineHandle, stop: CancellationToken) {
    let mut tick = tokio::time::interval(GAUGE_INTERVAL);
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

/// `Node.Stats` of a worker from its engine's figures. Sequences awaiting remote KV hold blocks
/// and a place in the batch, so they count as running.
pub fn node_stats(node_id: &str, role: pb::NodeRole, s: &EngineStats) -> pb::NodeStats {
    pb::NodeStats {
        node_id: node_id.to_string(),
        role: role as i32,
        queued_prompt_tokens: s.pending_tokens as u64,
        running_sequences: (s.running + s.awaiting_kv) as u32,
        waiting_sequences: s.waiting as u32,
        free_kv_blocks: s.free_blocks as u32,
        total_kv_blocks: s.total_blocks as u32,
        max_num_seqs: s.max_num_seqs as u32,
    }
}

/// A worker node ready to serve; see the module documentation.
pub struct Worker {
    pub role: pb::NodeRole,
    pub node_id: String,
    /// The address peers dial.
    pub grpc_address: String,
    pub fingerprint: pb::ModelFingerprint,
    pub engine: EngineHandle,
    pub engine_thread: std::thread::JoinHandle<()>,
    pub membership: MembershipConfig,
    pub shutdown: ShutdownArgs,
    pub rpc: RpcConfig,
    pub kv_transfer: KvTransfer,
    /// The tasks of the node's requests, which the drain waits for.
    pub tasks: RequestTasks,
}

/// What a worker serves besides its own services.
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: TcpListener,
}

impl Worker {
    /// Serves `routes` until `shutdown`, then drains and returns. `health_name` is the service
    /// whose health flips to NOT_SERVING when draining starts.
    pub async fn serve(
        self,
        listeners: Listeners,
        routes: tonic::service::Routes,
        health_name: &'static str,
        shutdown: CancellationToken,
    ) -> Result<()> {
        use tonic_health::ServingStatus;
        let prometheus = crate::telemetry::install_metrics()?;
        let metrics_address =
            advertise::metrics_address(listeners.metrics.local_addr()?, &self.grpc_address);
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_service_status(health_name, ServingStatus::Serving)
            .await;
        // Servers outlive the drain: they stop last, on their own token.
        let serving = CancellationToken::new();
        let server = self
            .rpc
            .server()?
            .layer(crate::rpc::ClientFaultCodes)
            .add_routes(routes.add_service(health_service))
            .serve_with_incoming_shutdown(
                RpcConfig::incoming(listeners.grpc),
                serving.clone().cancelled_owned(),
            );
        let server = tokio::spawn(server);
        let metrics_server = tokio::spawn(serve_metrics(
            listeners.metrics,
            prometheus,
            serving.clone(),
        ));
        let gauges = tokio::spawn(publish_engine_gauges(self.engine.clone(), serving.clone()));

        let role = crate::membership::role_segment(self.role).unwrap_or("node");
        let info = self.node_info(metrics_address.clone())?;
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
            blocks = info.kv_blocks_total, "{role} node serving");

        let registration = tokio::select! {
            r = announce(&self.membership, &info, &shutdown) => r,
            _ = shutdown.cancelled() => None,
        };
        shutdown.cancelled().await;

        // Admission stopped with the shutdown token; leave the cluster so the router stops
        // sending, then let what runs finish.
        if let Some(r) = registration {
            if let Err(e) = r.deregister().await {
                tracing::warn!(error = %e, "deregistering failed; the lease will lapse");
            }
        }
        health
            .set_service_status(health_name, ServingStatus::NotServing)
            .await;
        let grace = self.shutdown.grace();
        if !self.tasks.drain(self.shutdown.drain_timeout()).await {
            tracing::warn!(
                in_flight = self.tasks.in_flight(),
                "drain timeout passed; handing the rest off"
            );
            let _ = self.engine.abort_all().await;
            if !self.tasks.drain(grace).await {
                tracing::warn!(
                    in_flight = self.tasks.in_flight(),
                    "requests left unanswered"
                );
            }
        }
        serving.cancel();
        let abort = server.abort_handle();
        if tokio::time::timeout(grace, server).await.is_err() {
            abort.abort();
        }
        let _ = gauges.await;
        let _ = metrics_server.await;
        let (engine, thread) = (self.engine, self.engine_thread);
        drop(engine);
        let joined = tokio::task::spawn_blocking(move || thread.join());
        if tokio::time::timeout(grace, joined).await.is_err() {
            tracing::warn!("the engine thread did not end in time");
        }
        tracing::info!("{role} node stopped");
        Ok(())
    }

    /// What this node registers in etcd.
    fn node_info(&self, metrics_address: String) -> Result<pb::NodeInfo> {
        let spec = self.engine.cache().spec();
        let device = self.engine.cache().layer(0)?.0.device().clone();
        Ok(pb::NodeInfo {
            node_id: self.node_id.clone(),
            role: self.role as i32,
            address: self.grpc_address.clone(),
            metrics_address,
            fingerprint: Some(self.fingerprint.clone()),
            kv_blocks_total: spec.num_blocks as u32,
            max_model_len: self.engine.max_model_len() as u32,
            device: device_name(&device),
            version: env!("CARGO_PKG_VERSION").into(),
            transfer_backends: transfer_backends(&device, self.kv_transfer)
                .into_iter()
                .map(|b| b.to_wire() as i32)
                .collect(),
        })
    }
}
