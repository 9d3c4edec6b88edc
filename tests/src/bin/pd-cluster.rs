//! pd-cluster: a whole local cluster in one command. Starts etcd, the prefill and decode nodes
//! and the router as child processes on loopback (through `pd_tests::cluster`), prints where
//! they serve, and stops them in order on Ctrl-C or SIGTERM.
//!
//! Stdout carries exactly one line, JSON, for scripts:
//! `{"event":"ready","http":...,"grpc":...,"etcd":...,"metrics":[...],"log_dir":...}`.
//! Everything meant for people goes to stderr.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use pd_tests::cluster::{Cluster, ClusterSpec};
use tokio::signal::unix::{signal, Signal, SignalKind};

/// How often the launcher looks for children that exited unasked.
const EXIT_CHECK: Duration = Duration::from_millis(500);

#[derive(Debug, Parser)]
#[command(
    name = "pd-cluster",
    about = "Runs etcd, prefill and decode nodes and the router on this machine",
    after_help = "The node binaries are looked for next to this one (or in PD_BIN_DIR). \
                  Logs go to a temporary directory, printed at start and removed at exit \
                  unless PD_KEEP_LOGS=1."
)]
struct Args {
    /// Number of prefill nodes.
    #[arg(long, env = "PD_PREFILL_NODES", default_value_t = 1)]
    prefill: usize,

    /// Number of decode nodes.
    #[arg(long, env = "PD_DECODE_NODES", default_value_t = 1)]
    decode: usize,

    /// The router's OpenAI-style HTTP API. Port 0 picks a free port.
    #[arg(long, env = "PD_HTTP_LISTEN", default_value = "127.0.0.1:8000")]
    http_listen: std::net::SocketAddr,

    /// The router's client-facing gRPC. Port 0 picks a free port.
    #[arg(long, env = "PD_ROUTER_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    grpc_listen: std::net::SocketAddr,

    /// The model every node serves: a GGUF file, a Hugging Face folder or `dummy:<shape>`
    /// (default: the nodes' own, the SmolLM2 GGUF from deploy/fetch-model.sh).
    #[arg(long, env = "PD_MODEL")]
    model: Option<PathBuf>,

    /// TTL of the nodes' etcd leases: how long a crashed node stays listed.
    #[arg(long, env = "PD_LEASE_TTL_SECS", default_value_t = 5)]
    lease_ttl_secs: u64,

    /// Mutual TLS between every process and to etcd, with a throwaway CA made in the log
    /// directory (for local use only; the router's client APIs stay plain).
    #[arg(long, env = "PD_CLUSTER_TLS")]
    tls: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pd-cluster: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> Result<()> {
    // Listening before the start, so that Ctrl-C during a slow start still stops the children
    // (dropping the half-started cluster kills them).
    let mut stop = StopSignal::new()?;
    let spec = ClusterSpec {
        prefill: args.prefill,
        decode: args.decode,
        model: args.model,
        lease_ttl_secs: args.lease_ttl_secs,
        router_http: Some(args.http_listen),
        router_grpc: Some(args.grpc_listen),
        tls: args.tls,
        ..ClusterSpec::default()
    };
    eprintln!(
        "pd-cluster: starting etcd, {} prefill and {} decode node(s) and the router...",
        spec.prefill, spec.decode
    );
    let mut cluster = tokio::select! {
        cluster = Cluster::start(spec) => cluster?,
        () = stop.recv() => {
            eprintln!("pd-cluster: stopped before the cluster was up");
            return Ok(());
        }
    };
    announce(&cluster);

    let mut check = tokio::time::interval(EXIT_CHECK);
    loop {
        tokio::select! {
            () = stop.recv() => break,
            _ = check.tick() => {
                for exited in cluster.reap_exited() {
                    eprintln!(
                        "pd-cluster: {} exited unexpectedly ({}); see {}",
                        exited.id,
                        exited.status,
                        exited.log.display()
                    );
                }
            }
        }
    }
    eprintln!("pd-cluster: shutting down");
    cluster.shutdown().await?;
    eprintln!("pd-cluster: stopped");
    Ok(())
}

/// Prints the endpoints: a block for people on stderr, one JSON line for scripts on stdout.
fn announce(cluster: &Cluster) {
    let nodes = cluster.nodes();
    let mut metrics = vec![format!("{}/metrics", cluster.http_url())];
    metrics.extend(nodes.iter().map(|n| n.metrics_url()));

    eprintln!();
    eprintln!("pd-cluster {} is up", cluster.cluster_name());
    eprintln!("  HTTP API   {}", cluster.http_url());
    eprintln!("  gRPC       {}", cluster.grpc_url());
    eprintln!("  etcd       {}", cluster.etcd_url());
    if let Some(tls) = cluster.tls() {
        eprintln!("  TLS CA     {}", tls.ca.display());
    }
    eprintln!("  metrics    {}/metrics", cluster.http_url());
    for node in &nodes {
        eprintln!(
            "  {:<10} grpc {}  metrics {}  pid {}",
            node.id,
            node.grpc_url(),
            node.metrics_url(),
            node.pid
        );
    }
    eprintln!("  logs       {}", cluster.log_dir().display());
    eprintln!("Ctrl-C stops the cluster.");
    eprintln!();

    let line = ReadyJson {
        event: "ready",
        http: cluster.http_url(),
        grpc: cluster.grpc_url(),
        etcd: cluster.etcd_url(),
        metrics,
        log_dir: cluster.log_dir().display().to_string(),
    };
    match serde_json::to_string(&line) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("pd-cluster: cannot write the ready line: {e}"),
    }
}

/// The ready line; a struct rather than `json!` so that `event` comes first.
#[derive(serde::Serialize)]
struct ReadyJson {
    event: &'static str,
    http: String,
    grpc: String,
    etcd: String,
    /// Every `/metrics` URL: the router's first, then each node's.
    metrics: Vec<String>,
    log_dir: String,
}

/// Ctrl-C (SIGINT) or SIGTERM, both caught from creation on.
struct StopSignal {
    interrupt: Signal,
    terminate: Signal,
}

impl StopSignal {
    fn new() -> Result<Self> {
        Ok(StopSignal {
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
    }
}
