//! The decode node's end of NCCL transfers: joining the links prefill nodes open, and receiving
//! each announced chunk into the reservation it names.

use std::sync::Arc;

use pd_proto::v1::{KvChunk, NcclConnectRequest};

use super::link::{Gate, Links, NcclLink};
use super::NcclConfig;
use crate::transfer::check_fingerprint;
use crate::transfer::reservation::{KvReceiver, OpenTransfer};
use crate::{Error, Result};

/// Joins an NCCL link a prefill node opened (as rank 1) and keeps it under its id.
pub async fn join(
    links: &Links,
    config: &NcclConfig,
    receiver: &KvReceiver,
    request: NcclConnectRequest,
) -> Result<()> {
    let theirs = request
        .fingerprint
        .as_ref()
        .ok_or_else(|| Error::invalid("the NCCL connect request carries no fingerprint"))?;
    check_fingerprint(receiver.fingerprint(), theirs)?;
    let unique: [u8; 128] = request.unique_id.as_slice().try_into().map_err(|_| {
        Error::invalid(format!(
            "an NCCL unique id has 128 bytes, not {}",
            request.unique_id.len()
        ))
    })?;
    if request.link_id.is_empty() {
        return Err(Error::invalid("an NCCL link needs an id"));
    }
    let device = receiver.cache().layer(0)?.0.device().clone();
    let link = NcclLink::open(
        request.link_id.clone(),
        unique.map(|b| b as i8),
        1,
        &device,
        config,
    )
    .await?;
    links.insert(request.link_id, link);
    Ok(())
}

/// Receives the bytes `chunk` announces over `link` into the reserved blocks it names; returns
/// the bytes written.
pub async fn receive_chunk(
    link: &NcclLink,
    transfer: &OpenTransfer,
    chunk: &KvChunk,
) -> Result<usize> {
    let blocks = transfer.announced_blocks(chunk)?;
    let gate = Arc::new(transfer.clone());
    let bytes = link
        .recv(transfer.cache().clone(), chunk.layer as usize, blocks, gate)
        .await?;
    transfer.mark(chunk, bytes);
    Ok(bytes)
}

impl Gate for OpenTransfer {
    fn while_open(&self, write: &mut dyn FnMut() -> Result<()>) -> Result<()> {
        OpenTransfer::while_open(self, |_| write())
    }
}
