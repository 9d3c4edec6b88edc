//! Starting the members of a cluster: the command line of each node and of the router, and
//! launching it as a child process or as an in-process task; then waiting until it serves.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use pd_common::node::Listeners;
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::process::{self, binary, Process};
use super::task::Task;
use super::{ClusterSpec, Node, NodeSummary, Role, HEALTH_POLL, READY_TIMEOUT};

/// A node or the router: a child process or an in-process task.
pub(super) enum Member {
    Process(Process),
    Task(Task),
}

impl Member {
    pub(super) fn log_path(&self) -> &Path {
        match self {
            Member::Process(p) => p.log_path(),
            Member::Task(t) => t.log_path(),
        }
    }

    pub(super) fn log_tail(&self) -> String {
        process::log_tail(self.log_path(), 40)
    }

    pub(super) fn try_exit(&mut self) -> Option<String> {
        match self {
            Member::Process(p) => p.try_exit().map(|s| s.to_string()),
            Member::Task(t) => t.try_exit(),
        }
    }

    pub(super) fn newly_exited(&mut self) -> Option<String> {
        match self {
            Member::Process(p) => p.newly_exited().map(|s| s.to_string()),
            Member::Task(t) => t.newly_exited(),
        }
    }

    pub(super) fn terminate(&mut self) -> Result<()> {
        match self {
            Member::Process(p) => p.terminate(),
            Member::Task(t) => {
                t.terminate();
                Ok(())
            }
        }
    }

    pub(super) async fn finish_stop(&mut self, deadline: Instant) -> Result<()> {
        match self {
            Member::Process(p) => p.finish_stop(deadline).await,
            Member::Task(t) => t.finish_stop(deadline).await,
        }
    }

    pub(super) async fn stop(&mut self, timeout: Duration) -> Result<()> {
        match self {
            Member::Process(p) => p.stop(timeout).await,
            Member::Task(t) => t.stop(timeout).await,
        }
    }

    pub(super) fn start_kill(&mut self) {
        match self {
            Member::Process(p) => p.start_kill(),
            Member::Task(t) => t.start_kill(),
        }
    }
}

/// How to start one more process of this cluster.
pub(super) struct Blueprint {
    pub(super) spec: ClusterSpec,
    pub(super) name: String,
    pub(super) etcd_url: String,
    pub(super) dir: PathBuf,
    /// The next index of a node id, per role.
    pub(super) next_prefill: usize,
    pub(super) next_decode: usize,
    /// The cluster's CA and certificate, when it runs mutual TLS.
    pub(super) tls: Option<super::ClusterTls>,
}

/// A member started and not yet known to serve.
pub(super) enum Starting {
    /// A child process that will print its ready line.
    Process(Process),
    /// An in-process member whose listeners are bound already.
    Task {
        task: Task,
        grpc: String,
        metrics: String,
    },
}

impl Blueprint {
    pub(super) fn membership_args(&self) -> Vec<String> {
        let mut args = vec![
            "--etcd-endpoints".to_string(),
            self.etcd_url.clone(),
            "--cluster".into(),
            self.name.clone(),
            "--lease-ttl-secs".into(),
            self.spec.lease_ttl_secs.to_string(),
        ];
        if let Some(model) = &self.spec.model {
            args.extend(["--model".to_string(), model.display().to_string()]);
        }
        if let Some(tls) = &self.tls {
            args.extend(tls.args());
        }
        args
    }

    /// Starts a node with the next id of `role`; it still has to become ready.
    pub(super) async fn spawn_node(&mut self, role: Role) -> Result<(String, Starting)> {
        let (next, extra) = match role {
            Role::Prefill => (&mut self.next_prefill, &self.spec.prefill_args),
            Role::Decode => (&mut self.next_decode, &self.spec.decode_args),
        };
        let id = format!("{role}-{next}");
        *next += 1;
        let extra = extra.clone();
        let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
            .map(String::from)
            .to_vec();
        args.extend(["--node-id".to_string(), id.clone()]);
        args.extend(self.membership_args());
        args.extend(extra);
        let log = self.dir.join(format!("{id}.log"));
        if !self.spec.in_process {
            let mut command = Command::new(binary(role.binary())?);
            command.args(&args);
            let process =
                Process::spawn(command, &id, log).with_context(|| format!("starting {id}"))?;
            return Ok((id, Starting::Process(process)));
        }
        let listeners = Listeners {
            grpc: TcpListener::bind("127.0.0.1:0").await?,
            metrics: TcpListener::bind("127.0.0.1:0").await?,
        };
        let (grpc, metrics) = (
            listeners.grpc.local_addr()?.to_string(),
            listeners.metrics.local_addr()?.to_string(),
        );
        let argv = std::iter::once(role.binary().to_string()).chain(args);
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = match role {
            Role::Prefill => {
                let config = pd_prefill::PrefillConfig::try_parse_from(argv)?;
                Task::spawn(
                    &id,
                    shutdown,
                    pd_prefill::run(config, listeners, token),
                    log,
                )?
            }
            Role::Decode => {
                let config = pd_decode::DecodeConfig::try_parse_from(argv)?;
                Task::spawn(&id, shutdown, pd_decode::run(config, listeners, token), log)?
            }
        };
        Ok((
            id,
            Starting::Task {
                task,
                grpc,
                metrics,
            },
        ))
    }

