//! KV over gRPC: the bytes of each exported layer ride in the chunks of the `KvTransfer.Push`
//! stream, about a MiB a message, checksummed ([`super::chunk`]).

use bytes::Bytes;
use pd_proto::v1::kv_transfer_client::KvTransferClient;
use pd_proto::v1::{KvChunk, KvHandshake};
use tonic::transport::Channel;

use super::push::ChunkSink;
use super::{chunk_from_bytes, TransferBackend};
use crate::engine::{ExportedKv, KvData};
use crate::rpc::RpcConfig;
use crate::Result;

/// Largest gRPC message either side accepts. Our senders cut messages of about
/// [`MESSAGE_BYTES`], but a chunk may name a whole layer of a long prompt of a large model
/// (Llama-3-8B: 2 MiB per 512 tokens), as other senders may send it.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// About how many bytes (K plus V) one chunk message carries: large enough that per-message
/// costs vanish, small enough that buffers are reused rather than freshly mapped for every
/// message, and that several are in flight at once.
pub const MESSAGE_BYTES: usize = 1 << 20;

/// Channels to the decode nodes' `KvTransfer`, one (HTTP/2 connection) per address,
/// kept across transfers: a transfer then starts at full window on a warm connection instead
/// of paying a TCP and HTTP/2 handshake. A channel whose peer went away reconnects on its next
/// use.
#[derive(Default)]
pub struct Clients {
    channels: std::sync::Mutex<std::collections::HashMap<String, Channel>>,
}

impl Clients {
    /// The channel to `address`, made on first use.
    pub fn get(&self, rpc: &RpcConfig, address: &str) -> Result<Channel> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        let channel = match channels.get(address) {
            Some(c) => c.clone(),
            None => {
                let c = rpc.channel(address)?;
                // Addresses of nodes long gone must not pile up in a cluster that churns.
                if channels.len() >= MAX_CHANNELS {
                    channels.clear();
                }
                channels.insert(address.to_string(), c.clone());
                c
            }
        };
        Ok(channel)
    }
}

/// Decode nodes whose channels are kept at once.
const MAX_CHANNELS: usize = 4096;

/// tonic's client for a decode node's `KvTransfer` on `channel` (its unary calls; pushes go
/// through [`super::framing::push`]), with message limits sized for KV chunks.
pub fn client(channel: Channel) -> KvTransferClient<Channel> {
    KvTransferClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// The gRPC transport: each chunk carries its layer's bytes. On a GPU they come to the host
/// through pinned memory on a stream of their own ([`super::staging`]), each layer as soon as
/// the engine has computed it.
#[derive(Default)]
pub struct GrpcSink {
    #[cfg(feature = "cuda")]
    staging: Option<std::sync::Arc<super::staging::Staging>>,
}

impl GrpcSink {
    pub fn new() -> Self {
        Self::default()
    }
}

impl ChunkSink for GrpcSink {
    fn backend(&self) -> TransferBackend {
        TransferBackend::Grpc
    }

    fn prepare(&self, handshake: &mut KvHandshake) {
        handshake.set_backend(TransferBackend::Grpc.to_wire());
    }

    async fn chunks(&mut self, kv: ExportedKv) -> Result<Vec<KvChunk>> {
        let (keys, values) = match &kv.data {
            KvData::Host { keys, values } => (keys.clone(), values.clone()),
            #[cfg(feature = "cuda")]
            KvData::Device { .. } => {
                let staging = match &self.staging {
                    Some(s) => s.clone(),
                    None => {
                        let s = super::staging::Staging::of(&kv)?;
                        self.staging = Some(s.clone());
                        s
                    }
                };
                // One copy to pinned memory per layer, as soon as the layer is done.
                staging.to_host(&kv).await?
            }
        };
        Ok(split(&kv, keys, values))
    }

    async fn flush(&mut self) -> Result<()> {
        Ok(())
    }

    fn failed(&mut self) {}
}

/// The runs of blocks `(first, count)` of an export of `blocks` blocks, each about
/// [`MESSAGE_BYTES`] of K and V.
fn runs(blocks: usize, block_bytes: usize) -> impl Iterator<Item = (usize, usize)> {
    let per = (MESSAGE_BYTES / 2 / block_bytes.max(1)).max(1);
    (0..blocks)
        .step_by(per)
        .map(move |first| (first, per.min(blocks - first)))
}

/// An export's chunks: slices of its bytes, no copies.
fn split(kv: &ExportedKv, keys: Bytes, values: Bytes) -> Vec<KvChunk> {
    let block_bytes = keys.len() / kv.num_blocks.max(1);
    runs(kv.num_blocks, block_bytes)
        .map(|(first, count)| {
            let range = first * block_bytes..(first + count) * block_bytes;
            chunk_from_bytes(
                kv.layer,
                (kv.first_block + first) as u32,
                count as u32,
                keys.slice(range.clone()),
                values.slice(range),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exports_split_into_messages_of_about_a_mebibyte() {
        // Llama-3-8B, block 16, bf16: 32 KiB a block, 16 blocks (512 KiB of K) a message.
        let r: Vec<_> = runs(40, 32 << 10).collect();
        assert_eq!(r, vec![(0, 16), (16, 16), (32, 8)]);
        // A block bigger than a message still travels, one a message.
        assert_eq!(runs(3, 4 << 20).count(), 3);
        assert_eq!(runs(0, 1024).count(), 0);
    }
}
