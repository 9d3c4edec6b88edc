//! The nodes the router can send work to, and how it picks them.
//!
//! Membership comes from the etcd watch: a node whose lease lapses or who deregisters leaves the
//! pool at once, and while etcd is unreachable the pool keeps the last view (and says so). Load
//! comes from the nodes themselves: a poller asks every node for `Node.Stats` a few times a
//! second, and the router adds what it has sent since (its own open streams), so that a burst
//! of requests between two polls spreads instead of piling onto one node.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pd_common::membership::{self, ClusterSnapshot, MembershipConfig};
use pd_common::rpc::RpcConfig;
use pd_common::telemetry::names;
use pd_common::transfer::TransferBackend;
use pd_proto::v1::decode_client::DecodeClient;
use pd_proto::v1::node_client::NodeClient;
use pd_proto::v1::{NodeInfo, NodeRole, NodeStats, PrefillCandidate, StatsRequest};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

/// How often the poller asks every node for its load.
const STATS_INTERVAL: Duration = Duration::from_millis(250);
/// Prefill nodes a decode node may try for one request, best first.
const PREFILL_CANDIDATES: usize = 3;

/// A node as the router picks it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub node_id: String,
    pub address: String,
}

#[derive(Default)]
struct Load {
    stats: Option<NodeStats>,
    /// Streams this router has open on the node.
    active: Arc<AtomicUsize>,
}

