//! TLS on the client APIs, with vLLM's flags: `--ssl-certfile` and `--ssl-keyfile` serve HTTPS
//! and gRPC over TLS; `--ssl-ca-certs` also asks every client for a certificate one of those
//! CAs signed. Separate from the cluster's own mutual TLS (`--tls-*`): clients are not members.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pd_common::{Error, Result};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// The flags of TLS on the client APIs.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct EdgeTlsConfig {
    /// PEM certificate chain of the client APIs: with --ssl-keyfile, HTTP is served as HTTPS
    /// and gRPC over TLS.
    #[arg(long, env = "PD_SSL_CERTFILE")]
    pub ssl_certfile: Option<PathBuf>,

    /// PEM private key of --ssl-certfile.
    #[arg(long, env = "PD_SSL_KEYFILE")]
    pub ssl_keyfile: Option<PathBuf>,

    /// PEM file of CA certificates: clients must then show a certificate one of them signed.
    #[arg(long, env = "PD_SSL_CA_CERTS")]
    pub ssl_ca_certs: Option<PathBuf>,
}

/// The loaded files of TLS on the client APIs, and the HTTPS acceptor made from them.
pub struct EdgeTls {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
    acceptor: TlsAcceptor,
}

impl EdgeTls {
    /// `None` when the flags ask for no TLS.
    pub fn load(config: &EdgeTlsConfig) -> Result<Option<EdgeTls>> {
        let (cert, key) =
            match (&config.ssl_certfile, &config.ssl_keyfile) {
                (None, None) if config.ssl_ca_certs.is_none() => return Ok(None),
                (Some(cert), Some(key)) => (read(cert)?, read(key)?),
                _ => return Err(Error::invalid(
                    "--ssl-certfile and --ssl-keyfile go together (and --ssl-ca-certs needs both)",
                )),
            };
        let client_ca = config.ssl_ca_certs.as_deref().map(read).transpose()?;
        // Made now, so that bad files fail at start, not at the first connection.
        let acceptor = acceptor(&cert, &key, client_ca.as_deref())?;
        Ok(Some(EdgeTls {
            cert,
            key,
            client_ca,
            acceptor,
        }))
    }

    /// The HTTPS acceptor (HTTP/2 and HTTP/1.1 by ALPN).
    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// The same for the gRPC API.
    pub fn grpc(&self) -> ServerTlsConfig {
        let config = ServerTlsConfig::new().identity(Identity::from_pem(&self.cert, &self.key));
        match &self.client_ca {
            Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
            None => config,
        }
    }
}

/// The HTTPS acceptor of a certificate chain, its key and, to ask clients for certificates,
/// their CAs.
fn acceptor(cert: &[u8], key: &[u8], client_ca: Option<&[u8]>) -> Result<TlsAcceptor> {
    let bad = |what: &str, e: &dyn std::fmt::Display| Error::invalid(format!("{what}: {e}"));
    let chain = CertificateDer::pem_slice_iter(cert)
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| bad("--ssl-certfile", &e))?;
    if chain.is_empty() {
        return Err(Error::invalid("--ssl-certfile holds no certificate"));
    }
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| bad("--ssl-keyfile", &e))?;
    let builder = ServerConfig::builder();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = RootCertStore::empty();
            for ca in CertificateDer::pem_slice_iter(pem) {
                let ca = ca.map_err(|e| bad("--ssl-ca-certs", &e))?;
                roots.add(ca).map_err(|e| bad("--ssl-ca-certs", &e))?;
            }
            let verifier = WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .map_err(|e| bad("--ssl-ca-certs", &e))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .map_err(|e| bad("--ssl-certfile/--ssl-keyfile", &e))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|e| Error::invalid(format!("cannot read {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_flags_no_tls_and_half_a_pair_is_an_error() {
        assert!(EdgeTls::load(&EdgeTlsConfig::default()).unwrap().is_none());
        let half = EdgeTlsConfig {
            ssl_certfile: Some("cert.pem".into()),
            ..Default::default()
        };
        assert!(EdgeTls::load(&half).is_err());
        let ca_only = EdgeTlsConfig {
            ssl_ca_certs: Some("ca.pem".into()),
            ..Default::default()
        };
        assert!(EdgeTls::load(&ca_only).is_err());
    }

    #[test]
    fn files_that_are_no_certificate_are_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not PEM").unwrap();
        let e = EdgeTls::load(&EdgeTlsConfig {
            ssl_certfile: Some(junk.clone()),
            ssl_keyfile: Some(junk),
            ssl_ca_certs: None,
        })
        .err()
        .unwrap();
        assert!(e.to_string().contains("--ssl-"), "{e}");
    }
}
