//! KV over gRPC: a prefill node streams [`KvChunk`]s into a decode node's `KvTransfer.Push`.
//!
//! The decode side ([`KvReceiver`]) only accepts a transfer it is expecting: [`KvReceiver::expect`]
//! registers the blocks reserved for a prompt under a fresh transfer id and returns a
//! [`TransferTicket`]. Chunks name blocks by their index in that reservation, are verified whole
//! (checksum, sizes, range) before a byte is written, and are refused once the ticket is dropped,
//! so a slow or half-dead sender can never write into blocks that were freed or handed to a retry.
//! The ticket knows when every layer of every block has arrived.
//!
//! The prefill side ([`push`]) opens the stream with a handshake carrying its fingerprint and
//! sends each layer as the engine exports it, so shipping overlaps the next layers' compute.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pd_proto::v1::kv_push_message::Message as PushMessage;
use pd_proto::v1::kv_transfer_client::KvTransferClient;
use pd_proto::v1::kv_transfer_server::{KvTransfer, KvTransferServer};
use pd_proto::v1::{
    KvHandshake, KvPushAck, KvPushMessage, ModelFingerprint, NcclConnectReply, NcclConnectRequest,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

use super::{check_fingerprint, chunk_from_tensors, decode_chunk_into};
use crate::engine::ExportedKv;
use crate::kv::{BlockId, KvCache};
use crate::telemetry::{names, with_request_id};

use crate::{Error, Result};

/// Largest gRPC message either side accepts: one layer's chunk of a long prompt of a large model
/// (Llama-3-8B: 2 MiB per 512 tokens).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Chunks converted but not yet sent: bounds the memory a slow link can pile up.
pub(crate) const SEND_QUEUE: usize = 16;

/// What arrived for one expected transfer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferStats {
    pub chunks: u32,
    pub bytes: u64,
    /// From the handshake to the last chunk.
    pub duration: Duration,
}

struct Transfer {
    blocks: Vec<BlockId>,
    /// Refuses chunks once the ticket is gone (finished, failed, timed out).
    open: bool,
    /// `received[layer][block]`.
    received: Vec<Vec<bool>>,
    stats: TransferStats,
    started: Option<Instant>,
}

/// The decode node's end: expects transfers and writes their chunks into the cache.
pub struct KvReceiver {
    cache: KvCache,
    fingerprint: ModelFingerprint,
    transfers: Mutex<HashMap<u64, Arc<Mutex<Transfer>>>>,
    next_id: AtomicU64,
    /// NCCL links prefill nodes opened to this node, by link id.
    #[cfg(feature = "nccl")]
    links: super::nccl::NcclLinks,
}

/// One expected transfer. Dropping it closes the transfer: later chunks are refused.
pub struct TransferTicket {
    id: u64,
    transfer: Arc<Mutex<Transfer>>,
    receiver: Arc<KvReceiver>,
}

impl KvReceiver {
    pub fn new(cache: KvCache, fingerprint: ModelFingerprint) -> Arc<Self> {
        Arc::new(Self {
            cache,
            fingerprint,
            transfers: Mutex::new(HashMap::new()),
            // Ids from a random start: a sender that kept an id from before a restart cannot
            // hit a new reservation by chance.
            next_id: AtomicU64::new(rand::random::<u64>() >> 1),
            #[cfg(feature = "nccl")]
            links: super::nccl::NcclLinks::default(),
        })
    }

    pub fn fingerprint(&self) -> &ModelFingerprint {
        &self.fingerprint
    }

    /// The cache chunks are written into.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Registers the blocks reserved for one prompt.
    pub fn expect(self: &Arc<Self>, blocks: Vec<BlockId>) -> TransferTicket {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let layers = self.cache.spec().num_layers;
        let transfer = Arc::new(Mutex::new(Transfer {
            received: vec![vec![false; blocks.len()]; layers],
            blocks,
            open: true,
            stats: TransferStats::default(),
            started: None,
        }));
        lock(&self.transfers).insert(id, transfer.clone());
        TransferTicket {
            id,
            transfer,
            receiver: self.clone(),
        }
    }

    /// Transfers currently expected.
    pub fn pending(&self) -> usize {
        lock(&self.transfers).len()
    }

