//! The nodes the router can send work to, and how it picks them.
//!
//! Membership comes from the etcd watch: a node whose lease lapses or who deregisters leaves the
//! pool at once, and while etcd is unreachable the pool keeps the last view (and says so). Load
//! comes from the nodes themselves: a poller asks every node for `Node.Stats` a few times a
//! second, and the router adds what it has sent since (its own open streams on decode nodes,
//! the prompt tokens it routed to each prefill node after the poll that answered last), so that a
//! burst of requests between two polls spreads instead of piling onto one node.
//!
//! Where the KV already is comes from the nodes' prefix-cache event streams ([`KvIndex`]). With
//! `--router-mode kv` (the default) a prefill node costs the prompt tokens it would have to
//! compute (what its cache lacks), weighted by `--kv-overlap-score-weight`, plus the prompt
//! tokens queued on it: the cheapest goes first. Between equally loaded decode nodes, the one
//! holding more of the prompt wins (holding all of it, it computes the rest itself).

use std::cmp::Reverse;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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

use crate::kv_index::{self, KvIndex};

/// How often the poller asks every node for its load.
const STATS_INTERVAL: Duration = Duration::from_millis(250);
/// What a decode node that has not reported its `max_num_seqs` is taken to run at once (the
/// engine's default).
const UNREPORTED_CAPACITY: usize = 64;
/// Prefill nodes a decode node may try for one request, best first.
const PREFILL_CANDIDATES: usize = 3;

/// A node as the router picks it.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub node_id: String,
    pub address: String,
}

/// How the router weighs where the KV is against load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RouterMode {
    /// Prompt tokens a node would compute (its cache considered) plus its queue.
    Kv,
    /// Load only.
    Load,
}

#[derive(Debug, Clone, Copy)]
pub struct Routing {
    pub mode: RouterMode,
    /// Weight of a prompt token a prefill node must compute, against one already queued there.
    pub kv_overlap_score_weight: f64,
}

impl Default for Routing {
    fn default() -> Self {
        Self {
            mode: RouterMode::Kv,
            kv_overlap_score_weight: 1.0,
        }
    }
}

/// How many tokens of one request each node's prefix cache holds.
pub struct Held {
    tokens: usize,
    cached: HashMap<String, usize>,
}

#[derive(Default)]
struct Load {
    stats: Option<NodeStats>,
    /// Streams this router has open on the node.
    active: Arc<AtomicUsize>,
    /// Prompt tokens this router sent the node's way (as first prefill candidate) since the
    /// stats call its `stats` answer came from, with when: the node's queue the last answer
    /// cannot show yet. Without them, prompts that arrive together all go to whichever node
    /// looked cheapest at the last poll.
    routed: VecDeque<(Instant, u64)>,
}

impl Load {
    /// Prompt tokens queued on the node as far as this router knows.
    fn queued_prompt_tokens(&self) -> u64 {
        let reported = self.stats.as_ref().map_or(0, |s| s.queued_prompt_tokens);
        reported + self.routed.iter().map(|&(_, t)| t).sum::<u64>()
    }

    /// A stats answer (or none) to a call made at `asked`: what was routed before it is in the
    /// answer's queue or done.
    fn answered(&mut self, stats: Option<NodeStats>, asked: Instant) {
        self.stats = stats;
        while self.routed.front().is_some_and(|&(at, _)| at <= asked) {
            self.routed.pop_front();
        }
    }
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
    kv: Arc<KvIndex>,
    routing: Routing,
}

