//! The decode node's side of a KV transfer: reservations that accept only the transfers they
//! expect.
//!
//! [`KvReceiver::expect`] registers the blocks reserved for a prompt under a fresh transfer id and
//! returns a [`TransferTicket`]. A sender opens the transfer by that id ([`KvReceiver::open`]);
//! its chunks name blocks by their index in the reservation, are verified whole (checksum, sizes,
//! range) before a byte is written, and are refused once the ticket is dropped, so a slow or
//! half-dead sender can never write into blocks that were freed or handed to a retry. Every write,
//! whatever the transport, goes through [`OpenTransfer::while_open`], under the transfer's lock.
//! The ticket knows when every layer of every block has arrived.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use pd_proto::v1::{KvChunk, KvHandshake, ModelFingerprint};

use super::{check_fingerprint, chunk_blocks, write_checked_chunk};
use crate::kv::{BlockId, KvCache};
use crate::telemetry::names;
use crate::{Error, Result};

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
}

/// One expected transfer. Dropping it closes the transfer: later chunks are refused.
pub struct TransferTicket {
    id: u64,
    transfer: Arc<Mutex<Transfer>>,
    receiver: Arc<KvReceiver>,
}

/// A transfer a sender has opened with a valid handshake.
#[derive(Clone)]
pub struct OpenTransfer {
    transfer: Arc<Mutex<Transfer>>,
    cache: KvCache,
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

    /// Opens the transfer a handshake names, after checking the sender's fingerprint and the
    /// size of the reservation it expects.
    pub fn open(&self, handshake: &KvHandshake) -> Result<OpenTransfer> {
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
        Ok(OpenTransfer {
            transfer,
            cache: self.cache.clone(),
        })
    }
}

impl OpenTransfer {
    /// The cache the transfer writes into.
    pub fn cache(&self) -> &KvCache {
        &self.cache
    }

    /// Verifies a chunk that carries its bytes and writes it into the reserved blocks it names.
    /// Returns the bytes written. A chunk for a (layer, block) that already arrived is refused:
    /// a sender that repeats itself is broken.
    pub fn write(&self, chunk: &KvChunk) -> Result<usize> {
        #[cfg(feature = "cuda")]
        if self.cache.layer(0)?.0.device().is_cuda() {
            return self.write_staged(chunk);
        }
        // The checksum pass needs no lock; the range check, the repeat check and the copy share
        // one critical section.
        super::verify_checksum(chunk)?;
        self.write_marked(chunk, |blocks| {
            write_checked_chunk(&self.cache, chunk, blocks)
        })
    }

    /// Under the transfer's lock, while it is open: refuses a repeated (layer, block), runs
    /// `write` on the reservation's blocks and records what arrived. One critical section, so
    /// that chunks written concurrently cannot both pass the repeat check.
    fn write_marked(
        &self,
        chunk: &KvChunk,
        write: impl FnOnce(&[BlockId]) -> Result<usize>,
    ) -> Result<usize> {
        let mut t = lock(&self.transfer);
        if !t.open {
            return Err(Error::Cancelled(
                "the KV transfer was closed by the receiver".into(),
            ));
        }
        ReservedBlocks {
            blocks: &t.blocks,
            received: &t.received,
        }
        .refuse_repeated(chunk)?;
        let bytes = write(&t.blocks)?;
        record(&mut t, chunk, bytes);
        Ok(bytes)
    }

    /// A GPU cache: verified here, copied in on the staging stream (not the engine's).
    #[cfg(feature = "cuda")]
    fn write_staged(&self, chunk: &KvChunk) -> Result<usize> {
        let blocks = self.while_open(|t| {
            t.refuse_repeated(chunk)?;
            Ok(super::verify_chunk(&self.cache, chunk, t.blocks)?.to_vec())
        })?;
        let bytes = chunk.keys.len() + chunk.values.len();
        let device = self.cache.layer(0)?.0.device().clone();
        super::staging::Staging::of_device(&device)?.write(
            &self.cache,
            chunk.layer as usize,
            &blocks,
            &chunk.keys,
            &chunk.values,
            &mut |scatter| {
                self.write_marked(chunk, |_| {
                    scatter()?;
                    Ok(bytes)
                })
                .map(|_| ())
            },
        )?;
        Ok(bytes)
    }

    /// The cache blocks a data-less chunk announces (their bytes come another way), checked
    /// against the reservation while it is open.
    pub fn announced_blocks(&self, chunk: &KvChunk) -> Result<Vec<BlockId>> {
        self.while_open(|t| {
            t.refuse_repeated(chunk)?;
            Ok(chunk_blocks(self.cache.spec(), chunk, t.blocks)?.to_vec())
        })
    }

    /// Runs `write` under the transfer's lock, only while the reservation is open: closing the
    /// ticket waits for a write in progress, so no byte lands after the reservation was given up.
    pub fn while_open<T>(&self, write: impl FnOnce(&ReservedBlocks) -> Result<T>) -> Result<T> {
        let t = lock(&self.transfer);
        if !t.open {
            return Err(Error::Cancelled(
                "the KV transfer was closed by the receiver".into(),
            ));
        }
        write(&ReservedBlocks {
            blocks: &t.blocks,
            received: &t.received,
        })
    }

    /// Records that `chunk`'s blocks of its layer have arrived (`bytes` of K and V).
    pub fn mark(&self, chunk: &KvChunk, bytes: usize) {
        record(&mut lock(&self.transfer), chunk, bytes);
    }
}

/// Records under the transfer's lock that `chunk`'s blocks of its layer have arrived.
fn record(t: &mut Transfer, chunk: &KvChunk, bytes: usize) {
    let first = chunk.first_block as usize;
    let layer = chunk.layer as usize;
    // The range was checked against the reservation before the write.
    if let Some(row) = t.received.get_mut(layer) {
        for seen in row.iter_mut().skip(first).take(chunk.num_blocks as usize) {
            *seen = true;
        }
    }
    t.stats.chunks += 1;
    t.stats.bytes += bytes as u64;
    if let Some(started) = t.started {
        t.stats.duration = started.elapsed();
    }
    metrics::counter!(names::KV_TRANSFER_BYTES_TOTAL, "direction" => "received")
        .increment(bytes as u64);
}

/// The blocks of an open reservation, seen under its lock.
pub struct ReservedBlocks<'a> {
    pub blocks: &'a [BlockId],
    /// `received[layer][block]`: what has arrived so far.
    received: &'a [Vec<bool>],
}

impl ReservedBlocks<'_> {
    /// Refuses a chunk naming a (layer, block) of the reservation that has already arrived.
    pub fn refuse_repeated(&self, chunk: &KvChunk) -> Result<()> {
        let Some(row) = self.received.get(chunk.layer as usize) else {
            return Ok(()); // the range check that follows refuses it
        };
        let first = chunk.first_block as usize;
        let end = first
            .saturating_add(chunk.num_blocks as usize)
            .min(row.len());
        match (first..end).find(|&b| row[b]) {
            Some(b) => Err(Error::BadKvChunk(format!(
                "layer {}: block {b} of the reservation arrived twice",
                chunk.layer
            ))),
            None => Ok(()),
        }
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks cannot leave the data half-updated in a way
    // that matters more than stopping the node would.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
