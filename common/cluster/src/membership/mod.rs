//! Cluster membership in etcd: who is alive, and how to reach them.
//!
//! Every node announces itself with a [`Registration`]: a [`NodeInfo`] stored under
//! `/<cluster>/nodes/<role>/<node-id>`, attached to a lease that a background task keeps alive.
//! A node that dies stops renewing its lease and etcd deletes its key after the TTL; a node that
//! shuts down cleanly revokes the lease so that it leaves at once. The router follows the
//! membership with [`watch`]: a list of the prefix, then a watch from the revision after it,
//! published as a [`ClusterSnapshot`] on a `tokio::sync::watch` channel. Neither side gives up
//! when etcd goes away: registrations re-grant their lease and re-put their key when etcd comes
//! back, and the view keeps the last nodes it knew (marked disconnected) until it can list again.

mod registration;
mod view;

use std::path::PathBuf;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};
use pd_proto::v1::{NodeInfo, NodeRole};
use serde::{Deserialize, Serialize};

use crate::ErrorKind;

pub use registration::Registration;
pub use view::{watch, ClusterSnapshot, MembershipWatch};

const DEFAULT_ETCD_ENDPOINT: &str = "http://127.0.0.1:2379";
const DEFAULT_CLUSTER: &str = "pd";
const DEFAULT_LEASE_TTL_SECS: u64 = 5;

const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 3_000;
/// First and longest pause between attempts to reach etcd again.
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// Where etcd is and how this node's registration behaves.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct MembershipConfig {
    /// etcd client URLs, comma-separated (e.g. http://etcd-0:2379,http://etcd-1:2379).
    #[arg(
        long = "etcd-endpoints",
        env = "PD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = DEFAULT_ETCD_ENDPOINT
    )]
    pub etcd_endpoints: Vec<String>,

    /// Name of the cluster: the first segment of every key, so several clusters can share an etcd.
    #[arg(long, env = "PD_CLUSTER", default_value = DEFAULT_CLUSTER)]
    pub cluster: String,

    /// Lease TTL of a node's registration in seconds: how long a dead node stays listed.
    #[arg(long, env = "PD_LEASE_TTL_SECS", default_value_t = DEFAULT_LEASE_TTL_SECS)]
    pub lease_ttl_secs: u64,

    /// How long opening a connection to an etcd endpoint may take, in milliseconds.
    #[arg(long, env = "PD_ETCD_CONNECT_TIMEOUT_MS", default_value_t = DEFAULT_CONNECT_TIMEOUT_MS)]
    pub etcd_connect_timeout_ms: u64,

    /// Bound on every unary etcd call, in milliseconds: a channel with no reachable endpoint
    /// would otherwise wait forever.
    #[arg(long, env = "PD_ETCD_REQUEST_TIMEOUT_MS", default_value_t = DEFAULT_REQUEST_TIMEOUT_MS)]
    pub etcd_request_timeout_ms: u64,

    /// PEM file of the CA that signed etcd's certificate: etcd is then reached over TLS (give
    /// https:// endpoints).
    #[arg(long, env = "PD_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,

    /// PEM certificate this process shows etcd (for etcd's --client-cert-auth), with
    /// --etcd-key.
    #[arg(long, env = "PD_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,

    /// PEM private key of --etcd-cert.
    #[arg(long, env = "PD_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,

    /// etcd user, for etcd's own authentication (with --etcd-password).
    #[arg(long, env = "PD_ETCD_USER")]
    pub etcd_user: Option<String>,

    /// Password of --etcd-user.
    #[arg(long, env = "PD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        Self {
            etcd_endpoints: vec![DEFAULT_ETCD_ENDPOINT.to_string()],
            cluster: DEFAULT_CLUSTER.to_string(),
            lease_ttl_secs: DEFAULT_LEASE_TTL_SECS,
            etcd_connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            etcd_request_timeout_ms: DEFAULT_REQUEST_TIMEOUT_MS,
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
            etcd_user: None,
            etcd_password: None,
        }
    }
}

impl MembershipConfig {
    /// `/<cluster>/nodes/`: the prefix under which every node registers.
    pub fn nodes_prefix(&self) -> String {
        format!("/{}/nodes/", self.cluster)
    }

