//! The router's view of the cluster: the registered nodes, kept current by an etcd watch.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{Client, Event, EventType, GetOptions, WatchOptions};
use pd_proto::v1::{NodeInfo, NodeRole};
use prost::Message;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{role_from_segment, Backoff, MembershipConfig, MembershipError};

/// How long a watch may stay silent before we ask etcd for a progress notice; a second silence
/// as long means etcd is gone even though the connection was never closed (a partition).
const WATCH_HEARTBEAT: Duration = Duration::from_secs(2);

/// The cluster as last seen in etcd.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterSnapshot {
    /// Prefill nodes by node id.
    pub prefill: BTreeMap<String, NodeInfo>,
    /// Decode nodes by node id.
    pub decode: BTreeMap<String, NodeInfo>,
    /// Routers by node id.
    pub router: BTreeMap<String, NodeInfo>,
    /// Whether the watch on etcd is live. When false, the nodes are the last ones known.
    pub etcd_connected: bool,
    /// When etcd last answered (a list, an event or a progress notice); `None` before the first.
    /// It advances without waking receivers: only node and connection changes do.
    pub last_contact: Option<Instant>,
}

static NO_NODES: BTreeMap<String, NodeInfo> = BTreeMap::new();

impl ClusterSnapshot {
    /// The nodes of one role, by node id.
    pub fn nodes(&self, role: NodeRole) -> &BTreeMap<String, NodeInfo> {
        match role {
            NodeRole::Prefill => &self.prefill,
            NodeRole::Decode => &self.decode,
            NodeRole::Router => &self.router,
            NodeRole::Unspecified => &NO_NODES,
        }
    }

    /// A node of any role, by id.
    pub fn node(&self, node_id: &str) -> Option<&NodeInfo> {
        self.prefill
            .get(node_id)
            .or_else(|| self.decode.get(node_id))
            .or_else(|| self.router.get(node_id))
    }

