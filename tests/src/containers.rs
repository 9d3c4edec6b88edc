//! A pd-cluster in Docker containers: `deploy/docker-compose.yml` run by Compose under a project
//! name of its own, so its containers, network and volume collide with no other run. The router
//! publishes its ports on free 127.0.0.1 ports, and so does every worker's gRPC port (a second
//! compose file, written here), so the host reads each node's `Node.Stats`. Tests drive it from
//! the host through 127.0.0.1 only and inject faults with docker: kill, stop, pause, network
//! disconnect, a crash inside a container. Every wait is bounded by a deadline; none sleeps for a
//! fixed time. Dropping the cluster removes the project (containers, network, volume), after
//! printing the containers' last log lines if the test is failing.

pub mod docker;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use pd_proto::v1 as pb;
use pd_proto::v1::node_client::NodeClient;
use tokio::time::Instant;

use crate::cluster::{NodeCounts, RouterHealth};
use docker::{docker, ComposeTool};

/// How long the containers may take to load the model and register.
pub const START_TIMEOUT: Duration = Duration::from_secs(180);
/// How often `/health` and container states are polled.
const POLL: Duration = Duration::from_millis(100);
/// The workers' gRPC ports inside their containers (deploy/docker-compose.yml).
const PREFILL_GRPC: u16 = 50061;
pub const DECODE_GRPC: u16 = 50071;

/// What to start.
#[derive(Debug, Clone)]
pub struct ComposeSpec {
    pub prefill: usize,
    pub decode: usize,
    pub lease_ttl_secs: u64,
    pub transfer_timeout_ms: u64,
    /// `PD_TEST_IMAGE`, else `pd-cluster:local`.
    pub image: String,
    /// The TLS variant (deploy/docker-compose.tls.yml), with certificates from
    /// deploy/docker/make-certs.sh.
    pub tls: bool,
}

impl Default for ComposeSpec {
    fn default() -> Self {
        ComposeSpec {
            prefill: 2,
            decode: 2,
            // Short, so that a partitioned or frozen node leaves within seconds.
            lease_ttl_secs: 2,
            transfer_timeout_ms: 30_000,
            image: std::env::var("PD_TEST_IMAGE").unwrap_or_else(|_| "pd-cluster:local".into()),
            tls: false,
        }
    }
}

/// One container of the project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    pub id: String,
    pub name: String,
    pub service: String,
}

/// Why the container tests cannot run here, when they cannot: no Docker engine answers.
pub async fn unavailable_reason() -> Option<String> {
    match docker::engine_available().await {
        Ok(()) => None,
        Err(e) => Some(format!("no Docker engine answers (`docker info`: {e:#})")),
    }
}

/// A running compose project; see the module documentation.
pub struct ComposeCluster {
    tool: ComposeTool,
    project: String,
    files: Vec<PathBuf>,
    env: Vec<(String, String)>,
    network: String,
    http: reqwest::Client,
    router_http: String,
    router_grpc: String,
    /// How to reach the workers' gRPC ports (with the deployment's TLS, when it has it).
    rpc: pd_common::rpc::RpcConfig,
    /// Holds the second compose file; dropped last.
    _dir: tempfile::TempDir,
}

