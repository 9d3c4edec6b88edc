//! The cluster's etcd: one member on free loopback ports (the `etcd` binary of Debian's
//! `etcd-server` package), its data in the cluster's directory, so it can be killed and started
//! again on the same ports and data, as after a crash.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tokio::time::Instant;

use super::process::Process;

/// How long etcd may take to start and elect itself leader.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long one readiness probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long etcd may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Etcd {
    process: Option<Process>,
    /// CA, certificate and key when etcd serves TLS and asks clients for certificates.
    tls: Option<[PathBuf; 3]>,
    client_port: u16,
    peer_port: u16,
    data_dir: PathBuf,
    log: PathBuf,
}

impl Etcd {
    /// Starts etcd with its data and log under `dir` and waits until it serves with a leader;
    /// with `tls` (CA, certificate, key) it serves TLS and takes only clients with a
    /// certificate of that CA.
    pub async fn start(dir: &Path, tls: Option<[PathBuf; 3]>) -> Result<Etcd> {
        let mut etcd = Etcd {
            process: None,
            tls,
            client_port: free_port()?,
            peer_port: free_port()?,
            data_dir: dir.join("etcd-data"),
            log: dir.join("etcd.log"),
        };
        etcd.spawn().await?;
        Ok(etcd)
    }

    pub fn client_url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }

    /// Starts etcd on this member's ports and data dir and waits until it is ready.
    pub async fn spawn(&mut self) -> Result<()> {
        let (client, peer) = (self.client_url(), self.peer_url());
        let mut command = Command::new("etcd");
        command
            .arg("--name=default")
            .arg(format!("--data-dir={}", self.data_dir.display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=default={peer}"))
            // A short election makes start-up and restarts quick; etcd stretches leases shorter
            // than 1.5 election timeouts, and the default node lease (2 s) stays above that.
            .args(["--heartbeat-interval=50", "--election-timeout=500"])
            .args(["--logger=zap", "--log-outputs=stderr"]);
        if let Some([ca, cert, key]) = &self.tls {
            command
                .arg(format!("--trusted-ca-file={}", ca.display()))
                .arg(format!("--cert-file={}", cert.display()))
                .arg(format!("--key-file={}", key.display()))
                .arg("--client-cert-auth");
        }
        let process = match Process::spawn(command, "etcd", self.log.clone()) {
            Ok(process) => process,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "the `etcd` binary is not on PATH: install it (Debian/Ubuntu: `apt-get install \
                 etcd-server`)"
            ),
            Err(e) => return Err(e).context("starting etcd"),
        };
        self.process = Some(process);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(process) = self.process.as_mut() {
                if let Some(status) = process.try_exit() {
                    bail!("etcd exited with {status}\n{}", process.log_tail());
                }
            }
            if self.is_ready().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                let tail = self.process.as_ref().map(Process::log_tail);
                bail!(
                    "etcd not ready within {READY_TIMEOUT:?}\n{}",
                    tail.unwrap_or_default()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Ready: the client port accepts connections and a leader answers a status request.
    async fn is_ready(&self) -> bool {
        let url = self.client_url();
        let probe = async {
            tokio::net::TcpStream::connect(("127.0.0.1", self.client_port))
                .await
                .ok()?;
            let options = match &self.tls {
                None => None,
                Some([ca, cert, key]) => {
                    let pem = |p: &PathBuf| std::fs::read(p).ok();
                    let tls = etcd_client::TlsOptions::new()
                        .ca_certificate(etcd_client::Certificate::from_pem(pem(ca)?))
                        .identity(etcd_client::Identity::from_pem(pem(cert)?, pem(key)?));
                    Some(etcd_client::ConnectOptions::new().with_tls(tls))
                }
            };
            let mut client = etcd_client::Client::connect([url.as_str()], options)
                .await
                .ok()?;
            let status = client.status().await.ok()?;
            (status.leader() != 0).then_some(())
        };
        matches!(
            tokio::time::timeout(PROBE_TIMEOUT, probe).await,
            Ok(Some(()))
        )
    }

    /// SIGKILL, as a crash would; the data stays for a restart.
    pub fn kill(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill();
        }
    }

    /// Kills etcd if it runs, and starts it again on the same ports and data.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }

    /// SIGTERM, killed if it lingers; its exit status is of no interest.
    pub async fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.stop(STOP_TIMEOUT).await;
        }
    }

    /// The exit status, once, if etcd went away without being asked.
    pub fn newly_exited(&mut self) -> Option<std::process::ExitStatus> {
        self.process.as_mut()?.newly_exited()
    }

    pub fn start_kill(&mut self) {
        if let Some(process) = self.process.as_mut() {
            process.start_kill();
        }
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

/// A port that was free a moment ago. Another process may take it before etcd binds it; the
/// window is small and the test then fails loudly rather than silently.
fn free_port() -> Result<u16> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding a free port")?;
    Ok(listener.local_addr()?.port())
}
