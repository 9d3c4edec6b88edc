//! A real local cluster on loopback: etcd, prefill and decode nodes, and the router, each on
//! ports the kernel picks. By default every member is an OS process logging to a file in a
//! temporary directory; with [`ClusterSpec::in_process`] the nodes and the router run inside
//! the test's own process instead ([`task`]), through the same `run` functions their binaries
//! call, which starts faster and cannot run stale binaries. The cluster integration tests and
//! the `pd-cluster` launcher start it; tests then kill, stop and add nodes and take etcd down
//! and up again (killing and freezing need processes).
//!
//! Every wait polls under a deadline (ready lines, the router's `/health`); none sleeps for a
//! fixed time. Dropping a [`Cluster`] SIGKILLs every child, so a failing test leaks no process;
//! its logs are then kept (as they are with `PD_KEEP_LOGS=1`) and their directory printed.

mod etcd;
mod process;
mod spawn;
mod task;
mod tls;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use tokio::time::Instant;

use etcd::Etcd;
pub use process::{bin_dir, binary};
use spawn::{node_ready, Blueprint, Member};
pub use tls::ClusterTls;

/// How long a node or the router may take to print its ready line: loading the model is slow
/// in debug builds.
pub const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the router may take to see the nodes of a starting cluster in etcd.
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node may drain after SIGTERM before it is killed.
pub const STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `/health` is polled.
const HEALTH_POLL: Duration = Duration::from_millis(50);

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    pub prefill: usize,
    pub decode: usize,
    /// Passed as `--model` to every node and the router; `None` lets them use their default.
    pub model: Option<PathBuf>,
    pub lease_ttl_secs: u64,
    /// Extra flags, after the harness's own; a flag the harness already passes (`--listen`,
    /// `--cluster`, ...) cannot be given again.
    pub decode_args: Vec<String>,
    pub prefill_args: Vec<String>,
    pub router_args: Vec<String>,
    /// Where the router serves HTTP and gRPC; `None`: a free loopback port.
    pub router_http: Option<std::net::SocketAddr>,
    pub router_grpc: Option<std::net::SocketAddr>,
    /// Run the nodes and the router in this process rather than as child processes (etcd is
    /// a process either way). Such nodes cannot be killed or frozen, and share this process's
    /// metrics recorder.
    pub in_process: bool,
    /// Mutual TLS between every process and to etcd, with a throwaway CA made for the cluster
    /// (the router's client APIs stay plain).
    pub tls: bool,
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            prefill: 1,
            decode: 1,
            model: None,
            // Short, so that tests see a killed node leave within seconds.
            lease_ttl_secs: 2,
            decode_args: Vec::new(),
            prefill_args: Vec::new(),
            router_args: Vec::new(),
            router_http: None,
            router_grpc: None,
            in_process: false,
            tls: false,
        }
    }
}

/// The kind of a worker node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    Prefill,
    Decode,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Prefill => "prefill",
            Role::Decode => "decode",
        }
    }

    pub fn binary(self) -> &'static str {
        match self {
            Role::Prefill => "pd-prefill",
            Role::Decode => "pd-decode",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A running worker node, as its ready line announced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSummary {
    pub id: String,
    pub role: Role,
    /// host:port of its gRPC server.
    pub grpc: String,
    /// host:port of its `/metrics`.
    pub metrics: String,
    pub pid: u32,
    pub log: PathBuf,
}

impl NodeSummary {
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.grpc)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.metrics)
    }
}

/// A member that went away without being asked (see [`Cluster::reap_exited`]).
#[derive(Debug, Clone)]
pub struct ExitedProcess {
    /// A node id, `router` or `etcd`.
    pub id: String,
    /// How it ended (an exit status, or an in-process member's outcome).
    pub status: String,
    pub log: PathBuf,
}

/// The router's `GET /health` answer.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RouterHealth {
    /// The HTTP status of the answer.
    #[serde(skip)]
    pub http_status: u16,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub etcd_connected: bool,
    #[serde(default)]
    pub nodes: NodeCounts,
    /// Sequences the decode nodes run at once, as the router last polled them.
    #[serde(default)]
    pub decode_capacity: usize,
}

/// How many nodes of each role the router sees.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub struct NodeCounts {
    #[serde(default)]
    pub prefill: usize,
    #[serde(default)]
    pub decode: usize,
}

struct Node {
    summary: NodeSummary,
    process: Member,
}

/// A running cluster; see the module documentation.
pub struct Cluster {
    router: Member,
    /// host:port of the router's HTTP API and of its client-facing gRPC.
    router_http: String,
    router_grpc: String,
    nodes: Vec<Node>,
    etcd: Etcd,
    blueprint: Blueprint,
    http: reqwest::Client,
    /// Dropped after every process, so no log disappears under a running process.
    dir: tempfile::TempDir,
}