impl ComposeCluster {
    /// Starts etcd, `spec.prefill` prefill and `spec.decode` decode containers and the router,
    /// and waits until the router is healthy, sees etcd and counts every node.
    pub async fn start(spec: ComposeSpec) -> Result<ComposeCluster> {
        docker(["image", "inspect", "--format", "{{.Id}}", &spec.image])
            .await
            .with_context(|| {
                format!(
                    "the image {} is missing: run deploy/docker/build.sh first",
                    spec.image
                )
            })?;
        let tool = ComposeTool::detect().await?;
        let dir = tempfile::Builder::new().prefix("pd-compose-").tempdir()?;
        let extra = dir.path().join("published-workers.yml");
        std::fs::write(
            &extra,
            format!(
                "services:\n  prefill:\n    ports: [\"127.0.0.1::{PREFILL_GRPC}\"]\n  \
                 decode:\n    ports: [\"127.0.0.1::{DECODE_GRPC}\"]\n"
            ),
        )?;
        let deploy = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy");
        let project = format!("pdt{:012x}", rand::random::<u64>() >> 16);
        let mut files = vec![deploy.join("docker-compose.yml"), extra];
        let mut rpc = pd_common::rpc::RpcConfig::default();
        let mut env = vec![
            ("PD_IMAGE".to_string(), spec.image.clone()),
            // Empty: a free host port.
            ("PD_HTTP_PORT".to_string(), String::new()),
            ("PD_GRPC_PORT".to_string(), String::new()),
            (
                "PD_LEASE_TTL_SECS".to_string(),
                spec.lease_ttl_secs.to_string(),
            ),
            (
                "PD_TRANSFER_TIMEOUT_MS".to_string(),
                spec.transfer_timeout_ms.to_string(),
            ),
        ];
        if spec.tls {
            let certs = dir.path().join("certs");
            let made = tokio::process::Command::new(deploy.join("docker/make-certs.sh"))
                .arg(&certs)
                .output()
                .await
                .context("running deploy/docker/make-certs.sh")?;
            if !made.status.success() {
                bail!(
                    "make-certs.sh failed: {}",
                    String::from_utf8_lossy(&made.stderr)
                );
            }
            files.push(deploy.join("docker-compose.tls.yml"));
            env.push(("PD_CERTS_DIR".into(), certs.display().to_string()));
            rpc = pd_common::rpc::RpcConfig {
                tls_ca: Some(certs.join("ca.pem")),
                tls_cert: Some(certs.join("node.pem")),
                tls_key: Some(certs.join("node-key.pem")),
                tls_server_name: Some("pd-cluster".into()),
                ..Default::default()
            };
        }
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(3))
            .build()?;
        let mut cluster = ComposeCluster {
            tool,
            network: format!("{project}_default"),
            project,
            files,
            env,
            http,
            router_http: String::new(),
            router_grpc: String::new(),
            rpc,
            _dir: dir,
        };
        let (prefill, decode) = (spec.prefill.to_string(), spec.decode.to_string());
        cluster
            .compose([
                "up",
                "-d",
                "--scale",
                &format!("prefill={prefill}"),
                "--scale",
                &format!("decode={decode}"),
            ])
            .await?;
        let want = NodeCounts {
            prefill: spec.prefill,
            decode: spec.decode,
        };
        cluster.wait_router(START_TIMEOUT).await?;
        cluster
            .wait_health(
                START_TIMEOUT,
                &format!("a healthy router seeing {want:?}"),
                |h| h.http_status == 200 && h.etcd_connected && h.nodes == want,
            )
            .await?;
        Ok(cluster)
    }

    /// Runs Compose on this project.
    pub async fn compose<I, S>(&self, args: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        let mut command = self.tool.command();
        command.arg("-p").arg(&self.project);
        for f in &self.files {
            command.arg("-f").arg(f);
        }
        command
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        docker::run(command).await
    }

    pub fn project(&self) -> &str {
        &self.project
    }

    /// `http://127.0.0.1:port` of the router's HTTP API.
    pub fn http_url(&self) -> String {
        format!("http://{}", self.router_http)
    }

    /// `http://127.0.0.1:port` of the router's gRPC API.
    pub fn grpc_url(&self) -> String {
        format!("http://{}", self.router_grpc)
    }

    /// The project's containers of `service` (`etcd`, `router`, `prefill`, `decode`), running
    /// or not, in name order.
    pub async fn containers(&self, service: &str) -> Result<Vec<Container>> {
        let listed = docker([
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.project),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
            "--format",
            "{{.ID}} {{.Names}}",
        ])
        .await?;
        let mut found: Vec<Container> = listed
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(id, name)| Container {
                id: id.to_string(),
                name: name.to_string(),
                service: service.to_string(),
            })
            .collect();
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// The one container of `service`.
    pub async fn container(&self, service: &str) -> Result<Container> {
        let mut all = self.containers(service).await?;
        match all.len() {
            1 => Ok(all.remove(0)),
            n => bail!("{n} containers of {service}, not one"),
        }
    }

    /// The running worker containers (prefill and decode).
    pub async fn running_workers(&self) -> Result<Vec<Container>> {
        let mut out = Vec::new();
        for service in ["prefill", "decode"] {
            for c in self.containers(service).await? {
                if self.inspect(&c, "{{.State.Status}}").await? == "running" {
                    out.push(c);
                }
            }
        }
        Ok(out)
    }

    /// `docker inspect --format FORMAT` of `container`.
    pub async fn inspect(&self, container: &Container, format: &str) -> Result<String> {
        docker(["inspect", "--format", format, &container.id]).await
    }

    /// The 127.0.0.1 address `port` of `container` is published on.
    pub async fn published(&self, container: &Container, port: u16) -> Result<String> {
        let out = docker(["port", &container.id, &format!("{port}/tcp")]).await?;
        out.lines()
            .find(|l| l.starts_with("127.0.0.1:"))
            .map(str::to_string)
            .ok_or_else(|| {
                anyhow!(
                    "{} publishes {port} nowhere on 127.0.0.1: {out:?}",
                    container.name
                )
            })
    }

    /// Finds the router's published ports again (they change when its container restarts) and
    /// waits until its HTTP API answers.
    pub async fn wait_router(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let router = self.container("router").await?;
        loop {
            let found = async {
                let http = self.published(&router, 8000).await?;
                let grpc = self.published(&router, 50051).await?;
                anyhow::Ok((http, grpc))
            }
            .await;
            if let Ok((http, grpc)) = found {
                self.router_http = http;
                self.router_grpc = grpc;
                if self.health().await.is_ok() {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "the router did not answer within {timeout:?}\n{}",
                    self.logs("router").await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The router's `GET /health` answer, whatever its HTTP status.
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

    /// Polls `/health` until `ok` holds; the error names `what`, the last answer and the
    /// router's last log lines.
    pub async fn wait_health(
        &self,
        timeout: Duration,
        what: &str,
        ok: impl Fn(&RouterHealth) -> bool,
    ) -> Result<RouterHealth> {
        let deadline = Instant::now() + timeout;
        loop {
            let last = match self.health().await {
                Ok(h) if ok(&h) => return Ok(h),
                Ok(h) => format!("{h:?}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!(
                    "no {what} within {timeout:?}; last /health: {last}\n{}",
                    self.logs("router").await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Waits until the router counts `prefill` and `decode` nodes.
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

    /// `Node.Stats` of a worker container, through its published gRPC port.
    pub async fn node_stats(&self, container: &Container) -> Result<pb::NodeStats> {
        let port = if container.service == "prefill" {
            PREFILL_GRPC
        } else {
            DECODE_GRPC
        };
        let address = self.published(container, port).await?;
        let ask = async {
            let mut client = NodeClient::new(self.rpc.endpoint(&address)?.connect().await?);
            anyhow::Ok(client.stats(pb::StatsRequest {}).await?.into_inner())
        };
        tokio::time::timeout(Duration::from_secs(3), ask)
            .await
            .map_err(|_| anyhow!("Node.Stats of {} at {address} timed out", container.name))?
            .with_context(|| format!("Node.Stats of {} at {address}", container.name))
    }

    /// Waits until every running worker reports all its KV blocks free and nothing running or
    /// waiting: nothing leaked. The error carries the last stats.
    pub async fn wait_all_blocks_free(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut busy = Vec::new();
            for c in self.running_workers().await? {
                match self.node_stats(&c).await {
                    Ok(s)
                        if s.free_kv_blocks == s.total_kv_blocks
                            && s.running_sequences == 0
                            && s.waiting_sequences == 0 => {}
                    other => busy.push(format!("{}: {other:?}", c.name)),
                }
            }
            if busy.is_empty() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("KV blocks still in use after the work ended: {busy:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Polls `container`'s state until `ok` holds for `docker inspect --format FORMAT`.
    pub async fn wait_inspect(
        &self,
        container: &Container,
        format: &str,
        timeout: Duration,
        ok: impl Fn(&str) -> bool,
    ) -> Result<String> {
        let deadline = Instant::now() + timeout;
        loop {
            let value = self.inspect(container, format).await?;
            if ok(&value) {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} {format} still {value:?} after {timeout:?}\n{}",
                    container.name,
                    self.logs(&container.service).await
                );
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// `docker kill`: SIGKILL, and docker counts it as stopped by hand (no restart policy).
    pub async fn kill(&self, c: &Container) -> Result<()> {
        docker(["kill", &c.id]).await.map(drop)
    }

    /// `docker stop`: SIGTERM, SIGKILL after `grace_secs`; returns once the container is down.
    pub async fn stop(&self, c: &Container, grace_secs: u32) -> Result<()> {
        docker(["stop", "-t", &grace_secs.to_string(), &c.id])
            .await
            .map(drop)
    }

    pub async fn start_container(&self, c: &Container) -> Result<()> {
        docker(["start", &c.id]).await.map(drop)
    }

    /// The node inside `c` dies of SIGKILL, as a crash would: the container exits on its own,
    /// so its restart policy applies. (The init that is PID 1 cannot be signalled from inside;
    /// `kill -1` reaches every other process.)
    pub async fn crash(&self, c: &Container) -> Result<()> {
        let restarts = self.inspect(c, "{{.RestartCount}}").await?;
        // The exec may fail as its container goes down under it.
        let _ = docker(["exec", &c.id, "sh", "-c", "kill -KILL -1"]).await;
        self.wait_inspect(c, "{{.RestartCount}}", START_TIMEOUT, |n| n != restarts)
            .await
            .map(drop)
    }

    pub async fn pause(&self, c: &Container) -> Result<()> {
        docker(["pause", &c.id]).await.map(drop)
    }

    pub async fn unpause(&self, c: &Container) -> Result<()> {
        docker(["unpause", &c.id]).await.map(drop)
    }

    /// Cuts `c` off the project's network (a partition: it keeps running).
    pub async fn disconnect(&self, c: &Container) -> Result<()> {
        docker(["network", "disconnect", &self.network, &c.id])
            .await
            .map(drop)
    }

    /// Puts `c` back on the project's network, under its service name as before.
    pub async fn connect(&self, c: &Container) -> Result<()> {
        docker([
            "network",
            "connect",
            "--alias",
            &c.service,
            &self.network,
            &c.id,
        ])
        .await
        .map(drop)
    }

    /// The last log lines of `service`'s containers, for error messages.
    pub async fn logs(&self, service: &str) -> String {
        match self
            .compose(["logs", "--no-color", "--tail", "40", service])
            .await
        {
            Ok(out) => format!("--- last log lines of {service} ---\n{out}"),
            Err(e) => format!("--- no logs of {service}: {e:#} ---"),
        }
    }
}

impl Drop for ComposeCluster {
    fn drop(&mut self) {
        // Synchronous: no runtime can be counted on in a drop.
        let mut compose = match self.tool {
            ComposeTool::Plugin => {
                let mut c = std::process::Command::new("docker");
                c.arg("compose");
                c
            }
            ComposeTool::Standalone => std::process::Command::new("docker-compose"),
        };
        compose.arg("-p").arg(&self.project);
        for f in &self.files {
            compose.arg("-f").arg(f);
        }
        compose.envs(self.env.iter().map(|(k, v)| (k, v)));
        if std::thread::panicking() {
            let mut logs = std::process::Command::new(compose.get_program());
            logs.args(compose.get_args())
                .args(["logs", "--no-color", "--tail", "60"]);
            logs.envs(self.env.iter().map(|(k, v)| (k, v)));
            if let Ok(out) = logs.output() {
                eprintln!(
                    "--- {} logs ---\n{}",
                    self.project,
                    String::from_utf8_lossy(&out.stdout)
                );
            }
        }
        compose.args(["down", "-v", "-t", "1", "--remove-orphans"]);
        compose
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if !matches!(compose.status(), Ok(s) if s.success()) {
            eprintln!(
                "removing compose project {} failed; remove it by hand",
                self.project
            );
        }
    }
}