    /// Starts the router; the caller waits for its `/health`.
    pub(super) async fn spawn_router(&self) -> Result<(Member, String, String)> {
        let loopback = |addr: Option<std::net::SocketAddr>| {
            addr.map_or_else(|| "127.0.0.1:0".to_string(), |a| a.to_string())
        };
        let (http, grpc) = (
            loopback(self.spec.router_http),
            loopback(self.spec.router_grpc),
        );
        let mut args = vec![
            "--http-listen".to_string(),
            http.clone(),
            "--grpc-listen".into(),
            grpc.clone(),
        ];
        args.extend(self.membership_args());
        args.extend(self.spec.router_args.iter().cloned());
        let log = self.dir.join("router.log");
        if !self.spec.in_process {
            let mut command = Command::new(binary("pd-router")?);
            command.args(&args);
            let mut process =
                Process::spawn(command, "router", log).context("starting pd-router")?;
            let ready = process.wait_ready(Instant::now() + READY_TIMEOUT).await?;
            return Ok((Member::Process(process), ready.http, ready.grpc));
        }
        let http = TcpListener::bind(&http).await?;
        let grpc = TcpListener::bind(&grpc).await?;
        let addresses = (
            http.local_addr()?.to_string(),
            grpc.local_addr()?.to_string(),
        );
        let argv = std::iter::once("pd-router".to_string()).chain(args);
        let config = pd_router::RouterConfig::try_parse_from(argv)?;
        let shutdown = CancellationToken::new();
        let run = pd_router::run(config, http, grpc, shutdown.clone());
        let task = Task::spawn("router", shutdown, run, log)?;
        Ok((Member::Task(task), addresses.0, addresses.1))
    }
}

/// Waits until a node started by [`Blueprint::spawn_node`] serves.
pub(super) async fn node_ready(
    role: Role,
    id: String,
    starting: Starting,
    deadline: Instant,
) -> Result<Node> {
    let (grpc, metrics, pid, process) = match starting {
        Starting::Process(mut process) => {
            let ready = process.wait_ready(deadline).await?;
            if ready.role != role.as_str() {
                bail!("{id} announced role {:?}, not {role}", ready.role);
            }
            let pid = process.pid();
            (ready.grpc, ready.metrics, pid, Member::Process(process))
        }
        Starting::Task {
            mut task,
            grpc,
            metrics,
        } => {
            wait_serving(&id, &grpc, &mut task, deadline).await?;
            (grpc, metrics, 0, Member::Task(task))
        }
    };
    let summary = NodeSummary {
        id,
        role,
        grpc,
        metrics,
        pid,
        log: process.log_path().to_path_buf(),
    };
    Ok(Node { summary, process })
}

/// Polls an in-process node's `Node.Stats` until it answers (its model is loaded and its
/// server runs) or `deadline` passes.
async fn wait_serving(id: &str, grpc: &str, task: &mut Task, deadline: Instant) -> Result<()> {
    use pd_proto::v1::node_client::NodeClient;
    loop {
        if let Some(outcome) = task.try_exit() {
            bail!("{id} ended before it served: {outcome}");
        }
        let attempt = async {
            let mut client = NodeClient::connect(format!("http://{grpc}")).await.ok()?;
            client.stats(pd_proto::v1::StatsRequest {}).await.ok()
        };
        if tokio::time::timeout(Duration::from_secs(1), attempt)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{id} did not serve within {READY_TIMEOUT:?}");
        }
        tokio::time::sleep(HEALTH_POLL).await;
    }
}