    /// Number of nodes of all roles.
    pub fn len(&self) -> usize {
        self.prefill.len() + self.decode.len() + self.router.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A live view of the cluster's membership. Dropping it stops following etcd.
#[derive(Debug)]
pub struct MembershipWatch {
    view: watch::Receiver<Arc<ClusterSnapshot>>,
    task: JoinHandle<()>,
}

impl MembershipWatch {
    /// A receiver of every new snapshot, for as long as this watch lives.
    pub fn subscribe(&self) -> watch::Receiver<Arc<ClusterSnapshot>> {
        self.view.clone()
    }

    /// The current snapshot.
    pub fn current(&self) -> Arc<ClusterSnapshot> {
        self.view.borrow().clone()
    }
}

impl Drop for MembershipWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Lists the nodes registered under `config`'s cluster, then follows their changes.
///
/// Fails only if the first list does: the first snapshot is then complete. Later outages do not
/// end the watch: the view keeps its nodes with `etcd_connected = false`, and lists again when
/// etcd answers.
pub async fn watch(config: &MembershipConfig) -> Result<MembershipWatch, MembershipError> {
    let (sender, view) = watch::channel(Arc::new(ClusterSnapshot::default()));
    let mut watcher = Watcher {
        config: config.clone(),
        client: config.connect().await?,
        prefix: config.nodes_prefix(),
        nodes: HashMap::new(),
        connected: false,
        last_contact: None,
        sender,
    };
    let revision = watcher.list().await?;
    let task = tokio::spawn(watcher.run(revision));
    Ok(MembershipWatch { view, task })
}

/// Why following the watch stopped.
enum WatchEnd {
    /// etcd is fine but the watch cannot go on from where it was (compaction, cancel).
    Resync(String),
    /// etcd did not answer.
    Unreachable(MembershipError),
}

/// The state the watch task owns; snapshots are built from it.
struct Watcher {
    config: MembershipConfig,
    client: Client,
    prefix: String,
    /// Valid nodes by etcd key (a DELETE names only the key).
    nodes: HashMap<String, NodeInfo>,
    connected: bool,
    last_contact: Option<Instant>,
    sender: watch::Sender<Arc<ClusterSnapshot>>,
}

impl Watcher {
    async fn run(mut self, listed_at: i64) {
        let mut backoff = Backoff::new();
        let mut revision = Some(listed_at);
        loop {
            let from = match revision.take() {
                Some(from) => from,
                None => match self.list().await {
                    Ok(from) => {
                        backoff.reset();
                        from
                    }
                    Err(e) => {
                        self.lost_etcd(&e);
                        self.reconnect(&mut backoff).await;
                        continue;
                    }
                },
            };
            match self.follow(from).await {
                WatchEnd::Resync(reason) => {
                    tracing::info!(%reason, "membership watch restarts from a new list");
                    backoff.wait().await;
                }
                WatchEnd::Unreachable(e) => {
                    self.lost_etcd(&e);
                    self.reconnect(&mut backoff).await;
                }
            }
        }
    }

    /// Marks the view disconnected, keeping its nodes: serving with the last view beats
    /// serving with none.
    fn lost_etcd(&mut self, error: &MembershipError) {
        if self.connected {
            tracing::warn!(%error, "etcd unreachable; keeping the last view");
            self.connected = false;
            self.publish(false);
        } else {
            tracing::debug!(%error, "etcd still unreachable");
        }
    }

    /// Waits, then replaces the client: a fresh channel rather than trusting a broken one.
    async fn reconnect(&mut self, backoff: &mut Backoff) {
        backoff.wait().await;
        match self.config.connect().await {
            Ok(client) => self.client = client,
            Err(e) => tracing::debug!(error = %e, "cannot create an etcd client"),
        }
    }

    /// Replaces the view with the prefix's current content; returns the revision it was read at.
    async fn list(&mut self) -> Result<i64, MembershipError> {
        let options = GetOptions::new().with_prefix();
        let response = self
            .config
            .call("get", self.client.get(self.prefix.clone(), Some(options)))
            .await?;
        let revision = response
            .header()
            .map(|h| h.revision())
            .ok_or(MembershipError::UnexpectedResponse("a get without header"))?;
        let mut nodes = HashMap::with_capacity(response.kvs().len());
        for kv in response.kvs() {
            let Ok(key) = kv.key_str() else {
                tracing::warn!(key = ?kv.key(), "ignoring a key that is not UTF-8");
                continue;
            };
            match parse_node(&self.prefix, key, kv.value()) {
                Ok(info) => {
                    nodes.insert(key.to_owned(), info);
                }
                Err(reason) => tracing::warn!(key, %reason, "ignoring an invalid node entry"),
            }
        }
        let changed = nodes != self.nodes;
        self.nodes = nodes;
        self.connected = true;
        self.last_contact = Some(Instant::now());
        self.publish(changed);
        Ok(revision)
    }

    /// Applies the watch's events from `listed_at + 1` until it breaks.
    async fn follow(&mut self, listed_at: i64) -> WatchEnd {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(listed_at + 1);
        let opened = self
            .config
            .call(
                "watch",
                self.client.watch(self.prefix.clone(), Some(options)),
            )
            .await;
        let mut stream = match opened {
            Ok(stream) => stream,
            Err(e) => return WatchEnd::Unreachable(e),
        };
        let mut awaiting_progress = false;
        loop {
            let response = match tokio::time::timeout(WATCH_HEARTBEAT, stream.message()).await {
                Ok(Ok(Some(response))) => response,
                Ok(Ok(None)) => {
                    return WatchEnd::Unreachable(MembershipError::StreamClosed { op: "watch" })
                }
                Ok(Err(source)) => {
                    return WatchEnd::Unreachable(MembershipError::Etcd {
                        op: "watch",
                        source,
                    })
                }
                Err(_) if awaiting_progress => {
                    return WatchEnd::Unreachable(MembershipError::Timeout {
                        op: "watch progress",
                        after: WATCH_HEARTBEAT,
                    })
                }
                Err(_) => {
                    if let Err(source) = stream.request_progress().await {
                        return WatchEnd::Unreachable(MembershipError::Etcd {
                            op: "watch progress",
                            source,
                        });
                    }
                    awaiting_progress = true;
                    continue;
                }
            };
            awaiting_progress = false;
            self.last_contact = Some(Instant::now());
            if response.canceled() || response.compact_revision() != 0 {
                return WatchEnd::Resync(format!(
                    "watch canceled (compacted at {}): {}",
                    response.compact_revision(),
                    response.cancel_reason()
                ));
            }
            let mut changed = false;
            for event in response.events() {
                changed |= self.apply(event);
            }
            self.publish(changed);
        }
    }

    /// Applies one event; returns whether the set of nodes changed.
    fn apply(&mut self, event: &Event) -> bool {
        let Some(kv) = event.kv() else {
            return false;
        };
        let Ok(key) = kv.key_str() else {
            tracing::warn!(key = ?kv.key(), "ignoring a key that is not UTF-8");
            return false;
        };
        match event.event_type() {
            EventType::Delete => self.nodes.remove(key).is_some(),
            EventType::Put => match parse_node(&self.prefix, key, kv.value()) {
                Ok(info) => {
                    let changed = self.nodes.get(key) != Some(&info);
                    self.nodes.insert(key.to_owned(), info);
                    changed
                }
                Err(reason) => {
                    tracing::warn!(key, %reason, "ignoring an invalid node entry");
                    // What the key held before is no longer what the node says.
                    self.nodes.remove(key).is_some()
                }
            },
        }
    }

    /// Publishes the state. Receivers wake on node or connection changes only; the contact time
    /// is updated in place so that health checks read it without every receiver waking.
    fn publish(&self, nodes_changed: bool) {
        self.sender.send_if_modified(|snapshot| {
            if nodes_changed || snapshot.etcd_connected != self.connected {
                *snapshot = Arc::new(self.snapshot());
                true
            } else {
                Arc::make_mut(snapshot).last_contact = self.last_contact;
                false
            }
        });
    }

    fn snapshot(&self) -> ClusterSnapshot {
        let mut snapshot = ClusterSnapshot {
            etcd_connected: self.connected,
            last_contact: self.last_contact,
            ..Default::default()
        };
        for info in self.nodes.values() {
            let by_role = match info.role() {
                NodeRole::Prefill => &mut snapshot.prefill,
                NodeRole::Decode => &mut snapshot.decode,
                NodeRole::Router => &mut snapshot.router,
                // parse_node admits no other role.
                NodeRole::Unspecified => continue,
            };
            by_role.insert(info.node_id.clone(), info.clone());
        }
        snapshot
    }
}

/// Decodes and checks one entry: the key must be `<prefix><role>/<node-id>` and the value a
/// `NodeInfo` that names the same role and id.
fn parse_node(prefix: &str, key: &str, value: &[u8]) -> Result<NodeInfo, String> {
    let rest = key
        .strip_prefix(prefix)
        .ok_or_else(|| format!("key outside {prefix}"))?;
    let (segment, node_id) = rest
        .split_once('/')
        .filter(|(_, id)| !id.is_empty() && !id.contains('/'))
        .ok_or("key is not <role>/<node-id>")?;
    let role = role_from_segment(segment).ok_or_else(|| format!("unknown role {segment:?}"))?;
    let info = NodeInfo::decode(value).map_err(|e| format!("not a NodeInfo: {e}"))?;
    if info.node_id != node_id || info.role() != role {
        return Err(format!(
            "value names node {:?} with role {:?}, key says {node_id:?} with {role:?}",
            info.node_id,
            info.role()
        ));
    }
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_must_match_their_key() {
        let mut info = NodeInfo {
            node_id: "p0".into(),
            address: "10.0.0.1:7000".into(),
            ..Default::default()
        };
        info.set_role(NodeRole::Prefill);
        let bytes = info.encode_to_vec();
        assert_eq!(
            parse_node("/pd/nodes/", "/pd/nodes/prefill/p0", &bytes),
            Ok(info)
        );
        for key in [
            "/pd/nodes/decode/p0",
            "/pd/nodes/prefill/p1",
            "/pd/nodes/prefill/",
            "/pd/nodes/prefill/p0/x",
            "/pd/nodes/other/p0",
            "/other/nodes/prefill/p0",
        ] {
            assert!(parse_node("/pd/nodes/", key, &bytes).is_err(), "{key}");
        }
        assert!(parse_node("/pd/nodes/", "/pd/nodes/prefill/p0", b"\xff\xff\xff").is_err());
        assert!(parse_node("/pd/nodes/", "/pd/nodes/prefill/p0", b"").is_err());
    }
}