impl Pool {
    /// Follows the membership in etcd (retrying until etcd answers) and polls node load, until
    /// `stop`.
    pub fn start(
        config: MembershipConfig,
        rpc: RpcConfig,
        stats_timeout: Duration,
        routing: Routing,
        stop: CancellationToken,
    ) -> Arc<Self> {
        let (tx, view) = watch::channel(Arc::new(ClusterSnapshot::default()));
        let pool = Arc::new(Self {
            view: view.clone(),
            rpc,
            stats_timeout,
            loads: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
            kv: Arc::new(KvIndex::default()),
            routing,
        });
        tokio::spawn(follow_membership(config, tx, stop.clone()));
        tokio::spawn(poll_stats(pool.clone(), stop.clone()));
        let p = pool.clone();
        tokio::spawn(kv_index::follow_nodes(
            pool.kv.clone(),
            view,
            move |address| p.channel(address),
            stop,
        ));
        pool
    }

    /// The router's view of the nodes' prefix caches.
    pub fn kv_index(&self) -> &KvIndex {
        &self.kv
    }

    /// What each node's cache holds of a request's `tokens`, when routing looks at it: computed
    /// once per request and weighed by both [`Self::pick_decode`] and
    /// [`Self::prefill_candidates`].
    pub fn held(&self, tokens: &[u32]) -> Held {
        Held {
            tokens: tokens.len(),
            cached: match self.routing.mode {
                RouterMode::Kv => self.kv.cached_tokens(tokens),
                RouterMode::Load => HashMap::new(),
            },
        }
    }

    pub fn snapshot(&self) -> Arc<ClusterSnapshot> {
        self.view.borrow().clone()
    }

