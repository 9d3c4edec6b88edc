//! `KvTransfer` as a decode node serves it: a `Push` stream opens one expected transfer with its
//! handshake, then each chunk is written into the reservation, by the bytes it carries (gRPC) or
//! by a receive over the NCCL link it names. `NcclConnect` joins links that prefill nodes open.

use std::future::Future;
use std::sync::Arc;

use pd_proto::v1::kv_push_message::Message as PushMessage;
use pd_proto::v1::kv_transfer_server::KvTransfer;
use pd_proto::v1::{KvPushAck, KvPushMessage, NcclConnectReply, NcclConnectRequest};
use tonic::{Request, Response, Status, Streaming};

use super::framing::{KvTransferRoutes, PushMessages};
use super::reservation::KvReceiver;
use super::TransferBackend;
use crate::telemetry::names;

/// Chunks of one push being verified and written at once while later ones arrive.
const WRITES_IN_FLIGHT: usize = 4;
/// Chunks up to this size going into host memory are verified and written on the async worker
/// that read them: a few tens of microseconds of work, less than handing them to another thread.
const INLINE_WRITE_BYTES: usize = 512 << 10;

/// The outcome of one chunk's write.
async fn written(
    write: Option<tokio::task::JoinHandle<crate::Result<usize>>>,
) -> crate::Result<usize> {
    match write {
        Some(w) => w
            .await
            .map_err(|e| crate::Error::Internal(format!("KV write task: {e}")))?,
        None => Ok(0),
    }
}

/// `KvTransfer` as served by a decode node.
#[derive(Clone)]
pub struct KvTransferService {
    receiver: Arc<KvReceiver>,
    /// NCCL links prefill nodes opened to this node, by link id.
    #[cfg(feature = "nccl")]
    links: Arc<super::nccl::Links>,
    #[cfg(feature = "nccl")]
    nccl: super::nccl::NcclConfig,
}

impl KvTransferService {
    pub fn new(receiver: Arc<KvReceiver>) -> Self {
        Self {
            receiver,
            #[cfg(feature = "nccl")]
            links: Arc::default(),
            #[cfg(feature = "nccl")]
            nccl: Default::default(),
        }
    }

    /// The NCCL links this node joins use `nccl`'s timeouts.
    #[cfg(feature = "nccl")]
    pub fn with_nccl(mut self, nccl: super::nccl::NcclConfig) -> Self {
        self.nccl = nccl;
        self
    }

    /// The gRPC service: `Push` read without copying KV bytes ([`super::framing`]), the rest
    /// through tonic, with message limits sized for KV chunks.
    pub fn into_server(self) -> KvTransferRoutes {
        KvTransferRoutes::new(self)
    }

