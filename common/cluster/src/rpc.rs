//! gRPC plumbing every node shares: servers and channels with the cluster's connection settings
//! (mutual TLS when `--tls-ca/--tls-cert/--tls-key` are given), and the mapping of peer
//! addresses to URIs.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, ServerTlsConfig};

use crate::tls::TlsFiles;
use crate::{Error, Result};

const DEFAULT_CONNECT_TIMEOUT_MS: u64 = 2_000;
const DEFAULT_KEEPALIVE_INTERVAL_MS: u64 = 2_000;
const DEFAULT_KEEPALIVE_TIMEOUT_MS: u64 = 2_000;
/// HTTP/2 flow-control windows. KV transfers are bulk streams of megabytes: with the 64 KiB
/// default windows the sender waits for a window update every 64 KiB.
const STREAM_WINDOW: u32 = 8 << 20;
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame a peer may send us: bulk KV moves in frames of up to 1 MiB rather than
/// the protocol's 16 KiB default (each frame costs a header and a pass through the HTTP/2 state
/// machine on both ends).
const MAX_FRAME: u32 = 1 << 20;

/// Connection settings for every gRPC server and channel of a node.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(default)]
pub struct RpcConfig {
    /// How long opening a connection to a peer may take, in milliseconds.
    #[arg(long, env = "PD_CONNECT_TIMEOUT_MS", default_value_t = DEFAULT_CONNECT_TIMEOUT_MS)]
    pub connect_timeout_ms: u64,

    /// Interval of HTTP/2 keep-alive pings, in milliseconds: a peer that vanished without
    /// closing its connections (a partition, a frozen host) is found within about this plus
    /// --keepalive-timeout-ms.
    #[arg(long, env = "PD_KEEPALIVE_INTERVAL_MS", default_value_t = DEFAULT_KEEPALIVE_INTERVAL_MS)]
    pub keepalive_interval_ms: u64,

    /// How long a keep-alive ping may go unanswered before the connection is dropped, in
    /// milliseconds.
    #[arg(long, env = "PD_KEEPALIVE_TIMEOUT_MS", default_value_t = DEFAULT_KEEPALIVE_TIMEOUT_MS)]
    pub keepalive_timeout_ms: u64,

    /// PEM file of the cluster's certificate authority. With --tls-cert and --tls-key, every
    /// connection between the cluster's processes (router, decode and prefill nodes, KV
    /// pushes) is mutual TLS: a peer must show a certificate this CA signed.
    #[arg(long, env = "PD_TLS_CA")]
    pub tls_ca: Option<PathBuf>,

    /// PEM file of this process's certificate, signed by --tls-ca.
    #[arg(long, env = "PD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// PEM file of this process's private key.
    #[arg(long, env = "PD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// The name peers' certificates are checked against (default: the host of the address
    /// dialled). One name in every node's certificate suits clusters whose addresses are not
    /// known when certificates are made (containers, pods).
    #[arg(long, env = "PD_TLS_SERVER_NAME")]
    pub tls_server_name: Option<String>,
}

impl Default for RpcConfig {
    fn default() -> Self {
        Self {
            connect_timeout_ms: DEFAULT_CONNECT_TIMEOUT_MS,
            keepalive_interval_ms: DEFAULT_KEEPALIVE_INTERVAL_MS,
            keepalive_timeout_ms: DEFAULT_KEEPALIVE_TIMEOUT_MS,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_server_name: None,
        }
    }
}

impl RpcConfig {
    fn keepalive(&self) -> (Duration, Duration) {
        (
            Duration::from_millis(self.keepalive_interval_ms.max(1)),
            Duration::from_millis(self.keepalive_timeout_ms.max(1)),
        )
    }

    /// The TLS files, when this process talks mutual TLS to its peers.
    pub fn tls(&self) -> Result<Option<TlsFiles>> {
        TlsFiles::from_flags("--tls", &self.tls_ca, &self.tls_cert, &self.tls_key)
    }

    /// These settings without TLS: for a server whose clients are not the cluster's own
    /// processes (the router's client APIs).
    pub fn without_tls(&self) -> RpcConfig {
        RpcConfig {
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_server_name: None,
            ..self.clone()
        }
    }

    /// A gRPC server with the cluster's connection settings; with TLS on, it takes only
    /// clients whose certificate the cluster's CA signed.
    pub fn server(&self) -> Result<tonic::transport::Server> {
        let (interval, timeout) = self.keepalive();
        let server = tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .http2_keepalive_interval(Some(interval))
            .http2_keepalive_timeout(Some(timeout));
        let Some(files) = self.tls()? else {
            return Ok(server);
        };
        let tls = files.load()?;
        let config = ServerTlsConfig::new()
            .identity(tls.identity())
            .client_ca_root(tls.ca_certificate());
        server
            .tls_config(config)
            .map_err(|e| Error::invalid(format!("TLS server settings: {e}")))
    }

