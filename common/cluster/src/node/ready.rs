//! How a node names itself to others: the address peers dial, its id and device, and the one
//! ready line it prints on stdout once it serves.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::advertise;

/// The address peers reach a listener at: `advertise` when given (`auto`: this host's own
/// address with the bound port), else the bound address with an unspecified IP replaced by
/// loopback.
pub fn advertised(bound: SocketAddr, advertise: Option<&str>) -> crate::Result<String> {
    Ok(match advertise {
        Some(advertise::AUTO) => advertise::join_host_port(advertise::own_ip()?, bound.port()),
        Some(a) if !a.is_empty() => a.to_string(),
        _ if bound.ip().is_unspecified() => {
            advertise::join_host_port(advertise::loopback(bound.ip()), bound.port())
        }
        _ => bound.to_string(),
    })
}

/// A node id: `<role>-<8 hex digits>`.
pub fn new_node_id(role: &str) -> String {
    format!("{role}-{:08x}", rand::random::<u32>())
}

/// How a node names its device in etcd: `cpu` or `cuda:N`.
pub fn device_name(device: &candle_core::Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The one line a node prints on stdout once it serves: launchers and tests read the bound
/// addresses from it (a port of 0 picks a free one).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReadyLine {
    pub event: String,
    pub role: String,
    pub node_id: String,
    /// gRPC address peers use.
    pub grpc: String,
    /// Address of `/metrics` (for the router: its HTTP API, which serves `/metrics` too).
    pub metrics: String,
    /// The router's OpenAI-style HTTP API; empty for other nodes.
    #[serde(default)]
    pub http: String,
}

impl ReadyLine {
    pub fn print(&self) {
        use std::io::Write;
        if let Ok(line) = serde_json::to_string(self) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_are_advertised_as_loopback_unless_told() {
        let any: SocketAddr = "0.0.0.0:50071".parse().unwrap();
        assert_eq!(advertised(any, None).unwrap(), "127.0.0.1:50071");
        assert_eq!(advertised(any, Some("")).unwrap(), "127.0.0.1:50071");
        assert_eq!(
            advertised(any, Some("decode-0:50071")).unwrap(),
            "decode-0:50071"
        );
        let lo: SocketAddr = "127.0.0.2:9".parse().unwrap();
        assert_eq!(advertised(lo, None).unwrap(), "127.0.0.2:9");
        let any6: SocketAddr = "[::]:9".parse().unwrap();
        assert_eq!(advertised(any6, None).unwrap(), "[::1]:9");
    }
}
