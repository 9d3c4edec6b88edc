//! A node's own entry in etcd: the lease, the key under it, and the task that keeps both alive.

use std::time::Duration;

use etcd_client::{Client, PutOptions};
use pd_proto::v1::NodeInfo;
use prost::Message;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use super::{Backoff, MembershipConfig, MembershipError};

/// This node's presence in the cluster, for as long as the value lives.
///
/// [`Registration::deregister`] revokes the lease so that the node leaves the view at once; a
/// registration dropped without it only stops renewing the lease, and the key lapses after the
/// TTL, as for a node that crashed.
pub struct Registration {
    key: String,
    config: MembershipConfig,
    registered: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    keeper: Option<JoinHandle<KeeperExit>>,
}

/// What the keep-alive task hands back when told to stop: what deregistering needs.
struct KeeperExit {
    client: Client,
    lease: i64,
}

impl Registration {
    /// Grants a lease, puts `info` under the node's key with it, and starts renewing the lease.
    ///
    /// Fails if etcd cannot be reached now: a node that cannot announce itself is invisible,
    /// and its caller decides whether to retry or to exit.
    pub async fn register(
        config: &MembershipConfig,
        info: &NodeInfo,
    ) -> Result<Self, MembershipError> {
        let key = config.node_key(info)?;
        let mut keeper = Keeper {
            config: config.clone(),
            client: config.connect().await?,
            key: key.clone(),
            value: info.encode_to_vec(),
            lease: 0,
        };
        keeper.grant_and_put().await?;
        tracing::info!(key = %key, lease = keeper.lease, "registered in etcd");
        let (registered_tx, registered) = watch::channel(true);
        let (stop, stop_rx) = oneshot::channel();
        let task = tokio::spawn(keeper.run(stop_rx, registered_tx));
        Ok(Self {
            key,
            config: config.clone(),
            registered,
            stop: Some(stop),
            keeper: Some(task),
        })
    }

    /// The etcd key this node is registered under.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether etcd confirmed the registration at the last renewal. False while etcd is
    /// unreachable or the lease is being granted again; a node's health can report it.
    pub fn is_registered(&self) -> bool {
        *self.registered.borrow()
    }

    /// Follows [`Registration::is_registered`] as it changes.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.registered.clone()
    }

    /// Stops renewing and revokes the lease, so that the key is deleted now rather than after
    /// the TTL. An error means etcd could not be told; the key then lapses with the TTL.
    pub async fn deregister(mut self) -> Result<(), MembershipError> {
        if let Some(stop) = self.stop.take() {
            // The task may have ended already; joining it below says how.
            let _ = stop.send(());
        }
        let Some(task) = self.keeper.take() else {
            return Ok(());
        };
        let KeeperExit { mut client, lease } = task
            .await
            .map_err(|e| MembershipError::TaskFailed(format!("keep-alive task: {e}")))?;
        match self
            .config
            .call("lease revoke", client.lease_revoke(lease))
            .await
        {
            Ok(_) => {
                tracing::info!(key = %self.key, lease, "deregistered from etcd");
                Ok(())
            }
            // Already gone (expired while etcd was away): the key went with it.
            Err(MembershipError::Etcd {
                source: etcd_client::Error::GRpcStatus(status),
                ..
            }) if status.code() == tonic::Code::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("registered", &self.is_registered())
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        // Without deregister, stop renewing: the key lapses with the TTL, as for a crash.
        if let Some(task) = self.keeper.take() {
            task.abort();
        }
    }
}

/// Why renewing the current lease stopped.
enum LeaseEnd {
    /// etcd answered that the lease no longer exists (it expired, or etcd lost its data).
    Lost,
    /// etcd did not answer; the lease may still be alive.
    Unreachable(MembershipError),
}

/// The state the keep-alive task owns.
struct Keeper {
    config: MembershipConfig,
    client: Client,
    key: String,
    value: Vec<u8>,
    lease: i64,
}