    /// The connections a server accepts on `listener`, with Nagle's algorithm off. (A server's
    /// own `tcp_nodelay` applies only to listeners it binds itself: without this, small frames
    /// such as window updates and streamed tokens wait for the peer's delayed ACK, up to tens
    /// of milliseconds.)
    pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
        tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
    }

    /// A lazily connecting channel to `address` (`host:port`, or a full `http://` URI).
    pub fn channel(&self, address: &str) -> Result<Channel> {
        Ok(self.endpoint(address)?.connect_lazy())
    }

    /// The endpoint of `address` with the cluster's connection settings (and its TLS).
    pub fn endpoint(&self, address: &str) -> Result<Endpoint> {
        let tls = self.tls()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        let uri = match address.split_once("://") {
            Some((_, rest)) if tls.is_some() => format!("https://{rest}"),
            Some(_) => address.to_string(),
            None => format!("{scheme}://{address}"),
        };
        let (interval, timeout) = self.keepalive();
        let bad_address = |e: &dyn std::fmt::Display| Error::BadPeerAddress {
            address: address.to_string(),
            reason: e.to_string(),
        };
        let mut endpoint = Endpoint::from_shared(uri).map_err(|e| bad_address(&e))?;
        if let Some(files) = tls {
            let material = files.load()?;
            let mut config = ClientTlsConfig::new()
                .ca_certificate(material.ca_certificate())
                .identity(material.identity());
            if let Some(name) = &self.tls_server_name {
                config = config.domain_name(name.clone());
            }
            endpoint = endpoint.tls_config(config).map_err(|e| bad_address(&e))?;
        }
        Ok(endpoint
            .connect_timeout(Duration::from_millis(self.connect_timeout_ms.max(1)))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(interval)
            .keep_alive_timeout(timeout)
            .keep_alive_while_idle(true)
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME))
    }
}

/// A tower layer for every gRPC server: tonic answers two client faults with codes that blame
/// the server, and this gives them the codes gRPC's own implementations use for a bad request:
/// a message over the size limit (tonic: OUT_OF_RANGE) becomes RESOURCE_EXHAUSTED, and a body
/// that is not the protobuf message it should be (tonic: INTERNAL) becomes INVALID_ARGUMENT.
#[derive(Debug, Clone, Copy)]
pub struct ClientFaultCodes;

impl<S> tower_layer::Layer<S> for ClientFaultCodes {
    type Service = ClientFaultCodesService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        ClientFaultCodesService(inner)
    }
}

#[derive(Debug, Clone)]
pub struct ClientFaultCodesService<S>(S);

impl<S, B, R> tower_service::Service<http::Request<B>> for ClientFaultCodesService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>> + Send,
    S::Future: Send + 'static,
{
    type Response = http::Response<R>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<http::Response<R>, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let future = self.0.call(request);
        Box::pin(async move {
            let mut response = future.await?;
            let headers = response.headers_mut();
            let code = headers.get("grpc-status").and_then(|s| s.to_str().ok());
            let message = headers
                .get("grpc-message")
                .and_then(|m| m.to_str().ok())
                .unwrap_or("");
            if let Some(fixed) = client_fault_code(code, message) {
                headers.insert("grpc-status", http::HeaderValue::from_static(fixed));
            }
            Ok(response)
        })
    }
}

/// The code a tonic status (its `grpc-status` and percent-encoded `grpc-message`) should
/// have had, when it is a client fault tonic reported as the server's.
fn client_fault_code(code: Option<&str>, message: &str) -> Option<&'static str> {
    let has = |text: &str| message.contains(text) || message.contains(&text.replace(' ', "%20"));
    match code {
        Some("11") if has("message length too large") => Some("8"),
        Some("13") if has("failed to decode Protobuf message") => Some("3"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_address_is_the_peers_fault() {
        let e = RpcConfig::default().channel("not a uri\u{7f}").unwrap_err();
        assert!(matches!(e, Error::BadPeerAddress { .. }), "{e:?}");
        assert_eq!(e.retry(), crate::error::Retry::Elsewhere);
    }

    #[test]
    fn client_faults_get_client_codes_and_nothing_else_changes() {
        use prost::Message;
        let decode = pd_proto::v1::NodeStats::decode(&b"\xff\xff"[..])
            .unwrap_err()
            .to_string();
        let encoded = decode.replace(' ', "%20");
        assert_eq!(client_fault_code(Some("13"), &encoded), Some("3"));
        assert_eq!(client_fault_code(Some("13"), &decode), Some("3"));
        assert_eq!(
            client_fault_code(
                Some("11"),
                "Error, decoded message length too large: 9 vs 4"
            ),
            Some("8")
        );
        assert_eq!(client_fault_code(Some("13"), "engine failed"), None);
        assert_eq!(client_fault_code(Some("11"), "step out of range"), None);
        assert_eq!(client_fault_code(None, &decode), None);
    }
}
