//! A throwaway certificate authority for a local TLS cluster (`pd-cluster --tls`, the TLS
//! tests): one CA, and a certificate signed by it for every process (the same one, valid for
//! `localhost`, `127.0.0.1` and `pd-cluster`, for server and client use), written as PEM files
//! into the cluster's directory. Never for production: the CA's key sits beside its
//! certificate and lives as long as the directory.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The names every certificate of a local cluster is valid for.
pub const NAMES: [&str; 3] = ["localhost", "127.0.0.1", "pd-cluster"];

/// A CA and the files of one certificate it signed.
pub struct ClusterTls {
    issuer: CertifiedIssuer<'static, KeyPair>,
    dir: PathBuf,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ClusterTls {
    /// A new CA named `name`, and a certificate it signed, under `dir`.
    pub fn generate(dir: &Path, name: &str) -> Result<ClusterTls> {
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let issuer = CertifiedIssuer::self_signed(params, KeyPair::generate()?)?;
        let ca = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&ca, issuer.pem()).with_context(|| format!("writing {}", ca.display()))?;
        let mut tls = ClusterTls {
            issuer,
            dir: dir.to_path_buf(),
            ca,
            cert: PathBuf::new(),
            key: PathBuf::new(),
        };
        (tls.cert, tls.key) = tls.issue(name)?;
        Ok(tls)
    }

    /// Another certificate of this CA: its certificate and key files.
    pub fn issue(&self, name: &str) -> Result<(PathBuf, PathBuf)> {
        let mut params = CertificateParams::new(NAMES.map(String::from).to_vec())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let cert_path = self.dir.join(format!("{name}.pem"));
        let key_path = self.dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem())?;
        std::fs::write(&key_path, key.serialize_pem())?;
        Ok((cert_path, key_path))
    }

    /// The flags that make a node or the router talk mutual TLS to its peers and to etcd.
    pub fn args(&self) -> Vec<String> {
        let path = |p: &PathBuf| p.display().to_string();
        vec![
            "--tls-ca".into(),
            path(&self.ca),
            "--tls-cert".into(),
            path(&self.cert),
            "--tls-key".into(),
            path(&self.key),
            "--etcd-ca".into(),
            path(&self.ca),
            "--etcd-cert".into(),
            path(&self.cert),
            "--etcd-key".into(),
            path(&self.key),
        ]
    }

    /// Channel settings with this certificate.
    pub fn rpc(&self) -> pd_common::rpc::RpcConfig {
        pd_common::rpc::RpcConfig {
            tls_ca: Some(self.ca.clone()),
            tls_cert: Some(self.cert.clone()),
            tls_key: Some(self.key.clone()),
            ..Default::default()
        }
    }
}
