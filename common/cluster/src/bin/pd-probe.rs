//! pd-probe: the health probe of the pd-cluster image. It asks a node on this host, through the
//! node's own API, one question and exits 0 for yes, 1 for no (the reason on stderr):
//!
//! - `ready`: can it serve? Prefill and decode nodes: their role's `grpc.health.v1` status is
//!   SERVING (it turns NOT_SERVING when a drain starts). The router: `GET /health` answers 200
//!   (it knows a decode node). etcd: `GET /health` answers 200 (the member has a leader).
//! - `live`: is it working? Prefill and decode nodes: `Node.Stats` answers in time; the engine's
//!   own loop answers it, so a wedged engine fails although its servers accept connections. The
//!   router: `GET /live`. etcd: as `ready`.
//!
//! Without `--role`, the role is the program that PID 1 of the container runs (or starts, under
//! an init such as docker-init); without `--address`, the node's listen address is read from the
//! same `PD_*` variable the node reads, with loopback for an unspecified IP.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use pd_common::rpc::RpcConfig;
use pd_proto::v1::node_client::NodeClient;
use pd_proto::v1::StatsRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

#[derive(Debug, Parser)]
#[command(
    name = "pd-probe",
    version,
    about = "Readiness and liveness probe of a pd-cluster node"
)]
struct Args {
    /// What to ask.
    #[arg(value_enum, default_value_t = Check::Ready)]
    check: Check,

    /// The kind of node (default: the program PID 1 runs or starts).
    #[arg(long, value_enum)]
    role: Option<Role>,

    /// host:port of the node's gRPC (prefill, decode) or HTTP (router, etcd) listener.
    #[arg(long)]
    address: Option<String>,

    /// How long the node may take to answer, in milliseconds.
    #[arg(long, default_value_t = 3000)]
    timeout_ms: u64,

    /// Connection settings, read from the same `PD_*` variables as the node's: with the
    /// node's TLS files (`PD_TLS_CA`, `PD_TLS_CERT`, `PD_TLS_KEY`) the probe speaks its TLS.
    #[command(flatten)]
    rpc: RpcConfig,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Check {
    Ready,
    Live,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    Router,
    Prefill,
    Decode,
    Etcd,
}

impl Role {
    /// The program that runs this role, as PID 1's command line names it.
    fn program(self) -> &'static str {
        match self {
            Role::Router => "pd-router",
            Role::Prefill => "pd-prefill",
            Role::Decode => "pd-decode",
            Role::Etcd => "etcd",
        }
    }

    /// The variable the node reads its listen address from, and the node's default for it.
    fn listen(self) -> (Option<&'static str>, &'static str) {
        match self {
            Role::Router => (Some("PD_HTTP_LISTEN"), "0.0.0.0:8000"),
            Role::Prefill => (Some("PD_PREFILL_LISTEN"), "0.0.0.0:50061"),
            Role::Decode => (Some("PD_DECODE_LISTEN"), "0.0.0.0:50071"),
            Role::Etcd => (None, "127.0.0.1:2379"),
        }
    }
}

/// The role of the program PID 1 runs: the first argument of its command line that names one
/// (an init's own name comes first and names none).
fn role_of_pid1() -> Result<Role, String> {
    let cmdline = std::fs::read("/proc/1/cmdline")
        .map_err(|e| format!("no --role given, and /proc/1/cmdline is unreadable: {e}"))?;
    let roles = [Role::Router, Role::Prefill, Role::Decode, Role::Etcd];
    cmdline
        .split(|&b| b == 0)
        .filter_map(|arg| std::str::from_utf8(arg).ok())
        .map(|arg| arg.rsplit('/').next().unwrap_or(arg))
        .find_map(|name| roles.into_iter().find(|r| r.program() == name))
        .ok_or_else(|| "no --role given, and PID 1 runs no pd node or etcd".to_string())
}