impl Cluster {
    /// Starts etcd, then the prefill and decode nodes side by side, then the router, and waits
    /// until the router's `/health` answers 200 (any status for a cluster of no decode node),
    /// says etcd is connected and counts every node.
    pub async fn start(spec: ClusterSpec) -> Result<Cluster> {
        let mut dir = tempfile::Builder::new()
            .prefix("pd-cluster-")
            .tempdir()
            .context("creating the cluster's temporary directory")?;
        dir.disable_cleanup(keep_logs());
        let tls = match spec.tls {
            true => Some(ClusterTls::generate(dir.path(), "cluster")?),
            false => None,
        };
        let etcd_tls = tls
            .as_ref()
            .map(|t| [t.ca.clone(), t.cert.clone(), t.key.clone()]);
        let etcd = Etcd::start(dir.path(), etcd_tls).await?;
        let mut blueprint = Blueprint {
            tls,
            name: format!("t{:016x}", rand::random::<u64>()),
            etcd_url: etcd.client_url(),
            dir: dir.path().to_path_buf(),
            next_prefill: 0,
            next_decode: 0,
            spec,
        };

        // All spawned before any is waited for, so the models load in parallel.
        let mut spawned = Vec::new();
        for role in [Role::Prefill, Role::Decode] {
            let count = match role {
                Role::Prefill => blueprint.spec.prefill,
                Role::Decode => blueprint.spec.decode,
            };
            for _ in 0..count {
                let (id, starting) = blueprint.spawn_node(role).await?;
                spawned.push((role, id, starting));
            }
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut nodes = Vec::with_capacity(spawned.len());
        for (role, id, process) in spawned {
            nodes.push(node_ready(role, id, process, deadline).await?);
        }

        let (router, router_http, router_grpc) = blueprint.spawn_router().await?;
        let http = reqwest::Client::builder()
            // Loopback only: a proxy from the environment must not get in the way.
            .no_proxy()
            .timeout(Duration::from_secs(2))
            .build()
            .context("building the HTTP client")?;
        let cluster = Cluster {
            router,
            router_http,
            router_grpc,
            nodes,
            etcd,
            blueprint,
            http,
            dir,
        };
        let want = NodeCounts {
            prefill: cluster.blueprint.spec.prefill,
            decode: cluster.blueprint.spec.decode,
        };
        cluster
            .wait_health(
                HEALTH_TIMEOUT,
                &format!("a healthy router seeing {want:?}"),
                // Without a decode node the router calls itself unavailable (503), rightly.
                |h| {
                    (h.http_status == 200 || want.decode == 0)
                        && h.etcd_connected
                        && h.nodes == want
                },
            )
            .await?;
        Ok(cluster)
    }

    /// `http://host:port` of the router's OpenAI-style HTTP API (it serves `/metrics` too).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.router_http)
    }

