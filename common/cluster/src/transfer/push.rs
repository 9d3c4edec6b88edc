//! The prefill node's side of a KV transfer: one driver for every transport.
//!
//! [`push`] opens the decode node's `KvTransfer.Push` stream with a handshake, turns each layer
//! the engine exports into a chunk through a [`ChunkSink`] (gRPC: the bytes ride in the chunk;
//! NCCL: the chunk announces bytes that go over the link), and returns the receiver's
//! acknowledgement. Exports arrive while the forward pass goes on, so shipping overlaps the
//! next layers' compute.

use std::future::Future;
use std::time::Instant;

use pd_proto::v1::kv_push_message::Message as PushMessage;
use pd_proto::v1::{KvChunk, KvHandshake, KvPushAck, KvPushMessage};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use super::{framing, TransferBackend};
use crate::engine::ExportedKv;
use crate::telemetry::{names, record_link};
use crate::{Error, Result};

/// Chunks made but not yet sent: bounds the memory a slow link can pile up.
pub const SEND_QUEUE: usize = 16;

/// How one transport turns exported layers into the messages of a Push stream.
pub trait ChunkSink: Send {
    fn backend(&self) -> TransferBackend;

    /// Fills in what the handshake must say about this transport.
    fn prepare(&self, handshake: &mut KvHandshake);

    /// The chunks for one exported layer, in order (gRPC: messages of about
    /// [`super::grpc::MESSAGE_BYTES`]; NCCL: one announcement, its bytes queued on the link).
    fn chunks(&mut self, kv: ExportedKv) -> impl Future<Output = Result<Vec<KvChunk>>> + Send;

    /// Waits until the bytes of every chunk have left.
    fn flush(&mut self) -> impl Future<Output = Result<()>> + Send;

    /// The transfer failed: what the transport was doing is in an unknown state.
    fn failed(&mut self);
}

/// Streams `handshake` over `channel` (to the decode node), then a chunk per exported layer until `exported` closes (the engine
/// finished the prefill), and returns the receiver's acknowledgement. `peer` (the decode node's
/// address) labels the link's figures in the metrics.
pub async fn push<S: ChunkSink>(
    channel: Channel,
    peer: &str,
    request_id: &str,
    mut handshake: KvHandshake,
    mut exported: mpsc::UnboundedReceiver<ExportedKv>,
    mut sink: S,
) -> Result<KvPushAck> {
    let started = Instant::now();
    let backend = sink.backend();
    sink.prepare(&mut handshake);
    let (tx, rx) = mpsc::channel::<KvPushMessage>(SEND_QUEUE);
    let mut first_chunk = None;
    let sender = async {
        let open = KvPushMessage {
            message: Some(PushMessage::Handshake(handshake)),
        };
        if tx.send(open).await.is_err() {
            return Ok(());
        }
        while let Some(kv) = exported.recv().await {
            first_chunk.get_or_insert_with(Instant::now);
            for chunk in sink.chunks(kv).await? {
                let message = KvPushMessage {
                    message: Some(PushMessage::Chunk(chunk)),
                };
                if tx.send(message).await.is_err() {
                    // The stream broke; the call says why.
                    return Ok(());
                }
            }
        }
        sink.flush().await?;
        drop(tx);
        Ok::<(), Error>(())
    };
    let call = framing::push(channel, request_id, rx);
    let outcome = {
        tokio::pin!(sender);
        tokio::pin!(call);
        tokio::select! {
            // The receiver answered before we were done: a refusal (or a broken link).
            // Returning drops `exported`, which tells the engine to stop computing this prompt.
            answer = &mut call => answer.map_err(Error::from),
            sent = &mut sender => match sent {
                Ok(()) => call.await.map_err(Error::from),
                Err(e) => Err(e),
            },
        }
    };
    match &outcome {
        Ok(ack) => {
            metrics::counter!(names::KV_TRANSFER_BYTES_TOTAL, "direction" => "sent")
                .increment(ack.bytes);
            metrics::histogram!(names::KV_TRANSFER_SECONDS, "direction" => "sent")
                .record(started.elapsed().as_secs_f64());
            if let Some(first) = first_chunk {
                let seconds = first.elapsed().as_secs_f64();
                record_link("sent", backend, peer, ack.bytes, seconds);
            }
            tracing::debug!(%backend, bytes = ack.bytes, chunks = ack.chunks, "KV pushed");
        }
        Err(_) => {
            sink.failed();
            metrics::counter!(names::KV_TRANSFER_FAILURES_TOTAL, "direction" => "sent").increment(1)
        }
    }
    outcome
}
