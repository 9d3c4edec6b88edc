//! One member of an in-process cluster: a node or the router running in this process, through
//! the same `run(config, listeners, shutdown)` its binary calls, on a thread and a tokio runtime
//! of its own (so that its blocking start-up, loading the model, stalls nobody else). It is
//! stopped through its shutdown token, as a signal would stop the binary (phased drain
//! included); it cannot be SIGKILLed or frozen, so the fault tests use processes.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Result};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Threads of each member's runtime.
const WORKER_THREADS: usize = 2;

/// A running member; told to shut down when dropped.
pub struct Task {
    name: String,
    shutdown: CancellationToken,
    /// How `run` ended, when it has.
    ended: Option<oneshot::Receiver<String>>,
    /// How it ended, once it has.
    outcome: Option<String>,
    /// Holds a note that this member logs to the test's own stderr.
    log: PathBuf,
    exit_reported: bool,
}

impl Task {
    /// Runs `run` (which `shutdown` stops) on a thread and runtime of its own.
    pub fn spawn<F>(name: &str, shutdown: CancellationToken, run: F, log: PathBuf) -> Result<Task>
    where
        F: std::future::Future<Output = pd_common::Result<()>> + Send + 'static,
    {
        let note = format!("{name} runs in-process: its log lines go to the test's stderr\n");
        // A missing note only makes error messages poorer.
        let _ = std::fs::write(&log, note);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKER_THREADS)
            .thread_name(format!("{name}-rt"))
            .enable_all()
            .build()?;
        let (tx, ended) = oneshot::channel();
        std::thread::Builder::new()
            .name(name.to_string())
            .spawn(move || {
                let outcome = match runtime.block_on(run) {
                    Ok(()) => "ok".to_string(),
                    Err(e) => format!("error: {e}"),
                };
                // Whoever waited may be gone.
                let _ = tx.send(outcome);
                // Tasks still running (a server's connection, say) end with the runtime here.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        Ok(Task {
            name: name.to_string(),
            shutdown,
            ended: Some(ended),
            outcome: None,
            log,
            exit_reported: false,
        })
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// How it ended, if it has.
    pub fn try_exit(&mut self) -> Option<String> {
        if let Some(ended) = self.ended.as_mut() {
            match ended.try_recv() {
                Ok(outcome) => self.outcome = Some(outcome),
                Err(oneshot::error::TryRecvError::Closed) => {
                    self.outcome = Some("a panic".into());
                }
                Err(oneshot::error::TryRecvError::Empty) => return None,
            }
            self.ended = None;
        }
        self.outcome.clone()
    }

    /// How it ended, once: for reporting a member that went away unasked.
    pub fn newly_exited(&mut self) -> Option<String> {
        if self.exit_reported {
            return None;
        }
        let outcome = self.try_exit()?;
        self.exit_reported = true;
        Some(outcome)
    }

    /// Starts the shutdown, as SIGTERM does for a process.
    pub fn terminate(&self) {
        self.shutdown.cancel();
    }

    /// Starts the shutdown without waiting: an in-process member cannot be killed.
    pub fn start_kill(&mut self) {
        self.shutdown.cancel();
    }

    /// Waits for a shutdown asked for with `terminate` until `deadline`. An error when it did
    /// not end in time or ended with an error.
    pub async fn finish_stop(&mut self, deadline: Instant) -> Result<()> {
        if let Some(ended) = self.ended.take() {
            match tokio::time::timeout_at(deadline, ended).await {
                Ok(Ok(outcome)) => self.outcome = Some(outcome),
                Ok(Err(_)) => self.outcome = Some("a panic".into()),
                Err(_) => bail!("{} did not stop in time", self.name),
            }
        }
        match self.outcome.as_deref() {
            Some("ok") | None => Ok(()),
            Some(other) => bail!("{} ended with {other} after its shutdown", self.name),
        }
    }

    /// Shutdown, then wait until `timeout` (aborted after it).
    pub async fn stop(&mut self, timeout: Duration) -> Result<()> {
        self.terminate();
        self.finish_stop(Instant::now() + timeout).await
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        self.start_kill();
    }
}
