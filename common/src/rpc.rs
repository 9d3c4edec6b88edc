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
/// HTTP/2 flow-control windows. KV transfers are bulk streams of megabytes: with the 64 KiB
/// default windows the sender waits for a window update every 64 KiB.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;

/// A gRPC server with the cluster's connection settings.
pub fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
}

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
        .keep_alive_while_idle(true)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW))
}
