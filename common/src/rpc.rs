//! gRPC plumbing every node shares: channels to peers, and the mapping of addresses to URIs.

use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::{Error, Result};

/// How long opening a connection to a peer may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings find a peer that vanished without closing its connections (a partition, a
/// frozen host) within about interval + timeout.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// A lazily connecting channel to `address` (`host:port`, or a full `http://` URI).
pub fn channel(address: &str) -> Result<Channel> {
    Ok(endpoint(address)?.connect_lazy())
}

/// The endpoint of `address` with the cluster's connection settings.
pub fn endpoint(address: &str) -> Result<Endpoint> {
    let uri = if address.contains("://") {
        address.to_string()
    } else {
        format!("http://{address}")
    };
    Ok(Endpoint::from_shared(uri)
        .map_err(|e| Error::invalid(format!("bad peer address {address:?}: {e}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true))
}