    /// `/<cluster>/nodes/<role>/<node-id>`: the key `info` registers under.
    pub fn node_key(&self, info: &NodeInfo) -> Result<String, MembershipError> {
        let role = role_segment(info.role()).ok_or_else(|| {
            MembershipError::InvalidNodeInfo(format!(
                "node {:?} has no role (prefill, decode or router)",
                info.node_id
            ))
        })?;
        if info.node_id.is_empty() || info.node_id.contains('/') {
            return Err(MembershipError::InvalidNodeInfo(format!(
                "node id {:?} must be non-empty and without '/'",
                info.node_id
            )));
        }
        Ok(format!("{}{role}/{}", self.nodes_prefix(), info.node_id))
    }

    fn validate(&self) -> Result<(), MembershipError> {
        if self.etcd_endpoints.iter().all(|e| e.trim().is_empty()) {
            return Err(MembershipError::InvalidConfig(
                "no etcd endpoint given".into(),
            ));
        }
        if self.cluster.is_empty() || self.cluster.contains('/') {
            return Err(MembershipError::InvalidConfig(format!(
                "cluster name {:?} must be non-empty and without '/'",
                self.cluster
            )));
        }
        if self.etcd_connect_timeout_ms == 0 || self.etcd_request_timeout_ms == 0 {
            return Err(MembershipError::InvalidConfig(
                "etcd timeouts must be positive".into(),
            ));
        }
        if self.lease_ttl_secs == 0 {
            return Err(MembershipError::InvalidConfig(
                "lease TTL must be at least 1 second".into(),
            ));
        }
        Ok(())
    }

    /// Timeouts, and TLS and credentials where configured.
    fn connect_options(&self) -> Result<ConnectOptions, MembershipError> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_millis(self.etcd_connect_timeout_ms));
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|e| {
                MembershipError::InvalidConfig(format!("cannot read {}: {e}", path.display()))
            })
        };
        let identity = match (&self.etcd_cert, &self.etcd_key) {
            (Some(cert), Some(key)) => Some(Identity::from_pem(read(cert)?, read(key)?)),
            (None, None) => None,
            _ => {
                return Err(MembershipError::InvalidConfig(
                    "--etcd-cert and --etcd-key go together".into(),
                ))
            }
        };
        if self.etcd_ca.is_some() || identity.is_some() {
            let mut tls = TlsOptions::new();
            if let Some(ca) = &self.etcd_ca {
                tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
            }
            if let Some(identity) = identity {
                tls = tls.identity(identity);
            }
            options = options.with_tls(tls);
        }
        match (&self.etcd_user, &self.etcd_password) {
            (Some(user), Some(password)) => options = options.with_user(user, password),
            (None, None) => {}
            _ => {
                return Err(MembershipError::InvalidConfig(
                    "--etcd-user and --etcd-password go together".into(),
                ))
            }
        }
        Ok(options)
    }

    fn lease_ttl(&self) -> Duration {
        Duration::from_secs(self.lease_ttl_secs)
    }

    /// A client for the configured endpoints. It connects lazily: an unreachable etcd shows up
    /// at the first call, not here.
    async fn connect(&self) -> Result<Client, MembershipError> {
        self.validate()?;
        let endpoints: Vec<&str> = self
            .etcd_endpoints
            .iter()
            .map(|e| e.trim())
            .filter(|e| !e.is_empty())
            .collect();
        let options = self.connect_options()?;
        Client::connect(endpoints, Some(options))
            .await
            .map_err(|source| match source {
                etcd_client::Error::InvalidArgs(_) | etcd_client::Error::InvalidUri(_) => {
                    MembershipError::InvalidConfig(format!(
                        "etcd endpoints {:?}: {source}",
                        self.etcd_endpoints
                    ))
                }
                source => MembershipError::Etcd {
                    op: "connect",
                    source,
                },
            })
    }
}

/// The path segment of a role; `None` for an unspecified role, which a node never registers with.
pub fn role_segment(role: NodeRole) -> Option<&'static str> {
    match role {
        NodeRole::Prefill => Some("prefill"),
        NodeRole::Decode => Some("decode"),
        NodeRole::Router => Some("router"),
        NodeRole::Unspecified => None,
    }
}