    /// The gRPC service.
    pub fn service(self: &Arc<Self>) -> KvTransferServer<KvTransferService> {
        KvTransferServer::new(KvTransferService(self.clone()))
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    fn open(&self, handshake: &KvHandshake) -> Result<Arc<Mutex<Transfer>>> {
        let theirs = handshake
            .fingerprint
            .as_ref()
            .ok_or_else(|| Error::invalid("the KV handshake carries no fingerprint"))?;
        check_fingerprint(&self.fingerprint, theirs)?;
        let transfer = lock(&self.transfers)
            .get(&handshake.transfer_id)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no KV transfer {} is expected (finished, timed out or never made)",
                    handshake.transfer_id
                ))
            })?;
        let mut t = lock(&transfer);
        if t.blocks.len() != handshake.num_blocks as usize {
            return Err(Error::invalid(format!(
                "the sender expects {} blocks, the reservation has {}",
                handshake.num_blocks,
                t.blocks.len()
            )));
        }
        t.started.get_or_insert_with(Instant::now);
        drop(t);
        Ok(transfer)
    }

    fn write(&self, transfer: &Mutex<Transfer>, chunk: &pd_proto::v1::KvChunk) -> Result<usize> {
        // Holding the lock while writing: closing the ticket waits for a write in progress, so
        // no byte lands after the reservation was given up.
        let mut t = lock(transfer);
        if !t.open {
            return Err(Error::Cancelled(
                "the KV transfer was closed by the receiver".into(),
            ));
        }
        let bytes = decode_chunk_into(&self.cache, chunk, &t.blocks)?;
        mark(&mut t, chunk, bytes);
        Ok(bytes)
    }

    /// A chunk whose data comes over an NCCL link: received into a staging buffer, then written
    /// into the reserved blocks under the transfer's lock while it is open.
    #[cfg(feature = "nccl")]
    async fn write_nccl(
        &self,
        link: &super::nccl::NcclLink,
        transfer: &Arc<Mutex<Transfer>>,
        chunk: &pd_proto::v1::KvChunk,
    ) -> Result<usize> {
        let blocks = {
            let t = lock(transfer);
            if !t.open {
                return Err(Error::Cancelled(
                    "the KV transfer was closed by the receiver".into(),
                ));
            }
            super::chunk_blocks(self.cache.spec(), chunk, &t.blocks)?.to_vec()
        };
        let gate = Arc::new(TransferGate(transfer.clone()));
        let bytes = link
            .recv(self.cache.clone(), chunk.layer as usize, blocks, gate)
            .await?;
        mark(&mut lock(transfer), chunk, bytes);
        Ok(bytes)
    }

    /// Joins an NCCL link a prefill node opened (as rank 1).
    #[cfg(feature = "nccl")]
    async fn join_link(&self, request: NcclConnectRequest) -> Result<()> {
        let theirs = request
            .fingerprint
            .as_ref()
            .ok_or_else(|| Error::invalid("the NCCL connect request carries no fingerprint"))?;
        check_fingerprint(&self.fingerprint, theirs)?;
        let unique: [u8; 128] = request.unique_id.as_slice().try_into().map_err(|_| {
            Error::invalid(format!(
                "an NCCL unique id has 128 bytes, not {}",
                request.unique_id.len()
            ))
        })?;
        if request.link_id.is_empty() {
            return Err(Error::invalid("an NCCL link needs an id"));
        }
        let device = self.cache.layer(0)?.0.device().clone();
        let link = super::nccl::NcclLink::open(
            request.link_id.clone(),
            unique.map(|b| b as i8),
            1,
            &device,
        )
        .await?;
        self.links.insert(request.link_id, link);
        Ok(())
    }
}

fn mark(t: &mut Transfer, chunk: &pd_proto::v1::KvChunk, bytes: usize) {
    let first = chunk.first_block as usize;
    for block in first..first + chunk.num_blocks as usize {
        t.received[chunk.layer as usize][block] = true;
    }
    t.stats.chunks += 1;
    t.stats.bytes += bytes as u64;
    if let Some(started) = t.started {
        t.stats.duration = started.elapsed();
    }
    metrics::counter!(names::KV_TRANSFER_BYTES_TOTAL, "direction" => "received")
        .increment(bytes as u64);
}