/// Counts a stream as open on its node until dropped.
pub struct ActiveGuard(Arc<AtomicUsize>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct Pool {
    view: watch::Receiver<Arc<ClusterSnapshot>>,
    rpc: RpcConfig,
    /// A node that does not answer a stats call within this is skipped for the round.
    stats_timeout: Duration,
    loads: Mutex<HashMap<String, Load>>,
    channels: Mutex<HashMap<String, Channel>>,
}

impl Pool {
    /// Follows the membership in etcd (retrying until etcd answers) and polls node load, until
    /// `stop`.
    pub fn start(
        config: MembershipConfig,
        rpc: RpcConfig,
        stats_timeout: Duration,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let (tx, view) = watch::channel(Arc::new(ClusterSnapshot::default()));
        let pool = Arc::new(Self {
            view,
            rpc,
            stats_timeout,
            loads: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
        });
        tokio::spawn(follow_membership(config, tx, stop.clone()));
        tokio::spawn(poll_stats(pool.clone(), stop));
        pool
    }

    pub fn snapshot(&self) -> Arc<ClusterSnapshot> {
        self.view.borrow().clone()
    }

    /// The least loaded decode node not in `exclude`: fewest waiting + open streams, then the
    /// most free KV blocks.
    pub fn pick_decode(&self, exclude: &[String]) -> Option<(Candidate, ActiveGuard)> {
        let snapshot = self.snapshot();
        let mut loads = lock(&self.loads);
        let best = snapshot
            .decode
            .values()
            .filter(|n| !exclude.contains(&n.node_id))
            .min_by(|a, b| {
                let key = |n: &NodeInfo| {
                    let load = loads.get(&n.node_id);
                    let stats = load.and_then(|l| l.stats.as_ref());
                    let active = load.map_or(0, |l| l.active.load(Ordering::Relaxed));
                    let waiting = stats.map_or(0, |s| s.waiting_sequences as usize);
                    let free = stats.map_or(0.0, |s| {
                        s.free_kv_blocks as f64 / s.total_kv_blocks.max(1) as f64
                    });
                    (active + waiting, -free)
                };
                let (ka, kb) = (key(a), key(b));
                ka.0.cmp(&kb.0)
                    .then(ka.1.total_cmp(&kb.1))
                    .then(a.node_id.cmp(&b.node_id))
            })?
            .clone();
        let active = loads
            .entry(best.node_id.clone())
            .or_default()
            .active
            .clone();
        active.fetch_add(1, Ordering::Relaxed);
        Some((
            Candidate {
                node_id: best.node_id.clone(),
                address: best.address.clone(),
            },
            ActiveGuard(active),
        ))
    }

    /// Prefill nodes whose KV fits `decode`'s cache, fewest queued prompt tokens first, each with
    /// the KV transfer backend to use: NCCL where both ends offer it, else gRPC.
    pub fn prefill_candidates(&self, decode_node: &str) -> Vec<PrefillCandidate> {
        let snapshot = self.snapshot();
        let Some(decode) = snapshot.decode.get(decode_node) else {
            return Vec::new();
        };
        let loads = lock(&self.loads);
        let mut nodes: Vec<(u64, u32, &NodeInfo)> = snapshot
            .prefill
            .values()
            .filter(|p| p.fingerprint == decode.fingerprint)
            .map(|p| {
                let queued = loads
                    .get(&p.node_id)
                    .and_then(|l| l.stats.as_ref())
                    .map_or(0, |s| s.queued_prompt_tokens);
                // A random tie-break spreads equal nodes between polls.
                (queued, rand::random::<u32>(), p)
            })
            .collect();
        nodes.sort_by_key(|&(queued, tie, _)| (queued, tie));
        nodes
            .into_iter()
            .take(PREFILL_CANDIDATES)
            .map(|(_, _, p)| PrefillCandidate {
                address: p.address.clone(),
                backend: transfer_backend(p, decode).to_wire() as i32,
            })
            .collect()
    }

    /// The longest request every decode node takes (their caches may hold less than the
    /// model's context); `None` before any decode node is known.
    pub fn max_model_len(&self) -> Option<usize> {
        self.snapshot()
            .decode
            .values()
            .map(|n| n.max_model_len as usize)
            .filter(|&n| n > 0)
            .min()
    }

    pub fn decode_client(&self, address: &str) -> pd_common::Result<DecodeClient<Channel>> {
        Ok(DecodeClient::new(self.channel(address)?))
    }

    fn channel(&self, address: &str) -> pd_common::Result<Channel> {
        let mut channels = lock(&self.channels);
        if let Some(c) = channels.get(address) {
            return Ok(c.clone());
        }
        let channel = self.rpc.channel(address)?;
        channels.insert(address.to_string(), channel.clone());
        Ok(channel)
    }
}

async fn follow_membership(
    config: MembershipConfig,
    tx: watch::Sender<Arc<ClusterSnapshot>>,
    stop: CancellationToken,
) {
    let mut pause = Duration::from_millis(200);
    let watch = loop {
        match membership::watch(&config).await {
            Ok(w) => break w,
            Err(e) => tracing::warn!(error = %e, "cannot watch etcd yet; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(2));
    };
    let mut view = watch.subscribe();
    loop {
        let snapshot = view.borrow_and_update().clone();
        for (role, nodes) in [("prefill", &snapshot.prefill), ("decode", &snapshot.decode)] {
            metrics::gauge!(names::CLUSTER_NODES, "role" => role).set(nodes.len() as f64);
        }
        metrics::gauge!(names::MEMBERSHIP_STALE).set(if snapshot.etcd_connected {
            0.0
        } else {
            1.0
        });
        if !snapshot.etcd_connected {
            tracing::warn!(
                nodes = snapshot.len(),
                "etcd unreachable: serving the last view"
            );
        }
        let _ = tx.send(snapshot);
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
        }
    }
}

async fn poll_stats(pool: Arc<Pool>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(STATS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let snapshot = pool.snapshot();
        let nodes: Vec<NodeInfo> = [NodeRole::Prefill, NodeRole::Decode]
            .iter()
            .flat_map(|&r| snapshot.nodes(r).values().cloned())
            .collect();
        let polls = nodes.into_iter().map(|node| {
            let pool = pool.clone();
            async move {
                let stats = async {
                    let mut client = NodeClient::new(pool.channel(&node.address).ok()?);
                    let call = client.stats(StatsRequest {});
                    Some(
                        tokio::time::timeout(pool.stats_timeout, call)
                            .await
                            .ok()?
                            .ok()?
                            .into_inner(),
                    )
                }
                .await;
                (node.node_id, stats)
            }
        });
        let answers = futures::future::join_all(polls).await;
        let mut loads = lock(&pool.loads);
        let live: Vec<&str> = snapshot
            .prefill
            .keys()
            .chain(snapshot.decode.keys())
            .map(String::as_str)
            .collect();
        // Forget nodes that left; keep the open-stream counters of those still there.
        loads.retain(|id, l| live.contains(&id.as_str()) || l.active.load(Ordering::Relaxed) > 0);
        for (id, stats) in answers {
            // A node that does not answer keeps no stale "idle" figures.
            loads.entry(id).or_default().stats = stats;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// NCCL when both nodes advertise it, else gRPC (which every node speaks).
pub fn transfer_backend(prefill: &NodeInfo, decode: &NodeInfo) -> TransferBackend {
    let nccl = TransferBackend::Nccl.to_wire() as i32;
    let offers = |n: &NodeInfo| n.transfer_backends.contains(&nccl);
    if offers(prefill) && offers(decode) {
        TransferBackend::Nccl
    } else {
        TransferBackend::Grpc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nccl_only_where_both_ends_offer_it() {
        use TransferBackend::{Grpc, Nccl};
        let node = |backends: &[TransferBackend]| NodeInfo {
            transfer_backends: backends.iter().map(|b| b.to_wire() as i32).collect(),
            ..Default::default()
        };
        let (both, grpc) = (node(&[Grpc, Nccl]), node(&[Grpc]));
        assert_eq!(transfer_backend(&both, &both), Nccl);
        assert_eq!(transfer_backend(&both, &grpc), Grpc);
        assert_eq!(transfer_backend(&grpc, &both), Grpc);
        assert_eq!(transfer_backend(&node(&[]), &node(&[])), Grpc);
    }
}