fn role_from_segment(segment: &str) -> Option<NodeRole> {
    match segment {
        "prefill" => Some(NodeRole::Prefill),
        "decode" => Some(NodeRole::Decode),
        "router" => Some(NodeRole::Router),
        _ => None,
    }
}

/// What can go wrong with membership.
#[derive(Debug, thiserror::Error)]
pub enum MembershipError {
    #[error("membership configuration: {0}")]
    InvalidConfig(String),

    #[error("node info: {0}")]
    InvalidNodeInfo(String),

    #[error("etcd {op}: {source}")]
    Etcd {
        op: &'static str,
        #[source]
        source: etcd_client::Error,
    },

    #[error("etcd {op}: no answer within {after:?}")]
    Timeout { op: &'static str, after: Duration },

    #[error("etcd answered with {0}")]
    UnexpectedResponse(&'static str),

    #[error("etcd {op}: etcd closed the stream")]
    StreamClosed { op: &'static str },

    #[error("membership task failed: {0}")]
    TaskFailed(String),
}

impl MembershipError {
    /// How the edges should report this error.
    pub fn kind(&self) -> ErrorKind {
        match self {
            MembershipError::InvalidConfig(_) | MembershipError::InvalidNodeInfo(_) => {
                ErrorKind::InvalidArgument
            }
            MembershipError::Etcd { .. }
            | MembershipError::Timeout { .. }
            | MembershipError::StreamClosed { .. }
            | MembershipError::UnexpectedResponse(_) => ErrorKind::Unavailable,
            MembershipError::TaskFailed(_) => ErrorKind::Internal,
        }
    }
}

impl MembershipConfig {
    /// Runs one etcd call within `--etcd-request-timeout-ms`, naming it in the error.
    async fn call<T>(
        &self,
        op: &'static str,
        fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, MembershipError> {
        let after = Duration::from_millis(self.etcd_request_timeout_ms);
        match tokio::time::timeout(after, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(MembershipError::Etcd { op, source }),
            Err(_) => Err(MembershipError::Timeout { op, after }),
        }
    }
}

/// Exponential pauses between attempts to reach etcd, so a long outage costs few connections
/// while a restart is noticed within a second.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Self { next: RETRY_MIN }
    }

    fn reset(&mut self) {
        self.next = RETRY_MIN;
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(RETRY_MAX);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        membership: MembershipConfig,
    }

    #[test]
    fn flag_defaults_match_default_impl() {
        let cli = Cli::try_parse_from(["test"]).unwrap();
        // The environment could override the defaults; only compare when it does not.
        let overridden = [
            "PD_ETCD_ENDPOINTS",
            "PD_CLUSTER",
            "PD_LEASE_TTL_SECS",
            "PD_ETCD_CONNECT_TIMEOUT_MS",
            "PD_ETCD_REQUEST_TIMEOUT_MS",
        ]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
        if !overridden {
            assert_eq!(cli.membership, MembershipConfig::default());
        }
        let cli =
            Cli::try_parse_from(["test", "--etcd-endpoints", "http://a:1,http://b:2"]).unwrap();
        assert_eq!(cli.membership.etcd_endpoints, ["http://a:1", "http://b:2"]);
    }

    #[test]
    fn keys_follow_the_layout_and_reject_bad_names() {
        let config = MembershipConfig::default();
        let mut info = NodeInfo {
            node_id: "d0".into(),
            ..Default::default()
        };
        info.set_role(NodeRole::Decode);
        assert_eq!(config.node_key(&info).unwrap(), "/pd/nodes/decode/d0");
        info.node_id = "a/b".into();
        assert!(matches!(
            config.node_key(&info),
            Err(MembershipError::InvalidNodeInfo(_))
        ));
        info.node_id = "d0".into();
        info.set_role(NodeRole::Unspecified);
        assert!(config.node_key(&info).is_err());
        let bad = MembershipConfig {
            lease_ttl_secs: 0,
            ..Default::default()
        };
        assert!(matches!(
            bad.validate(),
            Err(MembershipError::InvalidConfig(_))
        ));
    }
}
