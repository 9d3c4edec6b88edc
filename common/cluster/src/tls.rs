//! Mutual TLS between the cluster's own processes, and to etcd: PEM files named by flags,
//! loaded when a server or channel is built. A node with a certificate the cluster's CA did not
//! sign cannot connect to another node, push KV into one, or (with etcd's client-certificate
//! auth on) register.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The PEM files of one side of mutual TLS: the CA that peers' certificates must chain to, and
/// this process's own certificate and key.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The files' contents.
pub struct TlsMaterial {
    pub ca: Vec<u8>,
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl TlsFiles {
    /// The three files when all are named, none when none is; a partial set is an error that
    /// names the flags (`what` is their prefix, as `--tls` or `--etcd`).
    pub fn from_flags(
        what: &str,
        ca: &Option<PathBuf>,
        cert: &Option<PathBuf>,
        key: &Option<PathBuf>,
    ) -> Result<Option<TlsFiles>> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(TlsFiles {
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            })),
            _ => Err(Error::invalid(format!(
                "{what}-ca, {what}-cert and {what}-key go together: give all three or none"
            ))),
        }
    }

    pub fn load(&self) -> Result<TlsMaterial> {
        Ok(TlsMaterial {
            ca: read(&self.ca)?,
            cert: read(&self.cert)?,
            key: read(&self.key)?,
        })
    }
}

impl TlsMaterial {
    pub fn ca_certificate(&self) -> tonic::transport::Certificate {
        tonic::transport::Certificate::from_pem(&self.ca)
    }

    pub fn identity(&self) -> tonic::transport::Identity {
        tonic::transport::Identity::from_pem(&self.cert, &self.key)
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path)
        .map_err(|e| Error::invalid(format!("cannot read {}: {e}", path.display())))?;
    if !bytes.windows(10).any(|w| w == b"-----BEGIN") {
        return Err(Error::invalid(format!(
            "{} is not a PEM file",
            path.display()
        )));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn all_three_files_or_none() {
        let p = |s: &str| Some(PathBuf::from(s));
        assert!(TlsFiles::from_flags("--tls", &None, &None, &None)
            .unwrap()
            .is_none());
        assert!(TlsFiles::from_flags("--tls", &p("a"), &p("b"), &p("c"))
            .unwrap()
            .is_some());
        let e = TlsFiles::from_flags("--tls", &p("a"), &None, &p("c")).unwrap_err();
        assert!(
            e.to_string().contains("--tls-ca, --tls-cert and --tls-key"),
            "{e}"
        );
    }

    #[test]
    fn a_file_that_is_not_pem_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cert.pem");
        std::fs::write(&path, b"not a certificate").unwrap();
        let files = TlsFiles {
            ca: path.clone(),
            cert: path.clone(),
            key: path.clone(),
        };
        let e = files.load().err().unwrap();
        assert!(e.to_string().contains("cert.pem"), "{e}");
        let missing = TlsFiles {
            ca: dir.path().join("missing"),
            ..files
        };
        assert!(missing.load().is_err());
    }
}