    /// `http://host:port` of the router's client-facing gRPC.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.router_grpc)
    }

    /// Channel settings for reaching the cluster's nodes: with its TLS when it has any.
    pub fn rpc(&self) -> pd_common::rpc::RpcConfig {
        self.blueprint
            .tls
            .as_ref()
            .map_or_else(Default::default, ClusterTls::rpc)
    }

    /// The cluster's CA, when it runs mutual TLS.
    pub fn tls(&self) -> Option<&ClusterTls> {
        self.blueprint.tls.as_ref()
    }

    pub fn etcd_url(&self) -> String {
        self.etcd.client_url()
    }

    /// The etcd prefix of this cluster, unique per `Cluster`.
    pub fn cluster_name(&self) -> &str {
        &self.blueprint.name
    }

    /// The directory of the logs: `<node id>.log`, `router.log`, `etcd.log`.
    pub fn log_dir(&self) -> &Path {
        self.dir.path()
    }

    /// The router's pid; 0 when it runs in-process.
    pub fn router_pid(&self) -> u32 {
        match &self.router {
            Member::Process(p) => p.pid(),
            Member::Task(_) => 0,
        }
    }

    /// The worker nodes started and not killed, stopped or found exited.
    pub fn nodes(&self) -> Vec<NodeSummary> {
        self.nodes.iter().map(|n| n.summary.clone()).collect()
    }

    /// The first running node of `role`.
    pub fn first_node(&self, role: Role) -> Option<NodeSummary> {
        self.nodes().into_iter().find(|n| n.role == role)
    }

    pub fn node(&self, id: &str) -> Option<&NodeSummary> {
        self.nodes.iter().map(|n| &n.summary).find(|s| s.id == id)
    }

    /// Starts one more node and waits for its ready line (not for the router to see it: call
    /// [`Cluster::wait_for_nodes`] for that). Returns its id.
    pub async fn add_node(&mut self, role: Role) -> Result<String> {
        let (id, starting) = self.blueprint.spawn_node(role).await?;
        let node = node_ready(role, id.clone(), starting, Instant::now() + READY_TIMEOUT).await?;
        self.nodes.push(node);
        Ok(id)
    }

    /// SIGKILLs node `id`, as a crash would, and reaps it. Only child processes can be killed.
    pub fn kill_node(&mut self, id: &str) -> Result<()> {
        if self.blueprint.spec.in_process {
            bail!("node {id} runs in-process and cannot be killed: use a cluster of processes");
        }
        let mut node = self.take_node(id)?;
        if let Member::Process(p) = &mut node.process {
            p.kill();
        }
        Ok(())
    }

    /// SIGTERMs node `id` and waits for it to exit (SIGKILL after [`STOP_TIMEOUT`]); an error
    /// if it had to be killed or exited with a failure.
    pub async fn stop_node(&mut self, id: &str) -> Result<()> {
        let mut node = self.take_node(id)?;
        node.process.stop(STOP_TIMEOUT).await
    }

    fn take_node(&mut self, id: &str) -> Result<Node> {
        match self.nodes.iter().position(|n| n.summary.id == id) {
            Some(i) => Ok(self.nodes.remove(i)),
            None => bail!("no running node {id:?} in this cluster"),
        }
    }

    /// SIGKILLs etcd; its data stays for [`Cluster::restart_etcd`].
    pub fn kill_etcd(&mut self) {
        self.etcd.kill();
    }

    /// Starts etcd again (killing it first if it runs) on the same ports and data, and waits
    /// until it serves.
    pub async fn restart_etcd(&mut self) -> Result<()> {
        self.etcd.restart().await
    }

    /// The router's `/health` answer, whatever its HTTP status.
    pub async fn health(&self) -> Result<RouterHealth> {
        let url = format!("{}/health", self.http_url());
        let response = self.http.get(&url).send().await?;
        let http_status = response.status().as_u16();
        let body = response.text().await?;
        let mut health: RouterHealth = serde_json::from_str(&body)
            .with_context(|| format!("GET {url} answered {http_status} with {body:?}"))?;
        health.http_status = http_status;
        Ok(health)
    }

    /// Waits until the router counts `prefill` and `decode` nodes, whatever its HTTP status (a
    /// router without decode nodes may call itself unhealthy) and whether etcd is up or not.
    pub async fn wait_for_nodes(
        &self,
        prefill: usize,
        decode: usize,
        timeout: Duration,
    ) -> Result<()> {
        let want = NodeCounts { prefill, decode };
        self.wait_health(timeout, &format!("the router seeing {want:?}"), |h| {
            h.nodes == want
        })
        .await
        .map(drop)
    }

    /// Polls `/health` until `ok` holds; the error names `what`, the last answer and the tail
    /// of the router's log.
    pub async fn wait_health(
        &self,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&RouterHealth) -> bool,
    ) -> Result<RouterHealth> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.health().await {
                Ok(health) if ok(&health) => return Ok(health),
                Ok(health) => format!("{health:?}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "no {what} within {timeout:?}; last /health: {last}\n{}",
                    self.router.log_tail()
                );
            }
            tokio::time::sleep(HEALTH_POLL).await;
        }
    }

    /// The children that exited since the last call without being asked: exited nodes leave
    /// [`Cluster::nodes`]; the router and etcd are reported once.
    pub fn reap_exited(&mut self) -> Vec<ExitedProcess> {
        let mut exited = Vec::new();
        let mut i = 0;
        while i < self.nodes.len() {
            match self.nodes[i].process.try_exit() {
                Some(status) => {
                    let node = self.nodes.remove(i);
                    exited.push(ExitedProcess {
                        id: node.summary.id.clone(),
                        status,
                        log: node.summary.log.clone(),
                    });
                }
                None => i += 1,
            }
        }
        if let Some(status) = self.router.newly_exited() {
            let log = self.router.log_path().to_path_buf();
            exited.push(ExitedProcess {
                id: "router".into(),
                status,
                log,
            });
        }
        if let Some(status) = self.etcd.newly_exited().map(|s| s.to_string()) {
            let log = self.etcd.log_path().to_path_buf();
            exited.push(ExitedProcess {
                id: "etcd".into(),
                status,
                log,
            });
        }
        exited
    }

    /// Stops the router, then every node at once (they leave etcd as they go), then etcd.
    /// Each gets [`STOP_TIMEOUT`] before SIGKILL; the error lists every process that did not
    /// exit cleanly.
    pub async fn shutdown(mut self) -> Result<()> {
        let mut failures = Vec::new();
        if let Err(e) = self.router.stop(STOP_TIMEOUT).await {
            failures.push(format!("{e:#}"));
        }
        for node in &mut self.nodes {
            if let Err(e) = node.process.terminate() {
                failures.push(format!("{e:#}"));
            }
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        for mut node in std::mem::take(&mut self.nodes) {
            if let Err(e) = node.process.finish_stop(deadline).await {
                failures.push(format!("{e:#}"));
            }
        }
        self.etcd.stop().await;
        if !failures.is_empty() {
            bail!("unclean shutdown:\n{}", failures.join("\n"));
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // All killed first, so they die together; the fields' drops then reap them.
        self.router.start_kill();
        for node in &mut self.nodes {
            node.process.start_kill();
        }
        self.etcd.start_kill();
        if keep_logs() || std::thread::panicking() {
            self.dir.disable_cleanup(true);
            eprintln!("pd-cluster logs kept in {}", self.dir.path().display());
        }
    }
}

/// Whether `PD_KEEP_LOGS` asks to keep the log directory after the cluster is gone.
fn keep_logs() -> bool {
    std::env::var_os("PD_KEEP_LOGS").is_some_and(|v| !v.is_empty() && v != "0")
}