/// Where the node listens, as seen from this host.
fn local_address(role: Role) -> Result<String, String> {
    let (var, default) = role.listen();
    let listen = var
        .and_then(|v| std::env::var(v).ok())
        .unwrap_or_else(|| default.to_string());
    let bound: SocketAddr = listen
        .parse()
        .map_err(|e| format!("listen address {listen:?} of {}: {e}", role.program()))?;
    pd_common::node::advertised(bound, None).map_err(|e| e.to_string())
}

async fn http_ok(address: &str, path: &str, timeout: Duration) -> Result<String, String> {
    let url = format!("http://{address}{path}");
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(timeout)
        .build()
        .map_err(|e| e.to_string())?;
    let response = client
        .get(&url)
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    let status = response.status();
    let body = response.text().await.unwrap_or_default();
    if status.is_success() {
        Ok(format!("GET {url}: {status}"))
    } else {
        Err(format!("GET {url}: {status} {}", body.trim()))
    }
}

async fn channel(
    rpc: &RpcConfig,
    address: &str,
    timeout: Duration,
) -> Result<tonic::transport::Channel, String> {
    rpc.endpoint(address)
        .map_err(|e| format!("{address}: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| format!("connecting to {address}: {e}"))
}

async fn grpc_serving(
    rpc: &RpcConfig,
    address: &str,
    service: &str,
    timeout: Duration,
) -> Result<String, String> {
    let mut client = HealthClient::new(channel(rpc, address, timeout).await?);
    let request = HealthCheckRequest {
        service: service.to_string(),
    };
    let status = client
        .check(request)
        .await
        .map_err(|s| {
            format!(
                "health of {service} at {address}: {}: {}",
                s.code(),
                s.message()
            )
        })?
        .into_inner()
        .status();
    match status {
        ServingStatus::Serving => Ok(format!("{service} at {address}: SERVING")),
        other => Err(format!("{service} at {address}: {}", other.as_str_name())),
    }
}

async fn engine_answers(
    rpc: &RpcConfig,
    address: &str,
    timeout: Duration,
) -> Result<String, String> {
    let mut client = NodeClient::new(channel(rpc, address, timeout).await?);
    let stats = client
        .stats(StatsRequest {})
        .await
        .map_err(|s| format!("Node.Stats at {address}: {}: {}", s.code(), s.message()))?
        .into_inner();
    Ok(format!(
        "{} at {address}: {} running, {} waiting, {}/{} KV blocks free",
        stats.node_id,
        stats.running_sequences,
        stats.waiting_sequences,
        stats.free_kv_blocks,
        stats.total_kv_blocks
    ))
}

async fn probe(args: Args) -> Result<String, String> {
    let role = match args.role {
        Some(r) => r,
        None => role_of_pid1()?,
    };
    let address = match args.address {
        Some(a) => a,
        None => local_address(role)?,
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let rpc = &args.rpc;
    let work = async {
        match (role, args.check) {
            (Role::Router, Check::Ready) => http_ok(&address, "/health", timeout).await,
            (Role::Router, Check::Live) => http_ok(&address, "/live", timeout).await,
            (Role::Etcd, _) => http_ok(&address, "/health", timeout).await,
            (Role::Prefill, Check::Ready) => {
                grpc_serving(rpc, &address, "pd.v1.Prefill", timeout).await
            }
            (Role::Decode, Check::Ready) => {
                grpc_serving(rpc, &address, "pd.v1.Decode", timeout).await
            }
            (Role::Prefill | Role::Decode, Check::Live) => {
                engine_answers(rpc, &address, timeout).await
            }
        }
    };
    // One bound over connecting and asking together.
    tokio::time::timeout(timeout, work)
        .await
        .unwrap_or_else(|_| {
            Err(format!(
                "{} at {address}: no answer within {timeout:?}",
                role.program()
            ))
        })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    match probe(Args::parse()).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("pd-probe: {reason}");
            ExitCode::FAILURE
        }
    }
}