/// An NCCL receive writes into the cache through this: under the transfer's lock, while open.
#[cfg(feature = "nccl")]
struct TransferGate(Arc<Mutex<Transfer>>);

#[cfg(feature = "nccl")]
impl super::nccl::Gate for TransferGate {
    fn while_open(&self, write: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        let t = lock(&self.0);
        if !t.open {
            return Err(Error::Cancelled(
                "the KV transfer was closed by the receiver".into(),
            ));
        }
        write()
    }
}

impl TransferTicket {
    /// The id a sender names in its handshake.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Whether every layer of every reserved block has arrived.
    pub fn is_complete(&self) -> bool {
        lock(&self.transfer)
            .received
            .iter()
            .all(|layer| layer.iter().all(|&b| b))
    }

    /// Closes the transfer; fails unless all of it arrived.
    pub fn finish(self) -> Result<TransferStats> {
        let mut t = lock(&self.transfer);
        t.open = false;
        let missing = t
            .received
            .iter()
            .map(|layer| layer.iter().filter(|&&b| !b).count())
            .sum::<usize>();
        if missing > 0 {
            return Err(Error::BadKvChunk(format!(
                "the transfer ended with {missing} (layer, block) pairs missing"
            )));
        }
        Ok(t.stats.clone())
    }
}

impl Drop for TransferTicket {
    fn drop(&mut self) {
        lock(&self.transfer).open = false;
        lock(&self.receiver.transfers).remove(&self.id);
    }
}

/// `KvTransfer` as served by a decode node.
pub struct KvTransferService(Arc<KvReceiver>);

