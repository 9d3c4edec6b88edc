//! The addresses a node registers for its peers: its gRPC address (given, `auto`, or the bound
//! one) and its metrics address, which follows the gRPC address's host. `auto` is the address
//! this host's own name resolves to, as a container or a pod has it: Docker and Kubernetes map
//! the hostname to the container's address on its network.

use std::io;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};

use crate::Result;

/// The `--advertise-address` value that asks for this host's own address.
pub const AUTO: &str = "auto";

/// `host:port`, with an IPv6 address in brackets.
pub fn join_host_port(ip: IpAddr, port: u16) -> String {
    SocketAddr::new(ip, port).to_string()
}

/// The address of this host on its network: the first address its hostname resolves to that is
/// neither loopback nor link-local.
pub fn own_ip() -> Result<IpAddr> {
    let host = hostname()?;
    let resolved: Vec<IpAddr> = (host.as_str(), 0)
        .to_socket_addrs()
        .map_err(|e| not_available(format!("resolving this host's name {host:?}: {e}")))?
        .map(|a| a.ip())
        .collect();
    pick_own_ip(&resolved).ok_or_else(|| {
        not_available(format!(
            "this host's name {host:?} resolves to no address peers can reach ({resolved:?}); \
             give --advertise-address HOST:PORT"
        ))
    })
}

fn pick_own_ip(candidates: &[IpAddr]) -> Option<IpAddr> {
    candidates.iter().copied().find(|ip| {
        !ip.is_loopback()
            && !ip.is_unspecified()
            && match ip {
                IpAddr::V4(v4) => !v4.is_link_local(),
                // fe80::/10 needs a scope id that peers do not share.
                IpAddr::V6(v6) => !v6.is_unicast_link_local(),
            }
    })
}

fn hostname() -> Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|n| n.trim().to_string())
        .unwrap_or_default();
    if name.is_empty() {
        return Err(not_available("this host has no name to resolve".into()));
    }
    Ok(name)
}

fn not_available(message: String) -> crate::Error {
    io::Error::new(
        io::ErrorKind::AddrNotAvailable,
        format!("--advertise-address {AUTO}: {message}"),
    )
    .into()
}

/// The metrics address to register: a listener bound to an unspecified IP is reached on the
/// host of the advertised gRPC address; one bound to a specific IP, there.
pub fn metrics_address(bound: SocketAddr, grpc_address: &str) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    match grpc_address.rsplit_once(':') {
        Some((host, _)) if !host.is_empty() => format!("{host}:{}", bound.port()),
        _ => join_host_port(loopback(bound.ip()), bound.port()),
    }
}

/// Loopback of the same family as `ip`.
pub fn loopback(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
        IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn ipv6_addresses_get_brackets() {
        assert_eq!(join_host_port(ip("fd00::7"), 50071), "[fd00::7]:50071");
        assert_eq!(join_host_port(ip("10.1.2.3"), 50071), "10.1.2.3:50071");
    }

    #[test]
    fn the_own_address_skips_loopback_and_link_local() {
        let found = pick_own_ip(&[ip("127.0.1.1"), ip("::1"), ip("fe80::1"), ip("172.18.0.5")]);
        assert_eq!(found, Some(ip("172.18.0.5")));
        assert_eq!(pick_own_ip(&[ip("fd00::5")]), Some(ip("fd00::5")));
        assert_eq!(pick_own_ip(&[ip("169.254.1.1"), ip("127.0.0.1")]), None);
    }

    #[test]
    fn this_host_has_an_address_or_a_clear_error() {
        match own_ip() {
            Ok(found) => assert!(!found.is_loopback()),
            Err(e) => assert!(e.to_string().contains("--advertise-address auto"), "{e}"),
        }
    }

    #[test]
    fn metrics_follow_the_advertised_host() {
        let any: SocketAddr = "0.0.0.0:9171".parse().unwrap();
        assert_eq!(metrics_address(any, "172.18.0.5:50071"), "172.18.0.5:9171");
        assert_eq!(
            metrics_address(any, "decode-0.pd:50071"),
            "decode-0.pd:9171"
        );
        let any6: SocketAddr = "[::]:9171".parse().unwrap();
        assert_eq!(metrics_address(any6, "[fd00::5]:50071"), "[fd00::5]:9171");
        let bound: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        assert_eq!(metrics_address(bound, "10.0.0.1:50071"), "127.0.0.1:4000");
        assert_eq!(metrics_address(any, "garbage"), "127.0.0.1:9171");
    }
}