impl Keeper {
    async fn grant_and_put(&mut self) -> Result<(), MembershipError> {
        let ttl = i64::try_from(self.config.lease_ttl_secs).unwrap_or(i64::MAX);
        let granted = self
            .config
            .call("lease grant", self.client.lease_grant(ttl, None))
            .await?;
        let options = PutOptions::new().with_lease(granted.id());
        self.config
            .call(
                "put",
                self.client
                    .put(self.key.clone(), self.value.clone(), Some(options)),
            )
            .await?;
        self.lease = granted.id();
        Ok(())
    }

    async fn run(
        mut self,
        mut stop: oneshot::Receiver<()>,
        registered: watch::Sender<bool>,
    ) -> KeeperExit {
        let mut backoff = Backoff::new();
        loop {
            let end = tokio::select! {
                _ = &mut stop => return self.exit(),
                end = self.renew_until_lost(&registered, &mut backoff) => end,
            };
            let was_registered = registered.send_replace(false);
            let error = match end {
                LeaseEnd::Lost => {
                    let (key, lease) = (&self.key, self.lease);
                    tracing::warn!(%key, lease, "lease lost; registering again");
                    let granted = tokio::select! {
                        _ = &mut stop => return self.exit(),
                        granted = self.grant_and_put() => granted,
                    };
                    match granted {
                        Ok(()) => {
                            let (key, lease) = (&self.key, self.lease);
                            tracing::info!(%key, lease, "registered again in etcd");
                            // Renewing the new lease marks the node registered.
                            continue;
                        }
                        Err(e) => e,
                    }
                }
                LeaseEnd::Unreachable(e) => e,
            };
            // Once per outage at warn level: retries come every second.
            if was_registered {
                tracing::warn!(key = %self.key, error = %error, "etcd unreachable; retrying");
            } else {
                tracing::debug!(key = %self.key, error = %error, "etcd still unreachable");
            }
            tokio::select! {
                _ = &mut stop => return self.exit(),
                _ = backoff.wait() => {}
            }
            // A fresh channel rather than trusting the broken one to recover.
            if let Ok(client) = self.config.connect().await {
                self.client = client;
            }
        }
    }

    /// Renews the lease every third of its TTL until etcd says it is gone or stops answering.
    async fn renew_until_lost(
        &mut self,
        registered: &watch::Sender<bool>,
        backoff: &mut Backoff,
    ) -> LeaseEnd {
        let period = (self.config.lease_ttl() / 3).max(Duration::from_millis(100));
        let opened = self
            .config
            .call("lease keep-alive", self.client.lease_keep_alive(self.lease))
            .await;
        let (mut keeper, mut responses) = match opened {
            Ok(pair) => pair,
            // etcd-client's way of saying the first renewal found no such lease.
            Err(MembershipError::Etcd {
                source: etcd_client::Error::LeaseKeepAliveError(_),
                ..
            }) => return LeaseEnd::Lost,
            Err(e) => return LeaseEnd::Unreachable(e),
        };
        // Opening the stream renewed the lease once.
        registered.send_replace(true);
        backoff.reset();
        let mut ticks = tokio::time::interval(period);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            if let Err(source) = keeper.keep_alive().await {
                return LeaseEnd::Unreachable(MembershipError::Etcd {
                    op: "lease keep-alive",
                    source,
                });
            }
            // An answer later than a period leaves too little of the TTL to rely on.
            match tokio::time::timeout(period, responses.message()).await {
                Ok(Ok(Some(response))) if response.ttl() > 0 => {}
                Ok(Ok(Some(_))) => return LeaseEnd::Lost,
                Ok(Ok(None)) => {
                    return LeaseEnd::Unreachable(MembershipError::StreamClosed {
                        op: "lease keep-alive",
                    })
                }
                Ok(Err(source)) => {
                    return LeaseEnd::Unreachable(MembershipError::Etcd {
                        op: "lease keep-alive",
                        source,
                    })
                }
                Err(_) => {
                    return LeaseEnd::Unreachable(MembershipError::Timeout {
                        op: "lease keep-alive",
                        after: period,
                    })
                }
            }
        }
    }

    fn exit(self) -> KeeperExit {
        KeeperExit {
            client: self.client,
            lease: self.lease,
        }
    }
}