    /// The least loaded decode node not in `exclude` for a request: fewest waiting and open
    /// streams, then the most of the request in its prefix cache, then the most free KV blocks.
    /// `pinned` names a node to take whenever it is live and not excluded: the choices of one
    /// prompt go where its first went, so they share one prefill through that node's cache.
    pub fn pick_decode(
        &self,
        exclude: &[String],
        held: &Held,
        pinned: Option<&str>,
    ) -> Option<(Candidate, ActiveGuard)> {
        let snapshot = self.snapshot();
        let cached = &held.cached;
        let mut loads = lock(&self.loads);
        let live = snapshot
            .decode
            .values()
            .filter(|n| !exclude.contains(&n.node_id));
        let pin = pinned.and_then(|id| live.clone().find(|n| n.node_id == id));
        let best = match pin {
            Some(node) => node,
            None => live.min_by(|a, b| {
                let key = |n: &NodeInfo| {
                    let load = loads.get(&n.node_id);
                    let stats = load.and_then(|l| l.stats.as_ref());
                    let active = load.map_or(0, |l| l.active.load(Ordering::Relaxed));
                    let waiting = stats.map_or(0, |s| s.waiting_sequences as usize);
                    let free = stats.map_or(0.0, |s| {
                        s.free_kv_blocks as f64 / s.total_kv_blocks.max(1) as f64
                    });
                    let held = cached.get(&n.node_id).copied().unwrap_or(0);
                    (active + waiting, Reverse(held), -free)
                };
                let (ka, kb) = (key(a), key(b));
                ka.0.cmp(&kb.0)
                    .then(ka.1.cmp(&kb.1))
                    .then(ka.2.total_cmp(&kb.2))
                    .then(a.node_id.cmp(&b.node_id))
            })?,
        }
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

    /// Prefill nodes whose KV fits `decode`'s cache for a request, cheapest first (see the
    /// module documentation), each with the KV transfer backend to use: NCCL where both ends
    /// offer it, else gRPC.
    pub fn prefill_candidates(&self, decode_node: &str, held: &Held) -> Vec<PrefillCandidate> {
        let snapshot = self.snapshot();
        let Some(decode) = snapshot.decode.get(decode_node) else {
            return Vec::new();
        };
        let (cached, held_tokens) = (&held.cached, held.tokens);
        let mut loads = lock(&self.loads);
        let mut nodes: Vec<(f64, u32, usize, &NodeInfo)> = snapshot
            .prefill
            .values()
            .filter(|p| p.fingerprint == decode.fingerprint)
            .map(|p| {
                let queued = loads.get(&p.node_id).map_or(0, Load::queued_prompt_tokens);
                let held = cached.get(&p.node_id).copied().unwrap_or(0);
                let cost = match self.routing.mode {
                    RouterMode::Kv => {
                        let compute = held_tokens.saturating_sub(held);
                        self.routing.kv_overlap_score_weight * compute as f64 + queued as f64
                    }
                    RouterMode::Load => queued as f64,
                };
                // A random tie-break spreads equal nodes between polls.
                (cost, rand::random::<u32>(), held, p)
            })
            .collect();
        nodes.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        if let Some(&(_, _, held, first)) = nodes.first() {
            metrics::counter!(names::ROUTER_KV_HIT_TOKENS_TOTAL).increment(held as u64);
            let compute = held_tokens.saturating_sub(held) as u64;
            loads
                .entry(first.node_id.clone())
                .or_default()
                .routed
                .push_back((Instant::now(), compute));
        }
        nodes
            .into_iter()
            .take(PREFILL_CANDIDATES)
            .map(|(_, _, _, p)| PrefillCandidate {
                address: p.address.clone(),
                backend: transfer_backend(p, decode).to_wire() as i32,
            })
            .collect()
    }

    /// How many sequences the decode nodes run at once: the sum of their `--max-num-seqs`
    /// (a node that has not reported yet counts with the engine's default).
    pub fn decode_capacity(&self) -> usize {
        let snapshot = self.snapshot();
        let loads = lock(&self.loads);
        snapshot
            .decode
            .keys()
            .map(|id| {
                loads
                    .get(id)
                    .and_then(|l| l.stats.as_ref())
                    .map(|s| s.max_num_seqs as usize)
                    .filter(|&n| n > 0)
                    .unwrap_or(UNREPORTED_CAPACITY)
            })
            .sum()
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
        let asked = Instant::now();
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
            loads.entry(id).or_default().answered(stats, asked);
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

    fn pool_of(prefill: &[&str]) -> Pool {
        let node = |id: &str| NodeInfo {
            node_id: id.into(),
            address: format!("{id}:1"),
            ..Default::default()
        };
        let snapshot = ClusterSnapshot {
            prefill: prefill
                .iter()
                .map(|id| (id.to_string(), node(id)))
                .collect(),
            decode: [("d".to_string(), node("d"))].into_iter().collect(),
            ..Default::default()
        };
        let (_tx, view) = watch::channel(Arc::new(snapshot));
        Pool {
            view,
            rpc: RpcConfig::default(),
            stats_timeout: Duration::from_secs(1),
            loads: Mutex::new(HashMap::new()),
            channels: Mutex::new(HashMap::new()),
            kv: Arc::new(KvIndex::default()),
            routing: Routing::default(),
        }
    }

    #[test]
    fn prompts_routed_together_spread_over_the_prefill_nodes_before_any_stats_show_them() {
        let pool = pool_of(&["a", "b"]);
        let held = Held {
            tokens: 800,
            cached: HashMap::new(),
        };
        let first = |pool: &Pool| pool.prefill_candidates("d", &held)[0].address.clone();
        // No stats have come: each prompt counts on the node it went to, so four go two by two.
        let mut sent: Vec<String> = (0..4).map(|_| first(&pool)).collect();
        sent.sort();
        assert_eq!(sent, ["a:1", "a:1", "b:1", "b:1"]);
        // A stats answer to a call made after them replaces the router's own count.
        let asked = Instant::now();
        {
            let mut loads = lock(&pool.loads);
            let queued = |t| NodeStats {
                queued_prompt_tokens: t,
                ..Default::default()
            };
            loads.get_mut("a").unwrap().answered(Some(queued(0)), asked);
            loads
                .get_mut("b")
                .unwrap()
                .answered(Some(queued(5000)), asked);
        }
        assert_eq!(first(&pool), "a:1");
        assert_eq!(lock(&pool.loads)["a"].queued_prompt_tokens(), 800);
        assert_eq!(lock(&pool.loads)["b"].queued_prompt_tokens(), 5000);
    }
}
