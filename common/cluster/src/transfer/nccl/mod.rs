//! KV over NCCL: a prefill node's GPU sends each exported layer's blocks straight to the decode
//! node's GPU.
//!
//! A link joins one prefill node (rank 0) and one decode node (rank 1) in a two-rank NCCL
//! communicator ([`comm`]). The prefill node makes the unique id and hands it over
//! `KvTransfer.NcclConnect`; both ends then join. Each end of a link is a thread with its own
//! CUDA stream ([`link`]). The prefill side keeps one link per decode node and sends through a
//! [`sender::NcclSink`]; the decode side ([`receive`]) joins links and, for each chunk announced
//! on a transfer's Push stream, receives its bytes into the reservation.

mod comm;
mod link;
mod receive;
mod sender;

use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use comm::new_unique_id;
pub use link::{Gate, Links, NcclLink};
pub use receive::{join, receive_chunk};
pub use sender::{NcclSender, NcclSink};

const DEFAULT_OP_TIMEOUT_MS: u64 = 30_000;
const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 60_000;

/// Timeouts of NCCL links.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct NcclConfig {
    /// How long one chunk's send or receive over NCCL may take before the link is declared
    /// dead, in milliseconds.
    #[arg(long, env = "PD_NCCL_OP_TIMEOUT_MS", default_value_t = DEFAULT_OP_TIMEOUT_MS)]
    pub nccl_op_timeout_ms: u64,

    /// How long both ends may take to join a new NCCL link, in milliseconds.
    #[arg(long, env = "PD_NCCL_CONNECT_TIMEOUT_MS", default_value_t = DEFAULT_CONNECT_TIMEOUT_MS)]
    pub nccl_connect_timeout_ms: u64,
}

impl Default for NcclConfig {
    fn default() -> Self {
        Self {
            nccl_op_timeout_ms: DEFAULT_OP_TIMEOUT_MS,
            nccl_connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
        }
    }
}

impl NcclConfig {
    pub fn op_timeout(&self) -> Duration {
        Duration::from_millis(self.nccl_op_timeout_ms.max(1))
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.nccl_connect_timeout_ms.max(1))
    }
}
