//! Which node's prefix cache holds which blocks, followed from every node's `Node.KvEvents`
//! stream, and how many leading blocks of a prompt each node holds.
//!
//! The index is exact for the nodes it follows: a stream starts with a snapshot of the node's
//! cache and then carries each change in order, numbered; a batch out of order (which a
//! well-behaved node never sends) makes the router drop the node and resync from a new snapshot.
//! A node that leaves the membership, or whose stream breaks (it stopped, restarted or cannot
//! be reached), is dropped from the index at once, so no prompt is sent somewhere for blocks
//! that may be gone; it is followed again, from a snapshot, when it answers.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pd_common::kv::{prefix, BlockHash};
use pd_common::membership::ClusterSnapshot;
use pd_common::telemetry::names;
use pd_proto::v1::node_client::NodeClient;
use pd_proto::v1::{KvEventBatch, KvEventsRequest};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// A snapshot of a big cache goes in one message.
const MAX_EVENT_MESSAGE_BYTES: usize = 256 << 20;

/// What one node's cache holds.
struct NodeBlocks {
    incarnation: u64,
    next_seq: u64,
    root: Option<BlockHash>,
    block_size: usize,
    blocks: HashSet<BlockHash>,
}

/// One node's entry as `/debug/kv_index` shows it.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct NodeDump {
    pub incarnation: u64,
    pub next_seq: u64,
    pub block_size: usize,
    /// Block names in hex, sorted.
    pub blocks: Vec<String>,
}

#[derive(Default)]
pub struct KvIndex {
    nodes: Mutex<HashMap<String, NodeBlocks>>,
}

/// Why a batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("events from {got} while {want} was next")]
    OutOfOrder { got: u64, want: u64 },
    #[error("events of incarnation {got} before a snapshot of it")]
    NoSnapshot { got: u64 },
    #[error("a block name of {0} bytes")]
    BadHash(usize),
}

fn hash(bytes: &[u8]) -> Result<BlockHash, ApplyError> {
    <[u8; 32]>::try_from(bytes)
        .map(BlockHash)
        .map_err(|_| ApplyError::BadHash(bytes.len()))
}

impl KvIndex {
    /// Applies one batch of `node`'s stream.
    pub fn apply(&self, node: &str, batch: &KvEventBatch) -> Result<(), ApplyError> {
        let mut nodes = lock(&self.nodes);
        if batch.snapshot {
            let mut blocks = HashSet::with_capacity(batch.events.len());
            for e in &batch.events {
                blocks.insert(hash(&e.block_hash)?);
            }
            let root = if batch.root.is_empty() {
                None
            } else {
                Some(hash(&batch.root)?)
            };
            nodes.insert(
                node.to_string(),
                NodeBlocks {
                    incarnation: batch.incarnation,
                    next_seq: batch.first_seq,
                    root,
                    block_size: batch.block_size as usize,
                    blocks,
                },
            );
        } else {
            let entry = nodes
                .get_mut(node)
                .filter(|n| n.incarnation == batch.incarnation)
                .ok_or(ApplyError::NoSnapshot {
                    got: batch.incarnation,
                })?;
            if batch.first_seq != entry.next_seq {
                return Err(ApplyError::OutOfOrder {
                    got: batch.first_seq,
                    want: entry.next_seq,
                });
            }
            for e in &batch.events {
                let h = hash(&e.block_hash)?;
                if e.removed {
                    entry.blocks.remove(&h);
                } else {
                    entry.blocks.insert(h);
                }
            }
            entry.next_seq += batch.events.len() as u64;
        }
        let held = nodes.get(node).map_or(0, |n| n.blocks.len());
        metrics::gauge!(names::ROUTER_KV_INDEX_BLOCKS, "node" => node.to_string()).set(held as f64);
        Ok(())
    }

    /// Forgets `node`.
    pub fn remove(&self, node: &str) {
        if lock(&self.nodes).remove(node).is_some() {
            metrics::gauge!(names::ROUTER_KV_INDEX_BLOCKS, "node" => node.to_string()).set(0.0);
        }
    }

    /// How many leading full blocks of `tokens` each followed node holds, in tokens. Only the
    /// blocks a node could take count: never the one holding the last token, which is always
    /// computed.
    pub fn cached_tokens(&self, tokens: &[u32]) -> HashMap<String, usize> {
        let nodes = lock(&self.nodes);
        let mut names: HashMap<(BlockHash, usize), Vec<BlockHash>> = HashMap::new();
        let mut out = HashMap::new();
        for (id, n) in nodes.iter() {
            let Some(root) = n.root.filter(|_| n.block_size > 0 && !tokens.is_empty()) else {
                continue;
            };
            let usable = (tokens.len() - 1) / n.block_size * n.block_size;
            let chain = names.entry((root, n.block_size)).or_insert_with(|| {
                let mut h = Vec::new();
                prefix::extend_hashes(&root, &tokens[..usable], n.block_size, &mut h);
                h
            });
            let held = chain.iter().take_while(|h| n.blocks.contains(h)).count();
            out.insert(id.clone(), held * n.block_size);
        }
        out
    }

