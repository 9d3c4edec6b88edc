//! The prefill node's end of NCCL transfers: one link per decode node, opened on first use, and
//! a [`ChunkSink`] that announces each chunk on the Push stream while its bytes go over the link.

use std::sync::Arc;

use pd_proto::v1::{KvChunk, KvHandshake, ModelFingerprint, NcclConnectRequest};
use tonic::transport::Channel;

use super::comm::new_unique_id;
use super::link::{Links, NcclLink};
use super::NcclConfig;
use crate::engine::ExportedKv;
use crate::transfer::push::ChunkSink;
use crate::transfer::{grpc, TransferBackend};
use crate::{Error, Result};

/// The prefill end's NCCL links, one per decode node, opened on first use.
#[derive(Default)]
pub struct NcclSender {
    links: Links,
    config: NcclConfig,
    /// Held while a link is being opened, so that a burst of first transfers to a decode node
    /// opens one link rather than one each (each replacing the last).
    opening: tokio::sync::Mutex<()>,
}

impl NcclSender {
    pub fn new(config: NcclConfig) -> Self {
        Self {
            config,
            ..Default::default()
        }
    }

    /// The link to the decode node at `address`, opening it (as rank 0) if there is none.
    async fn link(
        &self,
        channel: &Channel,
        address: &str,
        fingerprint: &ModelFingerprint,
        device: &candle_core::Device,
    ) -> Result<Arc<NcclLink>> {
        if let Some(link) = self.links.get(address) {
            return Ok(link);
        }
        let _opening = self.opening.lock().await;
        if let Some(link) = self.links.get(address) {
            return Ok(link);
        }
        let unique = new_unique_id()?;
        let link_id = format!("{:016x}", rand::random::<u64>());
        // Both ends must be inside ncclCommInitRank at once: ours runs while the decode node
        // answers NcclConnect (which returns once it has joined).
        let opening = tokio::spawn({
            let (link_id, device, config) = (link_id.clone(), device.clone(), self.config.clone());
            async move { NcclLink::open(link_id, unique, 0, &device, &config).await }
        });
        let request = NcclConnectRequest {
            unique_id: unique.map(|b| b as u8).to_vec(),
            link_id: link_id.clone(),
            fingerprint: Some(fingerprint.clone()),
        };
        let timeout = self.config.connect_timeout();
        let joined =
            tokio::time::timeout(timeout, grpc::client(channel.clone()).nccl_connect(request))
                .await;
        match joined {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                opening.abort();
                return Err(Error::from(status));
            }
            Err(_) => {
                opening.abort();
                return Err(Error::DeadlineExceeded(format!(
                    "NCCL link to {address} not joined within {timeout:?}"
                )));
            }
        }
        let link = opening
            .await
            .map_err(|e| Error::Internal(format!("NCCL link task: {e}")))??;
        tracing::info!(%address, link = %link_id, "NCCL link open");
        self.links.insert(address.to_string(), link.clone());
        Ok(link)
    }

    /// A sink for one transfer to the decode node at `address`, holding its link (opened if
    /// need be) for the whole transfer: sends and receives on a link pair up in order.
    pub async fn sink(
        &self,
        channel: &Channel,
        address: &str,
        handshake: &KvHandshake,
        device: &candle_core::Device,
    ) -> Result<NcclSink> {
        let fingerprint = handshake
            .fingerprint
            .as_ref()
            .ok_or_else(|| Error::invalid("a KV handshake needs a fingerprint"))?;
        let link = self.link(channel, address, fingerprint, device).await?;
        let held = link.hold().await;
        Ok(NcclSink { link, _held: held })
    }
}

/// One transfer's use of a link.
pub struct NcclSink {
    link: Arc<NcclLink>,
    _held: tokio::sync::OwnedMutexGuard<()>,
}

impl ChunkSink for NcclSink {
    fn backend(&self) -> TransferBackend {
        TransferBackend::Nccl
    }

    fn prepare(&self, handshake: &mut KvHandshake) {
        handshake.set_backend(TransferBackend::Nccl.to_wire());
        handshake.nccl_link = self.link.id().to_string();
    }

    async fn chunks(&mut self, kv: ExportedKv) -> Result<Vec<KvChunk>> {
        let announce = KvChunk {
            layer: kv.layer as u32,
            first_block: kv.first_block as u32,
            num_blocks: kv.num_blocks as u32,
            ..Default::default()
        };
        // Queued behind the engine's event for this layer; the receiver posts its receive when
        // the announcement arrives, and both sides take chunks in the same order.
        self.link.send(kv).await?;
        Ok(vec![announce])
    }

    async fn flush(&mut self) -> Result<()> {
        self.link.flush().await
    }

    fn failed(&mut self) {
        // The link's state is unknown (a send may be pending): never reuse it.
        self.link.close();
    }
}
