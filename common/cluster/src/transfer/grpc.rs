//! KV over gRPC: the bytes of each exported layer ride in the chunks of the `KvTransfer.Push`
//! stream, checksummed ([`super::chunk`]).

use pd_proto::v1::kv_transfer_client::KvTransferClient;
use pd_proto::v1::{KvChunk, KvHandshake};
use tonic::transport::Channel;

use super::push::ChunkSink;
use super::{chunk_from_tensors, TransferBackend};
use crate::engine::ExportedKv;
use crate::rpc::RpcConfig;
use crate::Result;

/// Largest gRPC message either side accepts: one layer's chunk of a long prompt of a large model
/// (Llama-3-8B: 2 MiB per 512 tokens).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// A client for a decode node's `KvTransfer`, connecting lazily.
pub fn client(rpc: &RpcConfig, address: &str) -> Result<KvTransferClient<Channel>> {
    Ok(KvTransferClient::new(rpc.channel(address)?)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// The gRPC transport: each chunk carries its layer's bytes.
pub struct GrpcSink;

impl ChunkSink for GrpcSink {
    fn backend(&self) -> TransferBackend {
        TransferBackend::Grpc
    }

    fn prepare(&self, handshake: &mut KvHandshake) {
        handshake.set_backend(TransferBackend::Grpc.to_wire());
    }

    async fn chunk(&mut self, kv: ExportedKv) -> Result<KvChunk> {
        chunk_from_tensors(kv.layer, kv.first_block as u32, &kv.keys, &kv.values)
    }

    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn failed(&mut self) {}
}