    /// Every followed node's entry.
    pub fn dump(&self) -> BTreeMap<String, NodeDump> {
        lock(&self.nodes)
            .iter()
            .map(|(id, n)| {
                let mut blocks: Vec<String> = n.blocks.iter().map(BlockHash::to_hex).collect();
                blocks.sort();
                (
                    id.clone(),
                    NodeDump {
                        incarnation: n.incarnation,
                        next_seq: n.next_seq,
                        block_size: n.block_size,
                        blocks,
                    },
                )
            })
            .collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Follows the event stream of every node in the membership until `stop`: a node that joins is
/// followed, one that leaves (or comes back at another address) is dropped.
pub async fn follow_nodes(
    index: Arc<KvIndex>,
    mut view: watch::Receiver<Arc<ClusterSnapshot>>,
    channel: impl Fn(&str) -> pd_common::Result<Channel> + Send + 'static,
    stop: CancellationToken,
) {
    let mut followed: HashMap<String, (String, CancellationToken)> = HashMap::new();
    loop {
        let snapshot = view.borrow_and_update().clone();
        let live: HashMap<&String, &String> = snapshot
            .prefill
            .values()
            .chain(snapshot.decode.values())
            .map(|n| (&n.node_id, &n.address))
            .collect();
        followed.retain(|id, (address, token)| {
            let keep = live.get(id).is_some_and(|a| **a == *address);
            if !keep {
                token.cancel();
                index.remove(id);
            }
            keep
        });
        for (id, address) in live {
            if followed.contains_key(id) {
                continue;
            }
            let Ok(channel) = channel(address) else {
                continue;
            };
            let token = stop.child_token();
            tokio::spawn(follow_node(
                index.clone(),
                id.clone(),
                channel,
                token.clone(),
            ));
            followed.insert(id.clone(), (address.clone(), token));
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
        }
    }
}

/// Follows one node's stream, reconnecting (from a snapshot) while it is in the membership.
async fn follow_node(index: Arc<KvIndex>, node: String, channel: Channel, stop: CancellationToken) {
    let mut pause = Duration::from_millis(100);
    loop {
        let mut client =
            NodeClient::new(channel.clone()).max_decoding_message_size(MAX_EVENT_MESSAGE_BYTES);
        let follow = async {
            let mut stream = client
                .kv_events(KvEventsRequest::default())
                .await?
                .into_inner();
            while let Some(batch) = stream.message().await? {
                if let Err(e) = index.apply(&node, &batch) {
                    return Err(tonic::Status::data_loss(e.to_string()));
                }
                pause = Duration::from_millis(100);
            }
            Ok::<(), tonic::Status>(())
        };
        let outcome = tokio::select! {
            o = follow => o,
            _ = stop.cancelled() => return,
        };
        // Whatever it held may be gone: dropped until a new snapshot says otherwise.
        index.remove(&node);
        match outcome {
            Ok(()) => tracing::debug!(node = %node, "KV event stream ended"),
            Err(e) => tracing::debug!(node = %node, error = %e, "KV event stream broke"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pd_common::kv::PrefixKey;
    use pd_proto::v1::KvEvent;

    fn root() -> BlockHash {
        PrefixKey {
            model: "m".into(),
            num_layers: 1,
            num_kv_heads: 1,
            head_dim: 8,
            kv_dtype: "f32".into(),
            block_size: 4,
        }
        .root()
    }

    fn event(h: &BlockHash, removed: bool) -> KvEvent {
        KvEvent {
            block_hash: h.0.to_vec(),
            removed,
        }
    }

    #[test]
    fn overlap_follows_snapshots_and_events_and_refuses_gaps() {
        let root = root();
        let tokens: Vec<u32> = (0..13).collect();
        let mut names = Vec::new();
        prefix::extend_hashes(&root, &tokens, 4, &mut names);
        let index = KvIndex::default();
        let snapshot = KvEventBatch {
            incarnation: 7,
            snapshot: true,
            first_seq: 10,
            events: vec![event(&names[0], false), event(&names[1], false)],
            root: root.0.to_vec(),
            block_size: 4,
        };
        index.apply("a", &snapshot).unwrap();
        assert_eq!(index.cached_tokens(&tokens)["a"], 8);
        // The third block joins and the first leaves: nothing leads any more.
        let more = KvEventBatch {
            incarnation: 7,
            first_seq: 10,
            events: vec![event(&names[2], false), event(&names[0], true)],
            ..snapshot.clone()
        };
        let more = KvEventBatch {
            snapshot: false,
            ..more
        };
        index.apply("a", &more).unwrap();
        assert_eq!(index.cached_tokens(&tokens)["a"], 0);
        // Replayed or skipped events, or another incarnation's, are refused.
        assert!(index.apply("a", &more).is_err());
        let other = KvEventBatch {
            incarnation: 8,
            first_seq: 12,
            ..more.clone()
        };
        assert!(index.apply("a", &other).is_err());
        assert_eq!(index.dump()["a"].next_seq, 12);
        assert_eq!(index.dump()["a"].blocks.len(), 2);
        index.remove("a");
        assert!(index.cached_tokens(&tokens).is_empty());
        assert!(index.dump().is_empty());
    }
}