#[tonic::async_trait]
impl KvTransfer for KvTransferService {
    async fn push(
        &self,
        request: Request<Streaming<KvPushMessage>>,
    ) -> Result<Response<KvPushAck>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty KV push: no handshake"))?;
        let Some(PushMessage::Handshake(handshake)) = first.message else {
            return Err(Status::invalid_argument(
                "a KV push must start with a handshake",
            ));
        };
        let receiver = &self.0;
        let transfer = receiver.open(&handshake).inspect_err(|e| {
            tracing::warn!(request_id = %handshake.request_id, error = %e, "KV handshake refused");
        })?;
        let nccl = match handshake.backend.as_str() {
            "" | "grpc" => None,
            "nccl" => Some(receiver.link(&handshake.nccl_link)?),
            other => {
                return Err(Status::invalid_argument(format!(
                    "unknown KV transfer backend {other:?}"
                )))
            }
        };
        let mut ack = KvPushAck::default();
        while let Some(message) = stream.message().await? {
            let Some(PushMessage::Chunk(chunk)) = message.message else {
                return Err(Status::invalid_argument(
                    "only chunks may follow the handshake",
                ));
            };
            let written = match &nccl {
                None => receiver.write(&transfer, &chunk),
                #[cfg(feature = "nccl")]
                Some(link) => receiver.write_nccl(link, &transfer, &chunk).await,
                #[cfg(not(feature = "nccl"))]
                Some(never) => match *never {},
            };
            let written = written.inspect_err(|e| {
                metrics::counter!(names::KV_TRANSFER_FAILURES_TOTAL, "direction" => "received")
                    .increment(1);
                tracing::warn!(request_id = %handshake.request_id, error = %e, "KV chunk refused");
            })?;
            ack.chunks += 1;
            ack.bytes += written as u64;
        }
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
            self.0.join_link(request).await.inspect_err(|e| {
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

/// No NCCL in this build: a handshake naming it is refused.
#[cfg(not(feature = "nccl"))]
pub enum NoLink {}

impl KvReceiver {
    #[cfg(feature = "nccl")]
    fn link(&self, id: &str) -> Result<Arc<super::nccl::NcclLink>> {
        self.links.get(id).ok_or_else(|| {
            Error::NotFound(format!("no NCCL link {id:?} (never joined, or broken)"))
        })
    }

    #[cfg(not(feature = "nccl"))]
    fn link(&self, _id: &str) -> Result<NoLink> {
        Err(Error::Rpc(Box::new(Status::unimplemented(
            "this node was built without NCCL",
        ))))
    }
}

/// A client for a decode node's `KvTransfer`, connecting lazily.
pub fn client(address: &str) -> Result<KvTransferClient<Channel>> {
    let channel = crate::rpc::channel(address)?;
    Ok(KvTransferClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Streams `handshake`, then a chunk per exported layer until `exported` closes (the engine
/// finished the prefill), and returns the receiver's acknowledgement.
pub async fn push(
    mut client: KvTransferClient<Channel>,
    request_id: &str,
    handshake: KvHandshake,
    mut exported: mpsc::UnboundedReceiver<ExportedKv>,
) -> Result<KvPushAck> {
    let started = Instant::now();
    let (tx, rx) = mpsc::channel::<KvPushMessage>(SEND_QUEUE);
    let encoder = async move {
        let open = KvPushMessage {
            message: Some(PushMessage::Handshake(handshake)),
        };
        if tx.send(open).await.is_err() {
            return Ok(());
        }
        while let Some(kv) = exported.recv().await {
            let chunk = chunk_from_tensors(kv.layer, kv.first_block as u32, &kv.keys, &kv.values)?;
            let message = KvPushMessage {
                message: Some(PushMessage::Chunk(chunk)),
            };
            if tx.send(message).await.is_err() {
                // The stream broke; the call below says why.
                return Ok(());
            }
        }
        Ok::<(), Error>(())
    };
    let call = client.push(with_request_id(ReceiverStream::new(rx), request_id));
    tokio::pin!(encoder);
    tokio::pin!(call);
    let outcome = tokio::select! {
        // The receiver answered before we were done: a refusal (or a broken link). Returning
        // drops `exported`, which tells the engine to stop computing this prompt.
        answer = &mut call => answer.map(Response::into_inner).map_err(Error::from),
        encoded = &mut encoder => match encoded {
            Ok(()) => call.await.map(Response::into_inner).map_err(Error::from),
            Err(e) => Err(e),
        },
    };
    match &outcome {
        Ok(ack) => {
            metrics::counter!(names::KV_TRANSFER_BYTES_TOTAL, "direction" => "sent")
                .increment(ack.bytes);
            metrics::histogram!(names::KV_TRANSFER_SECONDS, "direction" => "sent")
                .record(started.elapsed().as_secs_f64());
        }
        Err(_) => {
            metrics::counter!(names::KV_TRANSFER_FAILURES_TOTAL, "direction" => "sent").increment(1)
        }
    }
    outcome
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data half-updated in a way
    // that matters more than stopping the node would.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::KvCacheSpec;
    use candle_core::{DType, Device, Tensor};
    use tokio_stream::wrappers::TcpListenerStream;

    fn spec() -> KvCacheSpec {
        KvCacheSpec {
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 8,
            block_size: 4,
            num_blocks: 8,
            dtype: DType::F16,
        }
    }

    fn exported(layer: usize, blocks: usize) -> ExportedKv {
        let k = Tensor::randn(0f32, 1., (blocks, 4, 2, 8), &Device::Cpu).unwrap();
        let k = k.to_dtype(DType::F16).unwrap();
        ExportedKv {
            layer,
            first_block: 0,
            values: k.clone(),
            keys: k,
            #[cfg(feature = "cuda")]
            ready: None,
        }
    }

    async fn serve(receiver: &Arc<KvReceiver>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap().to_string();
        let server = crate::rpc::server()
            .add_service(receiver.service())
            .serve_with_incoming(TcpListenerStream::new(listener));
        tokio::spawn(server);
        address
    }

    fn handshake(receiver: &KvReceiver, ticket: &TransferTicket, blocks: u32) -> KvHandshake {
        KvHandshake {
            request_id: "t".into(),
            transfer_id: ticket.id(),
            fingerprint: Some(receiver.fingerprint().clone()),
            num_blocks: blocks,
            ..Default::default()
        }
    }

    fn fingerprint() -> ModelFingerprint {
        ModelFingerprint {
            model_id: "m".into(),
            kv_dtype: "f16".into(),
            num_layers: 2,
            num_kv_heads: 2,
            head_dim: 8,
            block_size: 4,
        }
    }

    #[tokio::test]
    async fn a_whole_transfer_completes_its_ticket_and_a_partial_one_does_not() {
        let cache = KvCache::new(spec(), &Device::Cpu).unwrap();
        let receiver = KvReceiver::new(cache, fingerprint());
        let address = serve(&receiver).await;

        let ticket = receiver.expect(vec![3, 5]);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(exported(0, 2)).unwrap();
        tx.send(exported(1, 2)).unwrap();
        drop(tx);
        let hs = handshake(&receiver, &ticket, 2);
        let ack = push(client(&address).unwrap(), "t", hs, rx).await.unwrap();
        assert_eq!(ack.chunks, 2);
        assert!(ticket.is_complete());
        assert_eq!(ticket.finish().unwrap().chunks, 2);
        assert_eq!(receiver.pending(), 0);

        let ticket = receiver.expect(vec![1, 2]);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(exported(0, 2)).unwrap();
        drop(tx);
        let hs = handshake(&receiver, &ticket, 2);
        push(client(&address).unwrap(), "t", hs, rx).await.unwrap();
        assert!(!ticket.is_complete());
        assert!(ticket.finish().unwrap_err().to_string().contains("missing"));
    }

    #[tokio::test]
    async fn closed_unknown_and_mismatched_transfers_are_refused() {
        let cache = KvCache::new(spec(), &Device::Cpu).unwrap();
        let receiver = KvReceiver::new(cache, fingerprint());
        let address = serve(&receiver).await;

        // A ticket dropped (given up) refuses the sender: NOT_FOUND at the handshake.
        let ticket = receiver.expect(vec![0]);
        let hs = handshake(&receiver, &ticket, 1);
        drop(ticket);
        let (tx, rx) = mpsc::unbounded_channel();
        tx.send(exported(0, 1)).unwrap();
        drop(tx);
        let err = push(client(&address).unwrap(), "t", hs, rx)
            .await
            .unwrap_err();
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::NotFound);

        // Another model's KV: refused, naming the field.
        let ticket = receiver.expect(vec![0]);
        let mut hs = handshake(&receiver, &ticket, 1);
        if let Some(f) = hs.fingerprint.as_mut() {
            f.head_dim = 128;
        }
        let (_tx, rx) = mpsc::unbounded_channel();
        let err = push(client(&address).unwrap(), "t", hs, rx)
            .await
            .unwrap_err();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().contains("head_dim"), "{status:?}");
        assert!(!ticket.is_complete());
    }

    #[tokio::test]
    async fn unknown_backends_are_refused_and_nccl_needs_an_nccl_build() {
        let cache = KvCache::new(spec(), &Device::Cpu).unwrap();
        let receiver = KvReceiver::new(cache, fingerprint());
        let address = serve(&receiver).await;

        let ticket = receiver.expect(vec![0]);
        let mut hs = handshake(&receiver, &ticket, 1);
        hs.backend = "carrier-pigeon".into();
        let (_tx, rx) = mpsc::unbounded_channel();
        let err = push(client(&address).unwrap(), "t", hs, rx)
            .await
            .unwrap_err();
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

        // An NCCL handshake naming a link this node never joined.
        let mut hs = handshake(&receiver, &ticket, 1);
        hs.backend = "nccl".into();
        hs.nccl_link = "no-such-link".into();
        let (_tx, rx) = mpsc::unbounded_channel();
        let err = push(client(&address).unwrap(), "t", hs, rx)
            .await
            .unwrap_err();
        let code = tonic::Status::from(err).code();
        let expected = if cfg!(feature = "nccl") {
            tonic::Code::NotFound
        } else {
            tonic::Code::Unimplemented
        };
        assert_eq!(code, expected);
        assert!(!ticket.is_complete());

        // Joining a link: refused outright without NCCL, and for a malformed id with it.
        let err = client(&address)
            .unwrap()
            .nccl_connect(NcclConnectRequest {
                unique_id: vec![0; 7],
                link_id: "l".into(),
                fingerprint: Some(fingerprint()),
            })
            .await
            .unwrap_err();
        let expected = if cfg!(feature = "nccl") {
            tonic::Code::InvalidArgument
        } else {
            tonic::Code::Unimplemented
        };
        assert_eq!(err.code(), expected, "{err:?}");
    }
}
