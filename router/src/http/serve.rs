//! The HTTP edge's accept loop: axum's router over hyper's connection builder, with what
//! `axum::serve` does not set: a deadline for a request's headers (a client that trickles them,
//! or holds an idle connection without sending, is closed) and for the TLS handshake, HTTPS
//! when the edge has a certificate, Nagle off on every connection, and a graceful shutdown that
//! lets open requests finish.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// Most HTTP/2 streams one client connection may have open at once.
const MAX_STREAMS_PER_CONNECTION: u32 = 256;
/// After a failed accept (out of file descriptors, most often), wait this long before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// Serves `app` on `listener` (over TLS with `tls`) until `shutdown`; then stops accepting and
/// returns once every open connection has finished its requests.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    header_read_timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    let graceful = GracefulShutdown::new();
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        // Streamed chunks leave as they are written, not after the client's delayed ACK.
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "TCP_NODELAY not set");
        }
        let (builder, app, watcher) = (builder.clone(), app.clone(), graceful.watcher());
        match tls.clone() {
            None => {
                tokio::spawn(connection(builder, tcp, app, watcher));
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    // The handshake has the headers' deadline: a silent client cannot hold it.
                    match tokio::time::timeout(header_read_timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => connection(builder, stream, app, watcher).await,
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        }
    }
    drop(listener);
    graceful.shutdown().await;
}

async fn connection<I>(builder: auto::Builder<TokioExecutor>, io: I, app: Router, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = TowerToHyperService::new(app);
    let connection = builder.serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(connection.into_owned()).await {
        tracing::debug!(error = %e, "HTTP connection ended with an error");
    }
}