    /// Serves one `Push` stream from `peer` (its IP, which labels the link's figures).
    pub(crate) async fn receive(
        &self,
        peer: &str,
        stream: &mut impl PushStream,
    ) -> Result<KvPushAck, Status> {
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty KV push: no handshake"))?;
        let Some(PushMessage::Handshake(handshake)) = first.message else {
            return Err(Status::invalid_argument(
                "a KV push must start with a handshake",
            ));
        };
        let transfer = self.receiver.open(&handshake).inspect_err(|e| {
            tracing::warn!(request_id = %handshake.request_id, error = %e, "KV handshake refused");
        })?;
        let backend = TransferBackend::from_wire(handshake.backend)?;
        #[cfg(feature = "nccl")]
        let link = match backend {
            TransferBackend::Nccl => Some(self.links.get_or_refuse(&handshake.nccl_link)?),
            TransferBackend::Grpc => None,
        };
        #[cfg(not(feature = "nccl"))]
        if backend == TransferBackend::Nccl {
            return Err(Status::unimplemented("this node was built without NCCL"));
        }
        let mut ack = KvPushAck::default();
        let mut first_chunk = None;
        let refused = |e: crate::Error| {
            metrics::counter!(names::KV_TRANSFER_FAILURES_TOTAL, "direction" => "received")
                .increment(1);
            tracing::warn!(request_id = %handshake.request_id, error = %e, "KV chunk refused");
            Status::from(e)
        };
        // gRPC chunks are verified and written off the async workers while the next ones
        // arrive; a few at a time, acknowledged in order.
        let mut writing = std::collections::VecDeque::new();
        let host_cache = transfer
            .cache()
            .layer(0)
            .map(|(k, _)| k.device().is_cpu())
            .map_err(|e| Status::from(crate::Error::from(e)))?;
        while let Some(message) = stream.message().await? {
            first_chunk.get_or_insert_with(std::time::Instant::now);
            let Some(PushMessage::Chunk(chunk)) = message.message else {
                return Err(Status::invalid_argument(
                    "only chunks may follow the handshake",
                ));
            };
            #[cfg(feature = "nccl")]
            if let Some(link) = &link {
                let written = super::nccl::receive_chunk(link, &transfer, &chunk)
                    .await
                    .map_err(refused)?;
                ack.chunks += 1;
                ack.bytes += written as u64;
                continue;
            }
            if host_cache
                && writing.is_empty()
                && chunk.keys.len() + chunk.values.len() <= INLINE_WRITE_BYTES
            {
                ack.bytes += transfer.write(&chunk).map_err(refused)? as u64;
                ack.chunks += 1;
                continue;
            }
            let transfer = transfer.clone();
            writing.push_back(tokio::task::spawn_blocking(move || transfer.write(&chunk)));
            while writing.len() > WRITES_IN_FLIGHT {
                ack.bytes += written(writing.pop_front()).await.map_err(refused)? as u64;
                ack.chunks += 1;
            }
        }
        while !writing.is_empty() {
            ack.bytes += written(writing.pop_front()).await.map_err(refused)? as u64;
            ack.chunks += 1;
        }
        if let Some(first) = first_chunk {
            let seconds = first.elapsed().as_secs_f64();
            crate::telemetry::record_link("received", backend, peer, ack.bytes, seconds);
        }
        Ok(ack)
    }
}

/// Where a push's messages come from: [`PushMessages`] as our server reads them, or tonic's
/// decoder.
pub(crate) trait PushStream: Send {
    fn message(&mut self) -> impl Future<Output = Result<Option<KvPushMessage>, Status>> + Send;
}

impl PushStream for PushMessages {
    fn message(&mut self) -> impl Future<Output = Result<Option<KvPushMessage>, Status>> + Send {
        PushMessages::message(self)
    }
}

impl PushStream for Streaming<KvPushMessage> {
    fn message(&mut self) -> impl Future<Output = Result<Option<KvPushMessage>, Status>> + Send {
        Streaming::message(self)
    }
}

#[tonic::async_trait]
impl KvTransfer for KvTransferService {
    /// Reached only where tonic's generated server is mounted directly: ours routes `Push` to
    /// [`PushMessages`].
    async fn push(
        &self,
        request: Request<Streaming<KvPushMessage>>,
    ) -> Result<Response<KvPushAck>, Status> {
        let peer = request
            .remote_addr()
            .map(|a| a.ip().to_string())
            .unwrap_or_else(|| "unknown".into());
        let ack = self.receive(&peer, &mut request.into_inner()).await?;
        Ok(Response::new(ack))
    }

    async fn nccl_connect(
        &self,
        request: Request<NcclConnectRequest>,
    ) -> Result<Response<NcclConnectReply>, Status> {
        #[cfg(feature = "nccl")]
        {
            let request = request.into_inner();
            let link_id = request.link_id.clone();
            super::nccl::join(&self.links, &self.nccl, &self.receiver, request)
                .await
                .inspect_err(|e| {
                    tracing::warn!(link = %link_id, error = %e, "NCCL link refused");
                })?;
            tracing::info!(link = %link_id, "NCCL link joined");
            Ok(Response::new(NcclConnectReply {}))
        }
        #[cfg(not(feature = "nccl"))]
        {
            let _ = request;
            Err(Status::unimplemented("this node was built without NCCL"))
        }
    }
}
